"""The JetStream side of the projector: connect, bind the durable pull consumer, fetch, settle, gauges.

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
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from opentelemetry.trace import Span, SpanKind

from core.dependency_metrics import DependencyMetrics
from core.envelope import HEADER_MSG_ID, HEADER_STREAM_ID, HEADER_VERSION
from core.jetstream import ensure_stream, event_stream_config
from core.subjects import stream_subjects
from core.tracing import extract_context, tracer
from projector.config import ProjectorSettings
from projector.metrics import ProjectorMetrics
from projector.pipeline import BatchOutcome

log = logging.getLogger(__name__)

# The consumer's pending counts are a metric, not worth a request per batch.
CONSUMER_INFO_INTERVAL_SECONDS = 2.0
CONSUMER_INFO_TIMEOUT_SECONDS = 1.0
# Budget for the no-wait drain after the first message of a batch (one round trip to nats-server).
DRAIN_TIMEOUT_SECONDS = 0.005


class JetStreamConsumer:
    """One durable pull consumer shared by every replica of a projector."""

    def __init__(self, settings: ProjectorSettings, deps: DependencyMetrics, metrics: ProjectorMetrics) -> None:
        self._settings = settings
        self._deps = deps
        self._metrics = metrics
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._sub: JetStreamContext.PullSubscription | None = None
        self.stopping = False

    @property
    def connected(self) -> bool:
        return self._nc is not None

    async def connect(self, description: str) -> None:
        """Connects (waiting for NATS as long as it takes), makes sure the stream and the consumer exist, binds."""
        s = self._settings
        # Assigned before connecting so that a connect cancelled while NATS is unreachable can still close it:
        # with infinite reconnects nats-py retries even the *first* connection forever.
        self._nc = NatsClient()
        log.info("connecting to NATS at %s", s.nats_url)
        await self._nc.connect(
            servers=s.nats_url,
            name=f"projector-{s.projector_durable}",
            connect_timeout=2,
            reconnect_time_wait=1,
            max_reconnect_attempts=-1,
            error_cb=self._on_error,
            disconnected_cb=self._on_disconnected,
            reconnected_cb=self._on_reconnected,
        )
        js = self._js = self._nc.jetstream()
        await ensure_stream(js, event_stream_config(s.stream_name, s.subject_prefix))
        await js.add_consumer(s.stream_name, self.config(description))
        self._sub = await js.pull_subscribe_bind(durable=s.projector_durable, stream=s.stream_name)

    def config(self, description: str) -> ConsumerConfig:
        s = self._settings
        return ConsumerConfig(
            name=s.projector_durable,
            durable_name=s.projector_durable,
            description=description,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.projector_ack_wait_seconds,
            max_ack_pending=s.projector_max_ack_pending,
            deliver_policy=DeliverPolicy.ALL,
            filter_subject=stream_subjects(s.subject_prefix)[0],
        )

    async def fetch(self) -> list[Msg]:
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
            await asyncio.sleep(1.0)
            return []
        if s.projector_batch_size > 1:
            try:
                async with self._deps.timed("nats", "fetch", ignore=(TimeoutError,)):
                    msgs += await self._sub.fetch(s.projector_batch_size - 1, timeout=DRAIN_TIMEOUT_SECONDS)
            except (TimeoutError, nats.errors.Error):
                pass  # nothing more was waiting (or the connection dropped): project what we have
        return msgs

    async def settle(self, outcome: BatchOutcome) -> None:
        """Acks, naks (with their delays) and terms of one batch."""
        calls: list[Awaitable[None]] = [m.ack() for m in outcome.ack]
        calls += [m.nak(delay=delay) for m, delay in outcome.nak]
        calls += [m.term() for m in outcome.term]
        await settle_all(calls)

    async def refresh_gauges(self) -> None:
        """The consumer's pending counts, every few seconds; failures only leave them stale (a supervised loop)."""
        s = self._settings
        while True:
            if self._js is not None:
                try:
                    info = await self._js.consumer_info(
                        s.stream_name, s.projector_durable, timeout=CONSUMER_INFO_TIMEOUT_SECONDS
                    )
                except Exception as exc:  # a metric must never stop the projector (timeouts, disconnects, ...)
                    log.debug("could not read the consumer info: %s", exc)
                else:
                    self._metrics.consumer_pending.set(info.num_pending or 0)
                    self._metrics.consumer_ack_pending.set(info.num_ack_pending or 0)
            await asyncio.sleep(CONSUMER_INFO_INTERVAL_SECONDS)

    async def close(self) -> None:
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
        self._js = None

    async def _on_error(self, exc: Exception) -> None:
        log.warning("NATS error: %s", exc)

    async def _on_disconnected(self) -> None:
        if not self.stopping:
            log.warning("disconnected from NATS; reconnecting")

    async def _on_reconnected(self) -> None:
        log.info("reconnected to NATS")


async def settle_all(settlements: Iterable[Awaitable[None]]) -> None:
    """Runs ack/nak/term publishes; a failure is logged, not raised: JetStream redelivers unsettled messages."""
    for settlement in settlements:
        try:
            await settlement
        except (nats.errors.Error, nats.js.errors.Error) as exc:
            log.debug("could not settle a message (it will be redelivered): %s", exc)


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
