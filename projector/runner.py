"""The projector loop: fetch a batch from the durable pull consumer, apply it to the read model, then ack.

One durable consumer carries the events of every aggregate; each stream type has its projection (`orders`,
`customers`). Per batch:

1. decode every message (`RecordedEvent.from_json`, `decode_event`); anything undecodable is a poison message;
   events of stream types without a projection are acknowledged and ignored;
2. per projection, orders first: group the events by aggregate (stream id), load the current documents with one
   `find`, fold each aggregate's events in version order onto its document (`fold`): `v <= version` is a
   duplicate, `v == version + 1` applies, `v > version + 1` is a gap: that event and the aggregate's later events
   in the batch wait (nak with delay, retried later, never skipped); write all changed documents with one
   version-guarded bulk write (new orders get their customer's fields if the customer is known);
3. derived views (`customer_views`): copy customer fields onto the orders of every customer touched by a customer
   event or an `OrderCreated`, then recompute the order statistics of every customer touched by an order event;
   record poison messages in `dead_letters`;
4. advance `checkpoints` of every stream whose events were applied or recognised as duplicates: written last, so
   a checkpoint at version v means every view reflects that stream up to v (read-your-writes waits on it);
5. only then settle the messages: ack what was applied or is a duplicate, nak what must be re-evaluated, term
   what was dead-lettered.

Duplicates take part in steps 3 and 4 as well: a batch that was written but not acknowledged (a crash, a MongoDB
failure half-way) comes back as duplicates and completes the derived views and the checkpoints then.

A MongoDB outage naks the batch with a bounded exponential backoff and pauses fetching until MongoDB answers
again; the version guard makes every redelivery harmless, so the loop never has to be clever about what was
written. NATS disconnects are handled by nats-py's own reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from core.backoff import exponential
from core.dependency_metrics import dependency_metrics
from core.envelope import HEADER_MSG_ID, HEADER_STREAM_ID, HEADER_VERSION, RecordedEvent
from core.events import Event, decode_event
from core.jetstream import ensure_stream, event_stream_config
from core.order_events import OrderCancelled, OrderCreated, OrderDeleted, OrderPlaced
from core.subjects import stream_subjects
from core.tracing import extract_context, tracer
from projector.checkpoints import Checkpoint, CheckpointWriter
from projector.config import ProjectorSettings
from projector.customer_views import CustomerFields, CustomerViews
from projector.dead_letters import DeadLetter, DeadLetterWriter
from projector.health import ProjectorStats
from projector.metrics import ProjectorMetrics
from projector.mongo_writer import Change, MongoDocument, ReadModelWriter, WriteOutcome
from projector.projections import Document, Projection
from projector.projections.customers import CUSTOMERS
from projector.projections.orders import ORDERS

log = logging.getLogger(__name__)

# First delays of the backoffs; each doubles per attempt up to `projector_max_backoff_seconds`.
MONGO_BACKOFF_BASE_SECONDS = 0.1
GAP_BACKOFF_BASE_SECONDS = 0.25
CONFLICT_BACKOFF_BASE_SECONDS = 0.05
# The consumer's pending counts are a metric, not worth a request per batch.
CONSUMER_INFO_INTERVAL_SECONDS = 2.0
# Budget for the no-wait drain after the first message of a batch (one round trip to nats-server).
DRAIN_TIMEOUT_SECONDS = 0.005
CONSUMER_INFO_TIMEOUT_SECONDS = 1.0

T = TypeVar("T")
U = TypeVar("U")

# The read models this projector keeps; orders come first in a batch (see the module docstring).
DEFAULT_PROJECTIONS: tuple[Projection, ...] = (ORDERS, CUSTOMERS)

# The order events that can change a customer's order statistics (counts by status, totals of placed orders).
# The others only touch lines and addresses of draft orders (the domain allows nothing else), which no statistic
# counts; skipping them leaves `order_stats_version` behind, which only fences newer against older results.
ORDER_STATS_EVENTS: tuple[type[Event], ...] = (OrderCreated, OrderPlaced, OrderCancelled, OrderDeleted)


@dataclass(frozen=True, slots=True)
class Delivery:
    """A decoded message: the JetStream message plus the event it carries."""

    msg: Msg
    recorded: RecordedEvent
    event: Event


@dataclass(frozen=True, slots=True)
class Poison:
    msg: Msg
    reason: str


@dataclass(slots=True)
class FoldResult:
    """What one batch does to the read model, before anything is written."""

    changes: list[Change] = field(default_factory=list)
    applied: dict[str, list[Delivery]] = field(default_factory=dict)  # doc id -> deliveries in its change
    duplicates: list[Delivery] = field(default_factory=list)
    deferred: list[Delivery] = field(default_factory=list)  # gaps and what follows them
    poison: list[Poison] = field(default_factory=list)
    gaps: int = 0


def stored_version(doc: Document | None) -> int:
    return 0 if doc is None else int(doc.get("version", 0))


def fold(projection: Projection, groups: dict[str, list[Delivery]], docs: dict[str, Document]) -> FoldResult:
    """Applies each aggregate's deliveries, in version order, onto its current document (pure, no I/O)."""
    result = FoldResult()
    for doc_id, deliveries in groups.items():
        original = docs.get(doc_id)
        doc = original
        version = stored_version(original)
        blocked = False
        applied: list[Delivery] = []
        for delivery in sorted(deliveries, key=lambda d: d.recorded.version):
            event_version = delivery.recorded.version
            if event_version <= version:
                result.duplicates.append(delivery)
            elif blocked:
                result.deferred.append(delivery)
            elif event_version > version + 1:
                log.info(
                    "version gap on %s %s: read model at v%d, got v%d; retrying later",
                    projection.stream_type,
                    doc_id,
                    version,
                    event_version,
                )
                result.gaps += 1
                result.deferred.append(delivery)
                blocked = True
            else:
                try:
                    doc = projection.project(doc, delivery.recorded, delivery.event)
                except ValueError as exc:
                    result.poison.append(Poison(delivery.msg, f"cannot apply: {exc}"))
                    blocked = True
                    continue
                version = event_version
                applied.append(delivery)
        if applied and doc is not None:
            expected = None if original is None else stored_version(original)
            result.changes.append(Change(doc_id, expected, doc))
            result.applied[doc_id] = applied
    return result


@dataclass(slots=True)
class ProjectionBatch:
    """One projection's part of a batch: its deliveries by stream id, the loaded documents, the fold, the write."""

    projection: Projection
    groups: dict[str, list[Delivery]] = field(default_factory=dict)
    docs: dict[str, Document] = field(default_factory=dict)
    result: FoldResult = field(default_factory=FoldResult)
    outcome: WriteOutcome = field(default_factory=WriteOutcome)

    def written(self) -> dict[str, list[Delivery]]:
        """Applied deliveries whose document write succeeded, by stream id."""
        return {
            doc_id: applied
            for doc_id, applied in self.result.applied.items()
            if doc_id not in self.outcome.conflicts and doc_id not in self.outcome.failed
        }

    def settled(self) -> dict[str, list[Delivery]]:
        """Deliveries that will be acked (written or duplicates), by stream id."""
        done = {doc_id: list(applied) for doc_id, applied in self.written().items()}
        for delivery in self.result.duplicates:
            done.setdefault(delivery.recorded.stream_id, []).append(delivery)
        return done

    def current_docs(self) -> dict[str, Document]:
        """The documents as this batch left them (written or loaded), by stream id."""
        return {**self.docs, **{change.doc_id: change.new_doc for change in self.result.changes}}


def prefill_customer_fields(changes: Sequence[Change], customers: dict[str, CustomerFields]) -> None:
    """Gives new order documents the fields of their customer, when the customer is in the read model."""
    for change in changes:
        if change.expected_version is None:
            customer = customers.get(str(change.new_doc.get("customer_id")))
            if customer is not None:
                change.new_doc.update(customer.order_fields())


def checkpoints_of(batches: Iterable[ProjectionBatch]) -> dict[str, Checkpoint]:
    """Per settled stream, the latest event version (and its position) this batch applied or found applied."""
    checkpoints: dict[str, Checkpoint] = {}
    for batch in batches:
        for stream_id, settled in batch.settled().items():
            for delivery in settled:
                rec = delivery.recorded
                checkpoints[stream_id] = Checkpoint(rec.stream_type, rec.version, rec.position).later(
                    checkpoints.get(stream_id)
                )
    return checkpoints


def _apply_span(msg: Msg) -> Span:
    """A CONSUMER span for one message, continuing the trace of the relay's publish (from its headers)."""
    headers = msg.headers or {}
    return tracer().start_span(
        "projector.apply",
        context=extract_context(headers),
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.destination.name": msg.subject,
            "messaging.message.id": headers.get(HEADER_MSG_ID, ""),
            "cqrs.stream_id": headers.get(HEADER_STREAM_ID, ""),
            "cqrs.version": headers.get(HEADER_VERSION, ""),
        },
    )


def _num_delivered(msg: Msg) -> int:
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # not a JetStream message; only in hand-made messages
        return 1


def _stream_seq(msg: Msg) -> int:
    return int(msg.metadata.sequence.stream)


class Projector:
    """Runs one projection from a durable JetStream pull consumer into MongoDB.

    `start()` connects, makes sure the stream and the consumer exist and starts the loop in a task; `stop()` lets
    the loop finish (write and ack) the batch in hand, then closes the connections. Several replicas may share
    the durable consumer: the version guard keeps them from overwriting each other.
    """

    def __init__(self, settings: ProjectorSettings) -> None:
        self._settings = settings
        self._projections = {p.stream_type: p for p in DEFAULT_PROJECTIONS}
        self.stats = ProjectorStats()
        self.metrics = ProjectorMetrics()
        self._deps = dependency_metrics(self.metrics.registry)
        self._js: JetStreamContext | None = None
        self._consumer_info_at: float | None = None
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._nc: NatsClient | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._mongo: AsyncMongoClient[MongoDocument] | None = None
        self._writers: dict[str, ReadModelWriter] = {}
        self._views: CustomerViews | None = None
        self._checkpoints: CheckpointWriter | None = None
        self._dead_letters: DeadLetterWriter | None = None
        self._indexes_ready = False
        self._mongo_attempts = 0
        self._apply_spans: dict[int, Span] = {}

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def metrics_port(self) -> int | None:
        """The port `/metrics` is served on (None unless `projector_metrics_port` is set)."""
        return self.metrics.port

    async def start(self) -> None:
        """Connects and starts the loop.

        Waits for NATS as long as it takes (nats-py retries even the first connection forever; cancel to give
        up). MongoDB may be down: the loop waits for it before fetching anything.
        """
        s = self._settings
        # Assigned before connecting so that a start() cancelled while NATS is unreachable can still close it:
        # with infinite reconnects nats-py retries even the *first* connection forever.
        self._nc = NatsClient()
        try:
            if s.projector_metrics_port is not None:
                # First: while the projector waits for NATS, /metrics already says so (mongo_up 0, no progress).
                self.metrics.serve(s.projector_metrics_port, s.metrics_host)
            log.info("connecting to NATS at %s", s.nats_url)
            await self._nc.connect(
                servers=s.nats_url,
                name=f"projector-{s.projector_durable}",
                connect_timeout=2,
                reconnect_time_wait=1,
                max_reconnect_attempts=-1,
                error_cb=self._on_nats_error,
                disconnected_cb=self._on_nats_disconnected,
                reconnected_cb=self._on_nats_reconnected,
            )
            js = self._js = self._nc.jetstream()
            await ensure_stream(js, event_stream_config(s.stream_name, s.subject_prefix))
            await js.add_consumer(s.stream_name, self._consumer_config())
            self._sub = await js.pull_subscribe_bind(durable=s.projector_durable, stream=s.stream_name)
            self._mongo = AsyncMongoClient(
                s.mongo_url,
                appname=f"projector-{s.projector_durable}",
                tz_aware=True,
                serverSelectionTimeoutMS=s.mongo_timeout_ms,
                connectTimeoutMS=s.mongo_timeout_ms,
                socketTimeoutMS=s.mongo_timeout_ms * 5,
            )
            database = self._mongo[s.mongo_database]
            self._writers = {t: ReadModelWriter(database, p) for t, p in self._projections.items()}
            self._views = CustomerViews(database)
            self._checkpoints = CheckpointWriter(database)
            self._dead_letters = DeadLetterWriter(database)
        except BaseException:
            self._stopping.set()
            await self._close_connections()
            raise
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"projector-{s.projector_durable}")
        log.info(
            "projector %s consuming %s (stream %s) into %s (%s)",
            s.projector_durable,
            stream_subjects(s.subject_prefix)[0],
            s.stream_name,
            s.mongo_database,
            ", ".join(p.collection for p in self._projections.values()),
        )

    async def stop(self) -> None:
        """Finishes the batch in hand (write + ack), then unsubscribes and closes the connections."""
        self._stopping.set()
        if self._task is None and self._nc is None and self._mongo is None:
            return  # never started, or already stopped
        if self._task is not None:
            task = self._task
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=self._settings.grace_seconds)
            except TimeoutError:
                # Release the batch in hand: unacked messages are redelivered; the version guard makes it harmless.
                log.warning("projector: batch not finished within %.1fs; releasing it", self._settings.grace_seconds)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            finally:
                self._task = None
        await self._close_connections()
        log.info("projector %s stopped", self._settings.projector_durable)

    async def wait(self) -> None:
        """Returns when the loop ends (after `stop()`, or if it crashed: then the error is raised)."""
        if self._task is not None:
            await asyncio.shield(self._task)

    def _consumer_config(self) -> ConsumerConfig:
        s = self._settings
        return ConsumerConfig(
            name=s.projector_durable,
            durable_name=s.projector_durable,
            description="read model projector: " + ", ".join(p.name for p in self._projections.values()),
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.projector_ack_wait_seconds,
            max_ack_pending=s.projector_max_ack_pending,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=stream_subjects(s.subject_prefix)[0],
        )

    async def _close_connections(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._nc is not None:
            # Flush so the acks of the last batch leave before the socket closes.
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
        if self._mongo is not None:
            with contextlib.suppress(Exception):
                await self._mongo.close()
            self._mongo = None
        self._js = None
        await asyncio.to_thread(self.metrics.close)

    # ---- the loop -------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        s = self._settings
        while not self._stopping.is_set():
            await self._refresh_consumer_gauges()
            if not self.stats.mongo_available:
                await self._wait_for_mongo()
                continue
            msgs = await self._fetch()
            if msgs:
                try:
                    await self.process_batch(msgs)
                except Exception:
                    # A bug, not an outage (those are handled inside): keep the process alive, retry later.
                    log.exception("unexpected error while projecting a batch of %d messages", len(msgs))
                    cap = self._settings.projector_max_backoff_seconds
                    await _settle_all(m.nak(delay=cap) for m in msgs)
                    await self._sleep(cap)
                self.stats.last_batch_monotonic = asyncio.get_running_loop().time()
            summary = self.stats.take_summary(s.projector_stats_interval_seconds)
            if summary is not None:
                log.info(
                    "applied %d events in %.1fs (%.0f/s), lag p50 %.3fs p99 %.3fs; "
                    "%d duplicates, %d gaps, %d dead letters",
                    summary.applied,
                    summary.seconds,
                    summary.rate,
                    summary.lag_p50,
                    summary.lag_p99,
                    summary.duplicates,
                    summary.gaps,
                    summary.dead_letters,
                )

    async def _fetch(self) -> list[Msg]:
        """Waits for the first message, then takes whatever else is already there, up to the batch size.

        A single `fetch(batch, timeout)` would hold the first message back until the batch is full or the timeout
        expires (nats-py keeps a lingering pull open for the rest), adding up to the fetch timeout to the lag of
        every event at low traffic. Waiting for one message, then draining with a no-wait pull, keeps latency low
        and still forms large batches under load.
        """
        assert self._sub is not None
        s = self._settings
        try:
            # An empty long poll (a timeout) is neither a latency sample nor an error.
            async with self._deps.timed("nats", "fetch", ignore=(TimeoutError,)):
                msgs = await self._sub.fetch(1, timeout=s.projector_fetch_timeout_seconds)
        except TimeoutError:  # nats.errors.TimeoutError too: no messages within the timeout is normal
            return []
        except nats.errors.Error as exc:
            # Disconnected / reconnecting: nats-py reconnects by itself; pause briefly instead of spinning.
            log.warning("fetch from JetStream failed (%s); retrying", exc)
            await self._sleep(1.0)
            return []
        if s.projector_batch_size > 1:
            try:
                async with self._deps.timed("nats", "fetch", ignore=(TimeoutError,)):
                    msgs += await self._sub.fetch(s.projector_batch_size - 1, timeout=DRAIN_TIMEOUT_SECONDS)
            except (TimeoutError, nats.errors.Error):
                pass  # nothing more was waiting (or the connection dropped): project what we have
        return msgs

    async def _refresh_consumer_gauges(self) -> None:
        """Updates the consumer's pending counts, at most every few seconds; failures only leave them stale."""
        now = asyncio.get_running_loop().time()
        if self._js is None or (
            self._consumer_info_at is not None and now - self._consumer_info_at < CONSUMER_INFO_INTERVAL_SECONDS
        ):
            return
        self._consumer_info_at = now
        s = self._settings
        try:
            info = await self._js.consumer_info(
                s.stream_name, s.projector_durable, timeout=CONSUMER_INFO_TIMEOUT_SECONDS
            )
        except Exception as exc:  # a metric must never stop the projector (timeouts, disconnects, ...)
            log.debug("could not read the consumer info: %s", exc)
            return
        self.metrics.consumer_pending.set(info.num_pending or 0)
        self.metrics.consumer_ack_pending.set(info.num_ack_pending or 0)

    async def _wait_for_mongo(self) -> None:
        """Creates the indexes (first time) or pings, backing off until MongoDB answers or stop() is called."""
        writers = list(self._writers.values())
        assert writers
        try:
            if not self._indexes_ready:
                for writer in writers:
                    await writer.ensure_indexes()
                self._indexes_ready = True
            else:
                await writers[0].ping()
        except PyMongoError as exc:
            self._mongo_unavailable(exc)
            await self._sleep(self._mongo_backoff())
            return
        if self._mongo_attempts:
            log.info("read model (MongoDB) available again")
        self._mongo_attempts = 0
        self.stats.mongo_available = True
        self.metrics.mongo_up.set(1)

    def _mongo_unavailable(self, exc: BaseException) -> None:
        self._mongo_attempts += 1
        self.stats.mongo_failures += 1
        self.stats.mongo_available = False
        self.metrics.mongo_up.set(0)
        log.warning("read model (MongoDB) unavailable: %s", _short(exc))

    def _mongo_backoff(self) -> float:
        return exponential(
            self._mongo_attempts, MONGO_BACKOFF_BASE_SECONDS, self._settings.projector_max_backoff_seconds
        )

    async def _sleep(self, seconds: float) -> None:
        """Sleeps, but wakes up at once when stop() is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # ---- one batch ------------------------------------------------------------------------------------------

    async def process_batch(self, msgs: Sequence[Msg]) -> None:
        """Applies one fetched batch to the read model and settles every message in it.

        Each message gets a `projector.apply` span continuing the trace in its `traceparent` header; it lasts
        until the message is settled.
        """
        self.metrics.redeliveries.inc(sum(1 for msg in msgs if _num_delivered(msg) > 1))
        self._apply_spans = {id(msg): _apply_span(msg) for msg in msgs}
        try:
            await self._process_batch(msgs)
        finally:
            for span in self._apply_spans.values():
                span.end()
            self._apply_spans = {}

    async def _process_batch(self, msgs: Sequence[Msg]) -> None:
        assert self._dead_letters is not None and self._checkpoints is not None
        batches, poison, foreign = self._decode(msgs)
        try:
            await self._write_documents(batches)
            await self._write_derived_views(batches)
            all_poison = poison + [p for batch in batches.values() for p in batch.result.poison]
            await self._dead_letters.write([self._dead_letter(p) for p in all_poison])
            # Last: a checkpoint promises that every view above reflects its stream up to its version.
            async with self._deps.timed("mongodb", "checkpoints"):
                await self._checkpoints.write(checkpoints_of(batches.values()))
        except PyMongoError as exc:
            self._mongo_unavailable(exc)
            delay = self._mongo_backoff()
            await _settle_all(m.nak(delay=delay) for m in msgs)
            return

        settle: list[Any] = [m.ack() for m in foreign]
        for batch in batches.values():
            settle += self._settle_projection(batch)
        for p in all_poison:
            log.warning("dead-lettered message %s on %s: %s", _seq_text(p.msg), p.msg.subject, p.reason)
            settle.append(p.msg.term())
        await _settle_all(settle)

        duplicates = sum(len(batch.result.duplicates) for batch in batches.values())
        self.stats.record_duplicates(duplicates)
        self.stats.record_gaps(sum(batch.result.gaps for batch in batches.values()))
        self.stats.record_dead_letters(len(all_poison))
        self.metrics.duplicates.inc(duplicates)
        self.metrics.dead_letters.inc(len(all_poison))

    async def _write_documents(self, batches: dict[str, ProjectionBatch]) -> None:
        """Loads, folds and writes each projection's documents, in projection order (orders first)."""
        assert self._views is not None
        for stream_type, batch in batches.items():
            writer = self._writers[stream_type]
            # New orders get their customer's fields; that read runs alongside the documents' read.
            new_orders_of = {
                d.event.customer_id for deliveries in batch.groups.values() for d in deliveries
                if isinstance(d.event, OrderCreated)
            }  # fmt: skip
            batch.docs, known = await _both(
                self._timed("find", writer.load(batch.groups)), self._views.customer_fields(new_orders_of)
            )
            batch.result = fold(batch.projection, batch.groups, batch.docs)
            if known:
                prefill_customer_fields([c for c in batch.result.changes if c.expected_version is None], known)
            with self._bulk_write_span(batch):
                async with self._deps.timed("mongodb", "bulk_write"):
                    batch.outcome = await writer.write(batch.result.changes)

    def _bulk_write_span(self, batch: ProjectionBatch) -> Any:
        """`mongodb.bulk_write`, a child of the first applied message's span and linked to the others'."""
        spans = [
            self._apply_spans[id(d.msg)]
            for applied in batch.result.applied.values()
            for d in applied
            if id(d.msg) in self._apply_spans
        ]
        parent = trace.set_span_in_context(spans[0]) if spans else None
        return tracer().start_as_current_span(
            "mongodb.bulk_write",
            context=parent,
            kind=SpanKind.CLIENT,
            links=[Link(span.get_span_context()) for span in spans[1:]],
            attributes={
                "db.system": "mongodb",
                "db.operation.name": "bulk_write",
                "db.collection.name": batch.projection.collection,
                "cqrs.documents": len(batch.result.changes),
            },
        )

    async def _write_derived_views(self, batches: dict[str, ProjectionBatch]) -> None:
        """Customer fields onto orders and order statistics onto customers (see `projector.customer_views`).

        The two are independent (the fan-out sets customer fields, the statistics read status, totals and
        versions), so they run concurrently: one MongoDB round trip of latency instead of two.
        """
        assert self._views is not None
        fan_out: set[str] = set()
        carried: dict[str, int] = {}  # per customer: the lowest customer version this batch's new orders carry
        stats: set[str] = set()
        customers = batches.get(CUSTOMERS.stream_type)
        orders = batches.get(ORDERS.stream_type)
        if orders is not None:
            order_docs = orders.current_docs()
            for order_id, settled in orders.settled().items():
                doc = order_docs.get(order_id) or {}
                for delivery in settled:
                    if isinstance(delivery.event, OrderCreated):
                        # Again after the insert: a customer renamed since the prefill read is caught here.
                        customer_id = delivery.event.customer_id
                        fan_out.add(customer_id)
                        version = int(doc.get("customer_version") or 0)
                        carried[customer_id] = min(version, carried.get(customer_id, version))
                if not any(isinstance(delivery.event, ORDER_STATS_EVENTS) for delivery in settled):
                    continue  # lines and addresses of draft orders count in no statistic: nothing to recompute
                if doc.get("customer_id"):
                    stats.add(str(doc["customer_id"]))
        if customers is not None:
            for customer_id in customers.settled():
                fan_out.add(customer_id)
                carried.pop(customer_id, None)  # the customer changed: every order of theirs may need it
        await _both(
            self._timed("fan_out", self._views.fan_out(fan_out, carried)),
            self._timed("order_stats", self._views.recompute_order_stats(stats)),
        )

    async def _timed(self, operation: str, call: Awaitable[T]) -> T:
        async with self._deps.timed("mongodb", operation):
            return await call

    def _settle_projection(self, batch: ProjectionBatch) -> list[Any]:
        """The acks and naks of one projection's deliveries; records the applied ones in stats and metrics."""
        cap = self._settings.projector_max_backoff_seconds
        stream_type = batch.projection.stream_type
        settle: list[Any] = [d.msg.ack() for d in batch.result.duplicates]
        now = datetime.now(UTC)
        for doc_id, applied in batch.result.applied.items():
            if doc_id in batch.outcome.conflicts:
                self.stats.conflicts += 1
                log.info("%s %s changed concurrently; re-evaluating", stream_type, doc_id)
                settle += [
                    d.msg.nak(delay=exponential(_num_delivered(d.msg), CONFLICT_BACKOFF_BASE_SECONDS, cap))
                    for d in applied
                ]
            elif doc_id in batch.outcome.failed:
                log.warning(
                    "writing %s %s failed: %s; retrying later", stream_type, doc_id, batch.outcome.failed[doc_id]
                )
                settle += [d.msg.nak(delay=cap) for d in applied]
            else:
                for d in applied:
                    lag = (now - d.recorded.recorded_at).total_seconds()
                    self.stats.record_applied(lag)
                    self.metrics.lag.observe(max(0.0, lag))
                self.metrics.applied.inc(len(applied))
                settle += [d.msg.ack() for d in applied]
        settle += [
            d.msg.nak(delay=exponential(_num_delivered(d.msg), GAP_BACKOFF_BASE_SECONDS, cap))
            for d in batch.result.deferred
        ]
        return settle

    def _decode(self, msgs: Iterable[Msg]) -> tuple[dict[str, ProjectionBatch], list[Poison], list[Msg]]:
        """Splits messages into per-projection deliveries, poison messages, and events of unknown stream types."""
        batches = {stream_type: ProjectionBatch(projection) for stream_type, projection in self._projections.items()}
        poison: list[Poison] = []
        foreign: list[Msg] = []
        for msg in msgs:
            try:
                recorded = RecordedEvent.from_json(msg.data)
            except ValueError as exc:
                poison.append(Poison(msg, str(exc)))
                continue
            batch = batches.get(recorded.stream_type)
            if batch is None:
                foreign.append(msg)  # an aggregate no read model follows: not this projector's business
                continue
            if not batch.projection.handles(recorded.event_type):
                poison.append(Poison(msg, f"no handler for event type {recorded.event_type!r}"))
                continue
            try:
                event = decode_event(recorded.event_type, recorded.schema_version, recorded.payload)
            except ValueError as exc:  # UnknownEventType, MalformedEvent
                poison.append(Poison(msg, f"{type(exc).__name__}: {exc}"))
                continue
            batch.groups.setdefault(recorded.stream_id, []).append(Delivery(msg, recorded, event))
        return {t: b for t, b in batches.items() if b.groups}, poison, foreign

    def _dead_letter(self, poison: Poison) -> DeadLetter:
        msg = poison.msg
        return DeadLetter(
            stream=self._settings.stream_name,
            stream_seq=_stream_seq(msg),
            subject=msg.subject,
            reason=poison.reason,
            data=bytes(msg.data),
            headers=msg.headers,
            num_delivered=_num_delivered(msg),
        )

    # ---- NATS connection callbacks ---------------------------------------------------------------------------

    async def _on_nats_error(self, exc: Exception) -> None:
        log.warning("NATS error: %s", exc)

    async def _on_nats_disconnected(self) -> None:
        if not self._stopping.is_set():
            log.warning("disconnected from NATS; reconnecting")

    async def _on_nats_reconnected(self) -> None:
        log.info("reconnected to NATS")


async def _both(first: Awaitable[T], second: Awaitable[U]) -> tuple[T, U]:
    """Runs two independent MongoDB calls concurrently; waits for both, then raises the first failure if any."""
    a, b = await asyncio.gather(first, second, return_exceptions=True)
    if isinstance(a, BaseException):
        raise a
    if isinstance(b, BaseException):
        raise b
    return a, b


async def _settle_all(settlements: Iterable[Any]) -> None:
    """Runs ack/nak/term publishes; a failure is logged, not raised: JetStream redelivers unsettled messages."""
    for settlement in settlements:
        try:
            await settlement
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.debug("could not settle a message (it will be redelivered): %s", exc)


def _seq_text(msg: Msg) -> str:
    try:
        return f"#{_stream_seq(msg)}"
    except Exception:
        return "?"


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


async def run_projector(
    settings: ProjectorSettings,
    stop_event: asyncio.Event,
    on_started: Callable[[Projector], None] | None = None,
) -> None:
    """Runs a projector until `stop_event` is set (or its loop fails), then stops it gracefully."""
    projector = Projector(settings)
    stop_waiter = asyncio.create_task(stop_event.wait())
    try:
        # Starting waits for NATS (forever, as a deployment wants); a stop request must still end it.
        if not await _first(projector.start(), stop_waiter):
            return
        if on_started is not None:
            on_started(projector)
        await _first(projector.wait(), stop_waiter)
    finally:
        stop_waiter.cancel()
        await projector.stop()


async def _first(work: Coroutine[Any, Any, None], stop_waiter: asyncio.Task[Any]) -> bool:
    """Runs `work` until it ends (True; its error is raised) or `stop_waiter` ends first (False; work cancelled)."""
    task = asyncio.create_task(work)
    await asyncio.wait({task, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
