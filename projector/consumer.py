"""The JetStream side of the projector: connect, bind durable pull consumers (shared or per partition), fetch,
settle, gauges.

NATS disconnects are handled by nats-py's own reconnect; a fetch that fails meanwhile returns nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Iterable

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy, StreamConfig
from opentelemetry.trace import Span, SpanKind

from core.backoff import full_jitter
from core.dependency_metrics import DependencyMetrics
from core.envelope import HEADER_MSG_ID, HEADER_STREAM_ID, HEADER_VERSION
from core.error_text import describe_error
from core.jetstream import JETSTREAM_UNAVAILABLE, ensure_stream, event_stream_config, nats_servers, stream_partitions
from core.log_throttle import LogThrottle
from core.nats_callbacks import NatsConnectionLog
from core.subjects import partition_filter, stream_subjects
from core.tracing import extract_context, tracer, tracing_active
from projector.config import ProjectorSettings
from projector.metrics import ProjectorMetrics
from projector.nats_client import ProjectorNatsClient
from projector.settlement import BatchOutcome

log = logging.getLogger(__name__)
# Every partition's source retries once a second while NATS is away, and the start asks for the stream again while
# JetStream cannot answer: one line per 10 s of each.
_jetstream_failures = LogThrottle()
# The first wait before asking JetStream again for the stream (doubling up to the projector's max backoff).
STREAM_RETRY_BASE_SECONDS = 0.5

# The consumer's pending counts are a metric, not worth a request per batch.
CONSUMER_INFO_INTERVAL_SECONDS = 2.0
CONSUMER_INFO_TIMEOUT_SECONDS = 1.0
# Budget for the no-wait drain after the first message of a batch (one round trip to nats-server).
DRAIN_TIMEOUT_SECONDS = 0.005
# Closing a source waits this long for deliveries in flight before handing its buffered messages back.
LEFTOVER_GRACE_SECONDS = 0.05


# The source of messages outside every partition (subjects no event has): see `JetStreamConsumer.config`.
STRAYS = -1


def partition_durable(durable: str, partition: int | None) -> str:
    """The durable consumer of one partition (`<durable>-p<k>`), of the strays (`<durable>-strays`), or the shared
    one (`partition` None)."""
    if partition is None:
        return durable
    return f"{durable}-strays" if partition == STRAYS else f"{durable}-p{partition}"


async def group_consumers(js: JetStreamContext, stream: str, durable: str) -> list[ConsumerInfo]:
    """The consumers of a projector group: the shared durable and every partition's (what exists of them)."""
    infos: list[ConsumerInfo] = await js.consumers_info(stream)
    prefix = durable + "-p"
    return [
        info
        for info in infos
        if info.name in (durable, f"{durable}-strays")
        or (info.name.startswith(prefix) and info.name[len(prefix) :].isdigit())
    ]


class PullSource:
    """One durable pull consumer: the one every replica shares (`partition` None), or one partition's."""

    def __init__(
        self,
        sub: JetStreamContext.PullSubscription,
        durable: str,
        partition: int | None,
        settings: ProjectorSettings,
        deps: DependencyMetrics,
    ) -> None:
        self._sub = sub
        self.durable = durable
        self.partition = partition
        self._settings = settings
        self._deps = deps

    async def fetch(self) -> list[Msg]:
        """Waits for the first message, then takes whatever else is already there, up to the batch size.

        A single `fetch(batch, timeout)` holds the first message back until the batch is full or the timeout
        expires in nats-py up to 2.14 (adding up to the fetch timeout to the lag of every event at low traffic);
        from 2.15 it returns the first message at once but leaves its pull open for the rest until the timeout, so
        messages could still be delivered to a source after its partition was handed over.
        Waiting for one message, then draining with a no-wait pull, keeps latency low with either, leaves no pull
        open for long, and still forms large batches under load. (A 1 ms drain budget instead of 5 ms measured the
        same: `bench.setting_ab`, 60 commands/s, time-to-queryable p50 1.01x.)
        """
        s = self._settings
        try:
            # An empty long poll (a timeout) is neither a latency sample nor an error.
            async with self._deps.timed("nats", "fetch", ignore=(TimeoutError,)):
                msgs = await self._sub.fetch(1, timeout=s.projector_fetch_timeout_seconds)
        except TimeoutError:  # nats.errors.TimeoutError too: no messages within the timeout is normal
            return []
        except nats.errors.Error as exc:
            # Disconnected / reconnecting: nats-py reconnects by itself; pause briefly instead of spinning.
            _jetstream_failures.log(
                log, logging.WARNING, "fetch", "fetch from JetStream (%s) failed (%s); retrying", self.durable, exc
            )
            await asyncio.sleep(1.0)
            return []
        if s.projector_batch_size > 1:
            try:
                async with self._deps.timed("nats", "fetch", ignore=(TimeoutError,)):
                    msgs += await self._sub.fetch(s.projector_batch_size - 1, timeout=DRAIN_TIMEOUT_SECONDS)
            except (TimeoutError, nats.errors.Error):
                pass  # nothing more was waiting (or the connection dropped): project what we have
        return msgs

    async def close(self) -> None:
        """Stops pulling (the durable consumer stays, with its acknowledged position, for the next owner).

        Messages the server delivered after the last fetch stopped waiting (the tail of a no-wait drain, say) sit
        in the subscription's buffer: they are handed back (nak without delay) so that the next owner gets them at
        once instead of after the ack wait."""
        leftovers: list[Msg] = []
        with contextlib.suppress(Exception):
            await asyncio.sleep(LEFTOVER_GRACE_SECONDS)  # let deliveries already on the wire arrive
            while self._sub.pending_msgs > 0 and len(leftovers) < self._settings.projector_batch_size:
                leftovers += await self._sub.fetch(1, timeout=LEFTOVER_GRACE_SECONDS)
        await settle_all(m.nak() for m in leftovers)
        with contextlib.suppress(Exception):
            await self._sub.unsubscribe()


class JetStreamConsumer:
    """The projector's NATS connection, the stream, and its pull sources (the shared one or partitions')."""

    def __init__(self, settings: ProjectorSettings, deps: DependencyMetrics, metrics: ProjectorMetrics) -> None:
        self._settings = settings
        self._deps = deps
        self._metrics = metrics
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._description = ""
        self.sources: dict[int | None, PullSource] = {}
        # Partitions of the stream (from its subject mapping); 0: a stream without one, consumed shared.
        self.partitions = 0
        self.stopping = False
        self._connection_log = NatsConnectionLog(log, "projector", stopping=lambda: self.stopping)

    @property
    def connected(self) -> bool:
        return self._nc is not None

    async def connect(self, description: str) -> None:
        """Connects (waiting for NATS as long as it takes) and makes sure the stream exists; learns its partitions."""
        s = self._settings
        self._description = description
        # Assigned before connecting so that a connect cancelled while NATS is unreachable can still close it:
        # with infinite reconnects nats-py retries even the *first* connection forever.
        self._nc = ProjectorNatsClient()
        log.info("connecting to NATS at %s", s.nats_url)
        await self._nc.connect(
            servers=nats_servers(s.nats_url),
            name=f"projector-{s.projector_durable}",
            connect_timeout=2,
            reconnect_time_wait=1,
            max_reconnect_attempts=-1,
            error_cb=self._connection_log.error,
            disconnected_cb=self._connection_log.disconnected,
            reconnected_cb=self._connection_log.reconnected,
        )
        js = self._js = self._nc.jetstream()
        wanted = event_stream_config(
            s.stream_name, s.subject_prefix, partitions=s.stream_partitions, replicas=s.stream_replicas
        )
        self.partitions = stream_partitions(await self._stream_when_available(js, wanted))
        self._metrics.stream_partitions.set(self.partitions)

    async def _stream_when_available(self, js: JetStreamContext, wanted: StreamConfig) -> StreamConfig:
        """`ensure_stream`, asked again (with backoff, as long as it takes) while JetStream cannot answer: a
        replica started while its cluster has no quorum waits for it instead of exiting."""
        attempt = 0
        while True:
            try:
                return await ensure_stream(js, wanted)
            except JETSTREAM_UNAVAILABLE as exc:
                attempt += 1
                _jetstream_failures.log(
                    log, logging.WARNING, "stream", "JetStream is unavailable to read stream %s (%s): a cluster "
                    "electing its leaders, or without a quorum; asking again", wanted.name, describe_error(exc),
                )  # fmt: skip
                cap = self._settings.projector_max_backoff_seconds
                await asyncio.sleep(full_jitter(attempt + 1, STREAM_RETRY_BASE_SECONDS, cap))

    def config(self, partition: int | None) -> ConsumerConfig:
        """The shared consumer takes every subject; a partition's, its own; the strays', what no partition maps: a
        one-token subject or one of four tokens and more (they carry no event: the projector dead-letters them).
        A three-token subject that is not `<partition>.<type>.<id>` cannot be filtered apart: `cqrs verify` is
        what reports such a message."""
        s = self._settings
        durable = partition_durable(s.projector_durable, partition)
        prefix = s.subject_prefix
        subject: str | None = stream_subjects(prefix)[0]
        subjects: list[str] | None = None
        if partition == STRAYS:
            subject, subjects = None, [f"{prefix}.*", f"{prefix}.*.*.*.>"]
        elif partition is not None:
            subject = partition_filter(partition, prefix)
        return ConsumerConfig(
            name=durable,
            durable_name=durable,
            description=self._description,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.projector_ack_wait_seconds,
            max_ack_pending=s.projector_max_ack_pending,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=subject,
            filter_subjects=subjects,
        )

    async def open_source(self, partition: int | None) -> PullSource:
        """Makes sure the durable consumer exists (shared, or the partition's) and binds a pull subscription."""
        assert self._js is not None, "not connected"
        s = self._settings
        config = self.config(partition)
        assert config.durable_name is not None
        async with self._deps.timed("nats", "bind"):
            await self._js.add_consumer(s.stream_name, config)
            sub = await self._js.pull_subscribe_bind(durable=config.durable_name, stream=s.stream_name)
        source = self.sources[partition] = PullSource(sub, config.durable_name, partition, s, self._deps)
        return source

    async def close_source(self, source: PullSource) -> None:
        if self.sources.get(source.partition) is source:
            del self.sources[source.partition]
        await source.close()

    async def refresh_gauges(self) -> None:
        """The pending counts of the consumers this replica pulls from, every few seconds; failures only leave
        them stale (a supervised loop)."""
        s = self._settings
        while True:
            if self._js is not None:
                try:
                    pending = ack_pending = 0
                    for source in list(self.sources.values()):
                        info = await self._js.consumer_info(
                            s.stream_name, source.durable, timeout=CONSUMER_INFO_TIMEOUT_SECONDS
                        )
                        pending += info.num_pending or 0
                        ack_pending += info.num_ack_pending or 0
                except Exception as exc:  # a metric must never stop the projector (timeouts, disconnects, ...)
                    log.debug("could not read the consumer info: %s", exc)
                else:
                    self._metrics.consumer_pending.set(pending)
                    self._metrics.consumer_ack_pending.set(ack_pending)
            await asyncio.sleep(CONSUMER_INFO_INTERVAL_SECONDS)

    async def close(self) -> None:
        for source in list(self.sources.values()):
            await self.close_source(source)
        if self._nc is not None:
            # Flush so the acks of the last batch leave before the socket closes.
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=2)
            with contextlib.suppress(Exception):
                await self._nc.close()
            self._nc = None
        self._js = None


async def settle_outcome(outcome: BatchOutcome) -> None:
    """Acks, naks (with their delays) and terms of one batch (its messages may come from several consumers)."""
    calls: list[Awaitable[None]] = [m.ack() for m in outcome.ack]
    calls += [m.nak(delay=delay) for m, delay in outcome.nak]
    calls += [m.term() for m in outcome.term]
    await settle_all(calls)


async def settle_all(settlements: Iterable[Awaitable[None]]) -> None:
    """Runs ack/nak/term publishes; a failure is logged, not raised: JetStream redelivers unsettled messages."""
    for settlement in settlements:
        try:
            await settlement
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.debug("could not settle a message (it will be redelivered): %s", exc)


def apply_spans(msgs: Iterable[Msg]) -> dict[int, Span]:
    """A `projector.apply` span per message (by `id(msg)`); none when tracing is off, where each would be a no-op
    that still cost a header copy, a context extraction and a proxy tracer per message."""
    return {id(msg): apply_span(msg) for msg in msgs} if tracing_active() else {}


def apply_span(msg: Msg) -> Span:
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
