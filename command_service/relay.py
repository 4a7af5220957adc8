"""Outbox relay: publishes committed events to JetStream, deleting each outbox row only after its JetStream ack.

Exactly one relay is active across all command_service replicas (a session-level advisory lock held on a
dedicated connection); the others wait on standby and take over when that connection dies. The relay keeps no
high-water mark: it always reads whatever outbox rows exist, in position order, so a transaction that committed
late with a lower position is simply picked up on the next pass (never lost). A crash between the ack and the
delete re-publishes the event; `Nats-Msg-Id` dedupes it in JetStream and the projector's version guard makes it
harmless beyond the duplicate window.

That is also why the deletes cost little: they need no durability (a delete lost to a PostgreSQL crash only
re-publishes, deduped), so the relay's connection commits asynchronously; and a fully acked batch's delete rides
on the next outbox read, in the same statement, when that read comes within `delete_linger` (under load it
always does): one PostgreSQL round trip per batch instead of two. Published rows stay in the outbox that long at
most; an idle relay deletes them on their own.

Each read and each publish costs about the same whether it carries one commit or fifty (a round trip, a socket
write, the wake-ups), so while commits keep coming the relay reads at most once per `fetch_interval`, and one read
takes the commits of that interval; the first commit after a quiet spell is read at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import asyncpg
import nats
import nats.errors
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.api import PubAck
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Gauge

from command_service.event_store import OUTBOX_CHANNEL, recorded_event_from_row
from command_service.outages import CONNECTION_LOST
from command_service.relay_lease import LeaseLost, RelayLease, Session
from core.backoff import full_jitter
from core.dependency_metrics import dependency_metrics
from core.failpoints import failpoint
from core.jetstream import ensure_stream, event_stream_config, nats_servers
from core.nats_callbacks import NatsConnectionLog
from core.stage_metrics import StageMetrics
from core.subjects import DEFAULT_PARTITIONS, event_subject
from core.supervisor import first_to_finish
from core.tracing import context_from_traceparent, inject_headers, tracer

log = logging.getLogger(__name__)

RETRY_BASE_SECONDS = 0.1
# A pass stops waiting for its acks once none has come for this long while some are missing: a stream leader that
# steps down (a node restarted, even gracefully) drops the publishes in flight, whose acks never come, and waiting
# the whole publish timeout for them held every later event back that long. Healthy acks come within milliseconds.
ACK_STALL_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class RelaySettings:
    stream_name: str
    subject_prefix: str
    stream_partitions: int = DEFAULT_PARTITIONS
    stream_replicas: int = 1
    batch_size: int = 500
    poll_interval: float = 1.0
    publish_timeout: float = 5.0
    max_backoff: float = 5.0
    # A frozen or cut-off active relay loses the lease after this long (see relay_lease); failover takes about
    # this plus one poll interval.
    lease_seconds: float = 15.0
    # Bounds of the NATS client: un-acked async publishes in flight, and bytes buffered while reconnecting.
    publish_max_pending: int = 4000
    nats_pending_bytes: int = 2 * 1024 * 1024
    # How long an acked batch's delete waits for the next outbox read to ride on (see the module docstring).
    delete_linger: float = 0.05
    # The shortest time between two outbox reads while commits keep coming (0: none; see the module docstring). At
    # one commit per read the relay costs about half as much CPU per command as serving the command itself.
    fetch_interval: float = 0.0


# The outbox read, which also deletes what the previous batch published ($2, maybe empty). The read sees the
# statement's snapshot, from before its own delete, hence the explicit exclusion.
FETCH_SQL = """
    WITH published AS (DELETE FROM outbox WHERE position = ANY($2::bigint[]))
    SELECT e.position, e.event_id, e.stream_type, e.stream_id, e.version, e.event_type,
           e.schema_version, e.payload::text AS payload, e.metadata::text AS metadata, e.recorded_at
      FROM outbox o JOIN events e ON e.position = o.position
     WHERE o.position <> ALL($2::bigint[])
     ORDER BY o.position LIMIT $1"""
DELETE_SQL = "DELETE FROM outbox WHERE position = ANY($1::bigint[])"


class OutboxRelay:
    """Runs until `stop()`; survives PostgreSQL and NATS outages by backing off and retrying.

    Unexpected errors propagate: the command service runs `run()` under a `core.supervisor.Supervisor`, which
    logs them and starts it again.
    """

    def __init__(
        self, dsn: str, nats_url: str, settings: RelaySettings, registry: CollectorRegistry | None = None
    ) -> None:
        self._dsn = dsn
        self._deps = dependency_metrics(registry)
        self.stages = StageMetrics(
            "cqrs_relay_stage_seconds", "Seconds an event or a batch spends in each stage of the relay", registry
        )
        self._nats_url = nats_url
        self._settings = settings
        self._nc: NATS | None = None
        self._js: JetStreamContext | None = None
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._connection_log = NatsConnectionLog(log, "outbox relay", stopping=self._stopping.is_set)
        self._previous_session: Session | None = None
        self._last_progress = time.monotonic()
        # Alerting counts the replicas that relay: none for a while means committed events stop reaching NATS.
        self._active = Gauge(
            "cqrs_relay_active",
            "1 while this replica holds the relay lease and relays the outbox (exactly one replica should)",
            registry=self.stages.registry,
        )
        self.is_leader = False
        self.published_total = 0

    @property
    def is_leader(self) -> bool:
        return self._is_leader

    @is_leader.setter
    def is_leader(self, value: bool) -> None:
        self._is_leader = value
        self._active.set(1 if value else 0)

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    def stalled_for(self) -> float:
        """Seconds since the relay last made progress (a standby's lock attempt counts as progress)."""
        return time.monotonic() - self._last_progress

    async def run(self) -> None:
        """Connects to NATS (retrying; commands keep working meanwhile), then relays until stopped."""
        self._last_progress = time.monotonic()
        try:
            await self._connect_nats()
            await self._relay_while_running()
        finally:
            self.is_leader = False
            await self._close_nats()

    async def _close_nats(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), timeout=5.0)

    async def _connect_nats(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            nc: NATS | None = None
            try:
                nc = await nats.connect(
                    nats_servers(self._nats_url),
                    connect_timeout=2,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,  # after the first connect, nats-py reconnects by itself
                    reconnect_time_wait=1,
                    pending_size=self._settings.nats_pending_bytes,
                    name="command_service-relay",
                    error_cb=self._connection_log.error,
                    disconnected_cb=self._connection_log.disconnected,
                    reconnected_cb=self._connection_log.reconnected,
                )
                js = nc.jetstream(
                    timeout=self._settings.publish_timeout,
                    publish_async_max_pending=self._settings.publish_max_pending,
                )
                s = self._settings
                await ensure_stream(
                    js,
                    event_stream_config(
                        s.stream_name, s.subject_prefix, partitions=s.stream_partitions, replicas=s.stream_replicas
                    ),
                )
                self._nc, self._js = nc, js
                log.info("outbox relay connected to JetStream (NATS)")
                return
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                failures += 1
                log.warning("outbox relay: JetStream (NATS) unavailable: %r; retrying", exc)
                if nc is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(nc.close(), timeout=2.0)
                await self._sleep(full_jitter(failures + 1, RETRY_BASE_SECONDS, self._settings.max_backoff))

    async def _reconnect_nats(self) -> None:
        """A fresh connection and JetStream context after a pass that was not fully acked.

        nats-py's publish_async keeps a pending-ack permit (and a future nobody completes) when the publish itself
        fails after taking it, e.g. with the client's buffer full during a reconnect; enough of those and the
        context refuses every publish even with NATS back. A new context starts with all its permits.
        """
        await self._close_nats()
        await self._connect_nats()

    async def _relay_while_running(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            lease = RelayLease(self._dsn, self._settings.lease_seconds, self._previous_session)
            try:
                await self._lead(lease)
                failures = 0
            except LeaseLost as exc:
                failures += 1
                log.warning("outbox relay: lost the relay lease (%s); this replica stops relaying for now", exc)
            except CONNECTION_LOST as exc:
                failures += 1
                log.warning("outbox relay: event store (PostgreSQL) unavailable: %r; retrying", exc)
            finally:
                if self.is_leader:
                    log.info("outbox relay: this replica is no longer the active relay")
                self.is_leader = False
                self._previous_session = lease.session
                await lease.release()
            if failures:
                await self._sleep(full_jitter(failures + 1, RETRY_BASE_SECONDS, self._settings.max_backoff))

    async def _lead(self, lease: RelayLease) -> None:
        """Holds the lease and relays until stopped or the lease is lost (both end this call)."""

        def stopping() -> bool:
            self._last_progress = time.monotonic()  # a standby polling the lock is healthy
            return self._stopping.is_set()

        if not await lease.acquire(self._settings.poll_interval, stopping):
            return
        self.is_leader = True
        log.info("outbox relay active (this replica holds the relay lease)")
        # Asynchronous commits: this connection only deletes published rows (see the module docstring).
        conn: asyncpg.Connection = await asyncpg.connect(
            self._dsn, timeout=5.0, server_settings={"synchronous_commit": "off"}
        )
        try:
            await asyncio.wait_for(conn.add_listener(OUTBOX_CHANNEL, self._on_notify), timeout=5.0)
            await first_to_finish(self._relay_loop(conn), lease.hold())
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2.0)

    def _on_notify(self, *_: Any) -> None:
        self._wake.set()

    async def _relay_loop(self, conn: asyncpg.Connection) -> None:
        nats_failures = 0
        published: list[int] = []  # acked, still in the outbox: deleted by the next read
        fetched_at = -float("inf")  # when the last read that found rows (not a full batch) started
        while not self._stopping.is_set():
            if published and (pause := fetched_at + self._settings.fetch_interval - time.monotonic()) > 0:
                await self._sleep(pause)  # commits keep coming: let the interval's gather
            self._wake.clear()
            read_started = time.monotonic()
            async with self._deps.timed("postgres", "outbox_fetch"):
                rows = await conn.fetch(FETCH_SQL, self._settings.batch_size, published, timeout=10.0)
            self.published_total += len(published)
            published = []
            if not rows:
                self._last_progress = time.monotonic()
                await self._wait_for_work()
                continue
            fetched_at = read_started
            read_at = time.time()
            for row in rows:
                self.stages.observe("commit_to_read", read_at - row["recorded_at"].timestamp())
            failpoint("relay.after_commit_before_publish")
            started = time.monotonic()
            async with self._deps.timed("nats", "publish_batch"):  # until the last ack (or the publish timeout)
                acked = await self._publish(rows)
            self.stages.observe("publish", time.monotonic() - started)
            if acked:
                failpoint("relay.after_ack_before_delete")
            if len(acked) < len(rows):  # _publish does not raise: a batch not fully acked is the failure
                self._deps.error("nats", "publish_batch")
                await self._delete(conn, acked)
                nats_failures += 1
                await self._sleep(full_jitter(nats_failures + 1, RETRY_BASE_SECONDS, self._settings.max_backoff))
                await self._reconnect_nats()
                continue
            nats_failures = 0
            self._last_progress = time.monotonic()
            published = acked
            if len(rows) == self._settings.batch_size:
                fetched_at = -float("inf")  # a backlog: read on at once
                continue  # the delete rides on that read
            if await self._wait_for_work(self._settings.delete_linger):
                continue  # more committed: the delete rides on the next read
            # Idle: delete on its own, then wait for the next commit. The fetch took everything committed
            # before it; a later commit notifies (a NOTIFY is delivered only once its rows are visible), so an
            # empty fetch now would be a wasted round trip.
            await self._delete(conn, published)
            published = []
            await self._wait_for_work()
        # Stopped: leave nothing published behind (after an error or a lost lease the rows are simply published
        # again by whoever relays next, and deduped).
        await self._delete(conn, published)

    async def _delete(self, conn: asyncpg.Connection, positions: list[int]) -> None:
        """Deletes published rows from the outbox on their own (when no outbox read follows at once)."""
        if not positions:
            return
        started = time.monotonic()
        async with self._deps.timed("postgres", "outbox_delete"):
            await conn.execute(DELETE_SQL, positions, timeout=10.0)
        self.stages.observe("delete", time.monotonic() - started)
        self.published_total += len(positions)

    async def _publish(self, rows: list[Any]) -> list[int]:
        """Publishes rows in position order (one connection keeps their order); returns the acked positions."""
        assert self._js is not None
        events = [recorded_event_from_row(row) for row in rows]
        futures: list[asyncio.Future[PubAck]] = []
        spans: list[Span] = []
        try:
            for event in events:
                subject = event_subject(event.stream_type, event.stream_id, self._settings.subject_prefix)
                # Continues the command's trace (its traceparent was stored with the event); the message carries
                # this span's context on to the projector.
                span = tracer().start_span(
                    "jetstream.publish",
                    context=context_from_traceparent(event.metadata.traceparent),
                    kind=SpanKind.PRODUCER,
                    attributes={
                        "messaging.system": "nats",
                        "messaging.destination.name": subject,
                        "messaging.message.id": str(event.event_id),
                        "cqrs.stream_id": event.stream_id,
                        "cqrs.version": event.version,
                        "cqrs.position": event.position,
                    },
                )
                spans.append(span)
                headers = event.headers()
                inject_headers(headers, context=trace.set_span_in_context(span))
                futures.append(
                    await self._js.publish_async(
                        subject,
                        event.to_json(),
                        wait_stall=self._settings.publish_timeout,
                        stream=self._settings.stream_name,
                        headers=headers,
                    )
                )
        except (nats.errors.Error, OSError) as exc:
            log.warning("outbox relay: JetStream (NATS) unavailable: %r; will retry", exc)
        acked: list[int] = []
        try:
            if not futures:
                return acked
            await _acks(futures, self._settings.publish_timeout)
            for fut in futures:
                if not fut.done():
                    fut.cancel()
            first_error: BaseException | None = None
            for event, fut, span in zip(events, futures, spans, strict=False):
                if not fut.cancelled() and fut.exception() is None:
                    acked.append(event.position)
                    span.set_attribute("messaging.nats.stream_sequence", fut.result().seq)
                else:
                    error = TimeoutError() if fut.cancelled() else fut.exception()
                    span.set_status(Status(StatusCode.ERROR, repr(error)))
                    if first_error is None:
                        first_error = error
            if first_error is not None:
                log.warning(
                    "outbox relay: JetStream (NATS) did not ack %d of %d events (%r); they stay in the outbox",
                    len(events) - len(acked),
                    len(events),
                    first_error,
                )
            return acked
        finally:
            for span in spans:
                span.end()

    async def _wait_for_work(self, timeout: float | None = None) -> bool:
        """Waits for a NOTIFY (or stop) up to `timeout` (default: the poll interval); True if one came."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                self._wake.wait(), timeout=self._settings.poll_interval if timeout is None else timeout
            )
            return True
        return False

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)


async def _acks(futures: list[asyncio.Future[PubAck]], timeout: float) -> None:
    """Waits until every publish of a pass is answered, `timeout` passes, or none is answered for
    `ACK_STALL_SECONDS` while some are still missing (see there)."""
    loop = asyncio.get_running_loop()
    everything = loop.create_future()
    missing = len(futures)
    last_answer = started = loop.time()

    def answered(_: asyncio.Future[PubAck]) -> None:
        nonlocal missing, last_answer
        missing -= 1
        last_answer = loop.time()
        if missing == 0 and not everything.done():
            everything.set_result(None)

    for fut in futures:
        fut.add_done_callback(answered)
    try:
        while not everything.done():
            wake = min(started + timeout, last_answer + ACK_STALL_SECONDS)
            if wake <= loop.time():
                return
            await asyncio.wait({everything}, timeout=wake - loop.time())
    finally:
        for fut in futures:
            fut.remove_done_callback(answered)
