"""The projector loop: fetch a batch from the durable pull consumer, apply it to the read model, then ack.

Per batch:

1. decode every message (`RecordedEvent.from_json`, `decode_event`); anything undecodable is a poison message;
2. group the events by aggregate (stream id), load the current documents with one `find`;
3. fold each aggregate's events in version order onto its document (`fold`): `v <= version` is a duplicate,
   `v == version + 1` applies, `v > version + 1` is a gap: that event and the aggregate's later events in the
   batch wait (nak with delay, retried later, never skipped);
4. write all changed documents with one version-guarded bulk write, record poison messages in `dead_letters`;
5. only then settle the messages: ack what was applied or is a duplicate, nak what must be re-evaluated, term
   what was dead-lettered.

A MongoDB outage naks the batch with a bounded exponential backoff and pauses fetching until MongoDB answers
again; the version guard makes every redelivery harmless, so the loop never has to be clever about what was
written. NATS disconnects are handled by nats-py's own reconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pymongo import AsyncMongoClient
from pymongo.errors import PyMongoError

from core.envelope import RecordedEvent
from core.events import Event, decode_event
from core.jetstream import ensure_stream, event_stream_config
from core.subjects import stream_subjects
from projector.config import ProjectorSettings
from projector.dead_letters import DeadLetter, DeadLetterWriter
from projector.health import ProjectorStats
from projector.mongo_writer import Change, MongoDocument, ReadModelWriter
from projector.projections import Document, Projection
from projector.projections.orders import ORDERS

log = logging.getLogger(__name__)

# First delays of the backoffs; each doubles per attempt up to `projector_max_backoff_seconds`.
MONGO_BACKOFF_BASE_SECONDS = 0.1
GAP_BACKOFF_BASE_SECONDS = 0.25
CONFLICT_BACKOFF_BASE_SECONDS = 0.05


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    """`base * 2**(attempt-1)`, capped; attempt 1 is the first retry."""
    return float(min(cap, base * 2 ** max(0, min(attempt - 1, 30))))


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

    def __init__(self, settings: ProjectorSettings, projection: Projection = ORDERS) -> None:
        self._settings = settings
        self._projection = projection
        self.stats = ProjectorStats()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._nc: NatsClient | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self._mongo: AsyncMongoClient[MongoDocument] | None = None
        self._writer: ReadModelWriter | None = None
        self._dead_letters: DeadLetterWriter | None = None
        self._indexes_ready = False
        self._mongo_attempts = 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Connects and starts the loop.

        Waits for NATS as long as it takes (nats-py retries even the first connection forever; cancel to give
        up). MongoDB may be down: the loop waits for it before fetching anything.
        """
        s = self._settings
        # Assigned before connecting so that a start() cancelled while NATS is unreachable can still close it:
        # with infinite reconnects nats-py retries even the *first* connection forever.
        self._nc = NatsClient()
        log.info("connecting to NATS at %s", s.nats_url)
        try:
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
            js = self._nc.jetstream()
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
            self._writer = ReadModelWriter(database, self._projection)
            self._dead_letters = DeadLetterWriter(database)
        except BaseException:
            self._stopping.set()
            await self._close_connections()
            raise
        self._stopping.clear()
        self._task = asyncio.create_task(self._run(), name=f"projector-{s.projector_durable}")
        log.info(
            "projector %s consuming %s (stream %s) into %s.%s",
            s.projector_durable,
            stream_subjects(s.subject_prefix)[0],
            s.stream_name,
            s.mongo_database,
            self._projection.collection,
        )

    async def stop(self) -> None:
        """Finishes the batch in hand (write + ack), then unsubscribes and closes the connections."""
        self._stopping.set()
        if self._task is None and self._nc is None and self._mongo is None:
            return  # never started, or already stopped
        if self._task is not None:
            try:
                await self._task
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
            description=f"{self._projection.name} read model projector",
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

    # ---- the loop -------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        s = self._settings
        while not self._stopping.is_set():
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
        assert self._sub is not None
        s = self._settings
        try:
            return await self._sub.fetch(s.projector_batch_size, timeout=s.projector_fetch_timeout_seconds)
        except TimeoutError:  # nats.errors.TimeoutError too: no messages within the timeout is normal
            return []
        except nats.errors.Error as exc:
            # Disconnected / reconnecting: nats-py reconnects by itself; pause briefly instead of spinning.
            log.warning("fetch from JetStream failed (%s); retrying", exc)
            await self._sleep(1.0)
            return []

    async def _wait_for_mongo(self) -> None:
        """Creates the indexes (first time) or pings, backing off until MongoDB answers or stop() is called."""
        assert self._writer is not None
        try:
            if not self._indexes_ready:
                await self._writer.ensure_indexes()
                self._indexes_ready = True
            else:
                await self._writer.ping()
        except PyMongoError as exc:
            self._mongo_unavailable(exc)
            await self._sleep(self._mongo_backoff())
            return
        if self._mongo_attempts:
            log.info("read model (MongoDB) available again")
        self._mongo_attempts = 0
        self.stats.mongo_available = True

    def _mongo_unavailable(self, exc: BaseException) -> None:
        self._mongo_attempts += 1
        self.stats.mongo_failures += 1
        self.stats.mongo_available = False
        log.warning("read model (MongoDB) unavailable: %s", _short(exc))

    def _mongo_backoff(self) -> float:
        return backoff_delay(
            self._mongo_attempts, MONGO_BACKOFF_BASE_SECONDS, self._settings.projector_max_backoff_seconds
        )

    async def _sleep(self, seconds: float) -> None:
        """Sleeps, but wakes up at once when stop() is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # ---- one batch ------------------------------------------------------------------------------------------

    async def process_batch(self, msgs: Sequence[Msg]) -> None:
        """Applies one fetched batch to the read model and settles every message in it."""
        assert self._writer is not None and self._dead_letters is not None
        deliveries, poison, foreign = self._decode(msgs)
        groups: dict[str, list[Delivery]] = {}
        for delivery in deliveries:
            groups.setdefault(delivery.recorded.stream_id, []).append(delivery)

        try:
            docs = await self._writer.load(groups)
            result = fold(self._projection, groups, docs)
            outcome = await self._writer.write(result.changes)
            all_poison = poison + result.poison
            await self._dead_letters.write([self._dead_letter(p) for p in all_poison])
        except PyMongoError as exc:
            self._mongo_unavailable(exc)
            delay = self._mongo_backoff()
            await _settle_all(m.nak(delay=delay) for m in msgs)
            return

        cap = self._settings.projector_max_backoff_seconds
        settle: list[Any] = [m.ack() for m in foreign]
        settle += [d.msg.ack() for d in result.duplicates]
        now = datetime.now(UTC)
        for doc_id, applied in result.applied.items():
            if doc_id in outcome.conflicts:
                self.stats.conflicts += 1
                log.info("%s %s changed concurrently; re-evaluating", self._projection.stream_type, doc_id)
                settle += [
                    d.msg.nak(delay=backoff_delay(_num_delivered(d.msg), CONFLICT_BACKOFF_BASE_SECONDS, cap))
                    for d in applied
                ]
            elif doc_id in outcome.failed:
                log.warning(
                    "writing %s %s failed: %s; retrying later",
                    self._projection.stream_type,
                    doc_id,
                    outcome.failed[doc_id],
                )
                settle += [d.msg.nak(delay=cap) for d in applied]
            else:
                for d in applied:
                    self.stats.record_applied((now - d.recorded.recorded_at).total_seconds())
                settle += [d.msg.ack() for d in applied]
        settle += [
            d.msg.nak(delay=backoff_delay(_num_delivered(d.msg), GAP_BACKOFF_BASE_SECONDS, cap))
            for d in result.deferred
        ]
        for p in all_poison:
            log.warning("dead-lettered message %s on %s: %s", _seq_text(p.msg), p.msg.subject, p.reason)
            settle.append(p.msg.term())
        await _settle_all(settle)

        self.stats.record_duplicates(len(result.duplicates))
        self.stats.record_gaps(result.gaps)
        self.stats.record_dead_letters(len(all_poison))

    def _decode(self, msgs: Iterable[Msg]) -> tuple[list[Delivery], list[Poison], list[Msg]]:
        """Splits messages into decoded deliveries, poison messages, and events of other stream types."""
        deliveries: list[Delivery] = []
        poison: list[Poison] = []
        foreign: list[Msg] = []
        for msg in msgs:
            try:
                recorded = RecordedEvent.from_json(msg.data)
            except ValueError as exc:
                poison.append(Poison(msg, str(exc)))
                continue
            if recorded.stream_type != self._projection.stream_type:
                foreign.append(msg)  # another aggregate's events: not this read model's business
                continue
            if not self._projection.handles(recorded.event_type):
                poison.append(Poison(msg, f"no handler for event type {recorded.event_type!r}"))
                continue
            try:
                event = decode_event(recorded.event_type, recorded.schema_version, recorded.payload)
            except ValueError as exc:  # UnknownEventType, MalformedEvent
                poison.append(Poison(msg, f"{type(exc).__name__}: {exc}"))
                continue
            deliveries.append(Delivery(msg, recorded, event))
        return deliveries, poison, foreign

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
    projection: Projection = ORDERS,
    on_started: Callable[[Projector], None] | None = None,
) -> None:
    """Runs a projector until `stop_event` is set (or its loop fails), then stops it gracefully."""
    projector = Projector(settings, projection)
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
