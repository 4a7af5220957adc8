"""Reading the JetStream stream for `cqrs verify`: in order, through an ephemeral pull consumer that needs no acks,
each request bounded, and asked again while a cluster has no leader."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamInfo

from core.backoff import exponential
from core.envelope import RecordedEvent
from core.error_text import describe_error
from core.subjects import stream_subjects
from cqrsctl.verify.sources import EventRef

T = TypeVar("T")

# A JetStream cluster answers its API with 503, or not at all, while it has no leader (a node just restarted, a lost
# quorum): seconds, usually. Verify waits that out for up to its timeout, each request given this long at most (one
# answered at all answers in milliseconds) and asked again after a backoff.
JETSTREAM_API_ATTEMPT_SECONDS = 3.0
JETSTREAM_RETRY_BASE_SECONDS = 0.2
JETSTREAM_RETRY_CAP_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class StreamMessage:
    """One stream message as verify sees it: the event it claims to carry, or why it carries none."""

    seq: int
    subject: str
    timestamp: datetime | None
    event: EventRef | None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StreamFacts:
    messages: int
    first_seq: int
    last_seq: int
    max_age_seconds: float  # 0: no age limit
    count_limited: bool  # max_msgs / max_bytes may discard old messages too


def parse_message(seq: int, subject: str, timestamp: datetime | None, data: bytes) -> StreamMessage:
    """Reads the event envelope a message carries (the body is what the projector applies)."""
    try:
        recorded = RecordedEvent.from_json(data)
    except ValueError as exc:
        return StreamMessage(seq, subject, timestamp, None, str(exc))
    ref = EventRef(recorded.position, recorded.event_id, recorded.stream_id, recorded.version)
    return StreamMessage(seq, subject, timestamp, ref)


class JetStreamUnavailable(Exception):
    """JetStream answered 503, or did not answer, for the whole of verify's timeout."""


async def while_jetstream_elects(
    call: Callable[[], Awaitable[T]], what: str, budget_seconds: float, *, retry_timeouts: bool = True
) -> T:
    """`call()` (a JetStream request), asked again with backoff while JetStream is unavailable: a 503 or no
    responders (nats-py raises `ServiceUnavailableError` for both) or, with `retry_timeouts`, no answer in time;
    for up to `budget_seconds`, then `JetStreamUnavailable` saying so. (A pull's timeout is an answer: nothing
    more to read.)"""
    deadline = time.monotonic() + budget_seconds
    attempt = 0
    retried: tuple[type[Exception], ...] = (nats.js.errors.ServiceUnavailableError,)
    if retry_timeouts:
        retried += (nats.errors.TimeoutError, TimeoutError)
    while True:
        try:
            return await call()
        except retried as exc:
            attempt += 1
            delay = exponential(attempt, JETSTREAM_RETRY_BASE_SECONDS, JETSTREAM_RETRY_CAP_SECONDS)
            if time.monotonic() + delay > deadline:
                raise JetStreamUnavailable(
                    f"JetStream was unavailable for {budget_seconds:g}s ({attempt} tries) to {what}: "
                    f"{describe_error(exc)} (a cluster without a leader, or a server without JetStream)"
                ) from exc
            await asyncio.sleep(delay)


class StreamScanner:
    """Reads the stream in order through an ephemeral pull consumer that needs no acks.

    `fetch` returns batches up to the stream's last message as of `open` (or of the latest `refresh`), then [];
    so a stream that keeps growing under load cannot keep verify reading forever.
    """

    def __init__(
        self, js: JetStreamContext, stream_name: str, subject_prefix: str, batch_size: int, timeout: float
    ) -> None:
        self._js = js
        self._stream = stream_name
        self._subject = stream_subjects(subject_prefix)[0]
        self._batch = batch_size
        self._timeout = timeout
        self._sub: JetStreamContext.PullSubscription | None = None
        self._pending: int | None = None  # messages after the last one delivered (None: unknown)
        self._seen_seq = 0  # stream sequence of the last message delivered
        self._until = 0  # read up to this stream sequence

    async def open(self) -> StreamFacts | None:
        """Creates the consumer; None when the stream does not exist (then every event counts as missing)."""
        try:
            info = await self._stream_info()
        except nats.js.errors.NotFoundError:
            return None
        config = info.config
        consumer = ConsumerConfig(
            description="cqrs verify (ephemeral)",
            deliver_policy=DeliverPolicy.ALL,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=max(30.0, self._timeout * 3),
            mem_storage=True,
        )
        self._sub = await while_jetstream_elects(
            lambda: self._js.pull_subscribe(self._subject, durable=None, stream=self._stream, config=consumer),
            f"create a consumer on stream {self._stream}",
            self._timeout,
        )
        self._pending = info.state.messages
        self._until = info.state.last_seq
        return StreamFacts(
            messages=info.state.messages,
            first_seq=info.state.first_seq,
            last_seq=info.state.last_seq,
            max_age_seconds=float(config.max_age or 0),
            count_limited=bool((config.max_msgs or 0) > 0 or (config.max_bytes or 0) > 0),
        )

    async def refresh(self) -> None:
        """Extends the reading to the messages published since (the tail re-check)."""
        if self._sub is None:
            return
        info = await self._stream_info()
        self._until = info.state.last_seq
        if self._until > self._seen_seq:
            self._pending = None

    async def _stream_info(self) -> StreamInfo:
        return await while_jetstream_elects(
            lambda: self._js.stream_info(self._stream), f"read stream {self._stream}", self._timeout
        )

    async def fetch(self) -> list[StreamMessage]:
        """The next batch of messages; [] once the consumer has reached where it was told to read to."""
        if self._sub is None or self._pending == 0 or self._seen_seq >= self._until:
            return []
        sub = self._sub
        try:
            msgs: list[Msg] = await while_jetstream_elects(
                lambda: sub.fetch(self._batch, timeout=self._timeout),
                f"read stream {self._stream} through its consumer",
                self._timeout,
                retry_timeouts=False,
            )
        except (nats.errors.TimeoutError, TimeoutError):  # nats-py raises either, depending on where it waited
            self._pending = 0
            return []
        out = []
        for msg in msgs:
            meta = msg.metadata
            self._pending = int(meta.num_pending)
            self._seen_seq = max(self._seen_seq, int(meta.sequence.stream))
            out.append(parse_message(int(meta.sequence.stream), msg.subject, meta.timestamp, bytes(msg.data)))
        return out

    async def close(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
