"""Reading the JetStream stream for `cqrs verify`: in order, through an ephemeral pull consumer that needs no acks,
each request bounded, and asked again while a cluster has no leader."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
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
from core.jetstream import JETSTREAM_UNAVAILABLE
from core.subjects import stream_subjects
from cqrsctl.verify.sources import EventRef

T = TypeVar("T")
log = logging.getLogger(__name__)

# A JetStream cluster answers its API with 503, or not at all, while it has no leader (a node just restarted, a lost
# quorum): seconds, usually. Verify waits that out for up to its timeout, each request given this long at most (one
# answered at all answers in milliseconds) and asked again after a backoff.
JETSTREAM_API_ATTEMPT_SECONDS = 3.0
JETSTREAM_RETRY_BASE_SECONDS = 0.2
JETSTREAM_RETRY_CAP_SECONDS = 2.0
# Consumers replaced in a row, none of them delivering, before verify gives up reading the stream.
MAX_STALLED_CONSUMERS = 2


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
    retried = JETSTREAM_UNAVAILABLE if retry_timeouts else (nats.js.errors.ServiceUnavailableError,)
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
        self._consumer: str | None = None  # the consumer's name, to delete it when done
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
        self._until = info.state.last_seq
        await self._start_consumer(None)
        return StreamFacts(
            messages=info.state.messages,
            first_seq=info.state.first_seq,
            last_seq=info.state.last_seq,
            max_age_seconds=float(config.max_age or 0),
            count_limited=bool((config.max_msgs or 0) > 0 or (config.max_bytes or 0) > 0),
        )

    async def _start_consumer(self, start_seq: int | None) -> None:
        """A consumer from the stream's first message (`start_seq` None) or from `start_seq`; the one before, if
        any, is deleted. Its `num_pending` says how much is left to read."""
        await self._drop_consumer()

        def config() -> ConsumerConfig:
            # A new name for every try: a create sent while the cluster had no quorum can stay pending once it has
            # one again, and every later create of that name then timed out too (a consumer of a try that did get
            # created after all expires by itself, `inactive_threshold`).
            return ConsumerConfig(
                name=f"cqrs-verify-{uuid.uuid4().hex}",
                description="cqrs verify (ephemeral)",
                deliver_policy=DeliverPolicy.ALL if start_seq is None else DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start_seq,
                ack_policy=AckPolicy.NONE,
                filter_subject=self._subject,
                inactive_threshold=max(30.0, self._timeout * 3),
                mem_storage=True,
            )

        info = await while_jetstream_elects(
            lambda: self._js.add_consumer(self._stream, config=config()),
            f"create a consumer on stream {self._stream}",
            self._timeout,
        )
        self._sub = await self._js.pull_subscribe_bind(info.name, stream=self._stream)
        self._consumer = info.name
        self._pending = int(info.num_pending or 0)

    async def _drop_consumer(self) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        if self._consumer is not None:
            name, self._consumer = self._consumer, None
            with contextlib.suppress(Exception):  # it expires by itself (inactive_threshold) otherwise
                await asyncio.wait_for(self._js.delete_consumer(self._stream, name), JETSTREAM_API_ATTEMPT_SECONDS)

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
        """The next batch of messages; [] once the consumer has reached where it was told to read to.

        A consumer that stops delivering before then (its server restarted: it lives in memory, on one node) is
        replaced by one that starts after the last message read, at most `MAX_STALLED_CONSUMERS` times without
        progress; then `JetStreamUnavailable`. Ending the scan there instead would report every later event as
        missing from the stream."""
        stalled = 0
        while self._sub is not None and self._pending != 0 and self._seen_seq < self._until:
            try:
                msgs: list[Msg] = await while_jetstream_elects(
                    functools.partial(self._sub.fetch, self._batch, timeout=self._timeout),
                    f"read stream {self._stream} through its consumer",
                    self._timeout,
                    retry_timeouts=False,
                )
            except (nats.errors.TimeoutError, TimeoutError, JetStreamUnavailable) as exc:
                # nats-py raises either timeout, depending on where it waited; a consumer gone with its server
                # answers 503 (no responders) until the budget runs out.
                stalled += 1
                if stalled > MAX_STALLED_CONSUMERS:
                    raise JetStreamUnavailable(
                        f"stream {self._stream}'s consumer stopped delivering after message #{self._seen_seq} "
                        f"(the stream's last is #{self._until}), {stalled} consumers in a row: {describe_error(exc)}"
                    ) from exc
                log.warning(
                    "cqrs verify: the consumer on stream %s delivered nothing after message #%d of #%d (%s); "
                    "reading on through a new consumer",
                    self._stream, self._seen_seq, self._until, describe_error(exc),
                )  # fmt: skip
                await self._start_consumer(self._seen_seq + 1)
                continue
            out = []
            for msg in msgs:
                meta = msg.metadata
                self._pending = int(meta.num_pending)
                self._seen_seq = max(self._seen_seq, int(meta.sequence.stream))
                out.append(parse_message(int(meta.sequence.stream), msg.subject, meta.timestamp, bytes(msg.data)))
            if out:
                return out
        return []

    async def close(self) -> None:
        await self._drop_consumer()
