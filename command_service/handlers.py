"""Command handling: load the stream, decide, append; with idempotency and bounded optimistic retries.

One generic `CommandHandler` runs every aggregate's commands; an `Aggregate` spec says how to find the stream,
fold its events and decide. Aggregate-specific checks that need other streams (an order needs an active
customer) are a `precondition`, run before each attempt; it returns the versions of the streams it read, and the
append writes only if they are unchanged (decided in the append's own statement), else the command is decided again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from command_service.domain import customer, order
from command_service.domain.commands import CreateOrder, OrderCommand
from command_service.domain.customer_commands import CustomerCommand, RegisterCustomer
from command_service.event_store import (
    ClaimTaken,
    CommandReply,
    DuplicateRequest,
    EventStore,
    GuardMoved,
    RequestRecord,
    StreamGuard,
    TransactionAborted,
    UniqueClaim,
    VersionConflict,
)
from command_service.stream_cache import StreamCache, StreamSnapshot
from core.backoff import full_jitter
from core.customer_events import CUSTOMER_STREAM_TYPE
from core.envelope import EventMetadata
from core.errors import AlreadyExists, Conflict, FailedPrecondition, NotFound, ServiceError
from core.events import Event
from core.order_events import ORDER_STREAM_TYPE
from core.tracing import current_traceparent, tracer

log = logging.getLogger(__name__)

# A version conflict is retried at once after a small random pause, so that racing writers spread out.
CONFLICT_BACKOFF_SECONDS = 0.005
CONFLICT_BACKOFF_CAP_SECONDS = 0.05

S = TypeVar("S")
C = TypeVar("C")

EMAIL_SCOPE = "customer-email"


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Everything about a command that is not the command itself."""

    request_id: str
    request_hash: str
    expected_version: int | None = None
    correlation_id: str = ""
    subject: str = ""  # the authenticated caller (`sub` of its token), "" when auth is off


def _no_claims(state: object, events: Sequence[Event]) -> list[UniqueClaim]:
    return []


@dataclass(frozen=True)
class Aggregate(Generic[S, C]):
    """How the generic handler works with one aggregate type."""

    name: str  # for messages: "order", "customer"
    stream_type: str
    stream_id: Callable[[C], str]
    fold: Callable[[Iterable[Event]], S | None]
    decide: Callable[[S | None, C], list[Event]]
    creates: type  # the command that starts a stream (a conflict on it means "already exists")
    claims: Callable[[S | None, Sequence[Event]], list[UniqueClaim]] = field(default=_no_claims)


class CommandHandler(Generic[S, C]):
    """Runs one command: idempotent by request_id, optimistic on the stream version."""

    def __init__(
        self,
        store: EventStore,
        aggregate: Aggregate[S, C],
        max_attempts: int = 5,
        precondition: Callable[[C], Awaitable[Sequence[StreamGuard]]] | None = None,
        max_seconds: float = 30.0,
        streams: StreamCache | None = None,
    ) -> None:
        """`max_seconds` bounds one command as a whole (every attempt), within the caller's deadline; `streams`:
        the replica's stream cache (None: every command reads its stream from PostgreSQL)."""
        self.store = store
        self.streams = streams if streams is not None else StreamCache(store, capacity=0)
        self.max_seconds = max_seconds
        self._aggregate = aggregate
        self._max_attempts = max_attempts
        self._precondition = precondition

    async def handle(self, command: C, ctx: CommandContext) -> CommandReply:
        agg = self._aggregate
        command_type = type(command).__name__
        stream_id = agg.stream_id(command)
        attributes = {
            "cqrs.stream_id": stream_id,
            "cqrs.stream_type": agg.stream_type,
            "cqrs.request_id": ctx.request_id,
            "cqrs.command_type": command_type,
        }
        with tracer().start_as_current_span(f"command {command_type}", attributes=attributes) as span:
            reply = await self._handle(command, ctx, command_type, stream_id)
            span.set_attribute("cqrs.version", reply.version)
            return reply

    async def _handle(self, command: C, ctx: CommandContext, command_type: str, stream_id: str) -> CommandReply:
        agg = self._aggregate
        # No request-log lookup up front: a repeated request_id either fails the checks its first run changed,
        # or fails its append on the request log (which writes nothing); both paths return the first reply
        # through `_replay`. New commands, nearly all of them, save a round trip.
        fresh = False  # once a cached stream may be behind: read it from PostgreSQL
        for attempt in range(1, self._max_attempts + 1):
            # A creating command on a stream the cache does not hold assumes the stream is new (it nearly always
            # is): the append's version check proves it; if the stream exists after all, it is read and decided again.
            assumed_new = (
                not fresh
                and isinstance(command, agg.creates)
                and not ctx.expected_version  # None or 0: a client expecting more is checked against the stream
                and self.streams.unknown(stream_id)
            )
            stream = None if assumed_new else await self.streams.read(stream_id, fresh=fresh)
            if stream is not None and stream.stream_type != agg.stream_type:  # the id names another aggregate's
                raise NotFound(f"{agg.name} {stream_id} not found")
            state = agg.fold(stream.events if stream is not None else ())
            current_version = stream.version if stream is not None else 0
            last_position = stream.position if stream is not None else 0
            try:
                if ctx.expected_version is not None and ctx.expected_version != current_version:
                    raise Conflict(
                        f"{agg.name} {stream_id} is at version {current_version}, "
                        f"not the expected version {ctx.expected_version}"
                    )
                guards = await self._precondition(command) if self._precondition is not None else ()
                events = agg.decide(state, command)
            except ServiceError:
                if stream is not None and stream.cached:  # a rejection is confirmed against PostgreSQL first
                    fresh = True
                    continue
                # A repeat of a request that already committed (or is committing concurrently): its own effect
                # makes the checks fail. The first reply is the right answer.
                prior = await self._replay(ctx, command_type)
                if prior is not None:
                    return prior
                raise
            try:
                reply = await self._append(command_type, stream_id, current_version, last_position, attempt,
                                           events, state, guards, ctx)  # fmt: skip
                self._record(stream, events, reply, current_version)
                return reply
            except VersionConflict:
                self.streams.stale(stream_id)
                fresh = True
                if assumed_new:  # the stream exists: decide against it
                    continue
                if ctx.expected_version is not None or isinstance(command, agg.creates):
                    prior = await self._replay(ctx, command_type)  # a concurrent duplicate may have won the race
                    if prior is not None:
                        return prior
                    raise Conflict(f"{agg.name} {stream_id} was changed concurrently; reload it and retry") from None
                log.debug("version conflict on %s (attempt %d); retrying", stream_id, attempt)
                await asyncio.sleep(full_jitter(attempt, CONFLICT_BACKOFF_SECONDS, CONFLICT_BACKOFF_CAP_SECONDS))
            except GuardMoved as moved:
                self.streams.stale(moved.guard.stream_id)
                log.debug("%s on %s (attempt %d); deciding again", moved, stream_id, attempt)
            except TransactionAborted as aborted:  # nothing written: the same decision goes again, a moment later
                log.info("append to %s aborted by PostgreSQL (attempt %d): %s; retrying", stream_id, attempt, aborted)
                await asyncio.sleep(full_jitter(attempt, CONFLICT_BACKOFF_SECONDS, CONFLICT_BACKOFF_CAP_SECONDS))
            except ClaimTaken as taken:
                prior = await self._replay(ctx, command_type)
                if prior is not None:
                    return prior
                raise AlreadyExists(f"{taken.scope.replace('-', ' ')} {taken.value!r} is already in use") from None
            except DuplicateRequest:
                prior = await self._replay(ctx, command_type)
                if prior is not None:
                    return prior
                raise
            except BaseException:
                self.streams.forget(stream_id)  # the append may have committed or not: read it again next time
                raise
        raise Conflict(
            f"{agg.name} {stream_id} is being changed by many writers at once; "
            f"gave up after {self._max_attempts} attempts, retry later"
        )

    async def _append(
        self,
        command_type: str,
        stream_id: str,
        current_version: int,
        last_position: int,
        attempt: int,
        events: list[Event],
        state: S | None,
        guards: Sequence[StreamGuard],
        ctx: CommandContext,
    ) -> CommandReply:
        agg = self._aggregate
        if not events:
            # A command that changes nothing writes no event, so no version check would catch a stream that moved
            # since it was read (another replica's write behind a cached stream, or a write between read and
            # append): its own stream guards it, and a stream that moved is read and decided again.
            guards = (*guards, StreamGuard(stream_id, current_version))
        with tracer().start_as_current_span(
            "eventstore.append",
            attributes={
                "db.system": "postgresql",
                "db.operation.name": "append",
                "cqrs.stream_id": stream_id,
                "cqrs.expected_version": current_version,
                "cqrs.events": len(events),
                "cqrs.attempt": attempt,
            },
        ):
            return await self.store.append(
                stream_type=agg.stream_type,
                stream_id=stream_id,
                expected_version=current_version,
                events=events,
                metadata=EventMetadata(
                    request_id=ctx.request_id,
                    correlation_id=ctx.correlation_id or ctx.request_id,
                    causation_id=ctx.request_id,
                    # The append span's context: the relay's publish continues the trace from here.
                    traceparent=current_traceparent(),
                    subject=ctx.subject,
                ),
                request=RequestRecord(ctx.request_id, command_type, ctx.request_hash),
                last_position=last_position,
                claims=agg.claims(state, events),
                guards=guards,
            )

    def _record(
        self, before: StreamSnapshot | None, events: Sequence[Event], reply: CommandReply, expected_version: int
    ) -> None:
        """Keeps the stream as this append left it (the append's version check proved `before` current)."""
        if reply.version == expected_version + len(events):
            self.streams.appended(before, events, reply)
        else:  # not this append's own reply: leave it to the next read
            self.streams.forget(reply.stream_id)

    async def _replay(self, ctx: CommandContext, command_type: str) -> CommandReply | None:
        """The first reply for a repeated request_id, or None when the id is new."""
        logged = await self.store.find_request(ctx.request_id)
        if logged is None:
            return None
        if logged.command_type != command_type or logged.request_hash != ctx.request_hash:
            raise FailedPrecondition(
                f"request_id {ctx.request_id!r} was already used for a different {logged.command_type} "
                "command; use a new request_id for a new command"
            )
        return logged.reply


def _email_claims(state: customer.CustomerState | None, events: Sequence[Event]) -> list[UniqueClaim]:
    reserve, release = customer.email_claims(state, list(events))
    claims = []
    if release is not None:
        claims.append(UniqueClaim(EMAIL_SCOPE, release, release=True))
    if reserve is not None:
        claims.append(UniqueClaim(EMAIL_SCOPE, reserve))
    return claims


ORDERS: Aggregate[order.OrderState, OrderCommand] = Aggregate(
    name="order",
    stream_type=ORDER_STREAM_TYPE,
    stream_id=lambda command: command.order_id,
    fold=order.fold,
    decide=order.decide,
    creates=CreateOrder,
)

CUSTOMERS: Aggregate[customer.CustomerState, CustomerCommand] = Aggregate(
    name="customer",
    stream_type=CUSTOMER_STREAM_TYPE,
    stream_id=lambda command: command.customer_id,
    fold=customer.fold,
    decide=customer.decide,
    creates=RegisterCustomer,
    claims=_email_claims,
)


class ActiveCustomerCheck:
    """CreateOrder needs an existing, active customer, checked against the event store (not the read model):
    through the stream cache, whose answer the append's guard on the customer's version confirms, and a refusal
    decided on a cached customer is confirmed from PostgreSQL before it is given."""

    def __init__(self, store: EventStore, streams: StreamCache | None = None) -> None:
        self._streams = streams if streams is not None else StreamCache(store, capacity=0)

    async def __call__(self, command: OrderCommand) -> Sequence[StreamGuard]:
        """Raises FailedPrecondition, or returns the customer's version that the append must still find."""
        if not isinstance(command, CreateOrder):
            return ()
        stream = await self._streams.read(command.customer_id)
        try:
            return self._check(command.customer_id, stream)
        except FailedPrecondition:
            if stream is None or not stream.cached:
                raise
        return self._check(command.customer_id, await self._streams.read(command.customer_id, fresh=True))

    @staticmethod
    def _check(customer_id: str, stream: StreamSnapshot | None) -> Sequence[StreamGuard]:
        if stream is None or stream.stream_type != CUSTOMER_STREAM_TYPE:  # none, or some other aggregate's stream
            raise FailedPrecondition(f"customer {customer_id} does not exist; register the customer first")
        state = customer.fold(stream.events)
        if state is None:
            raise FailedPrecondition(f"customer {customer_id} does not exist; register the customer first")
        if not state.is_active:
            raise FailedPrecondition(f"customer {customer_id} is deactivated and cannot create orders")
        return (StreamGuard(customer_id, stream.version),)


def order_handler(
    store: EventStore, max_attempts: int = 5, max_seconds: float = 30.0, streams: StreamCache | None = None
) -> CommandHandler[order.OrderState, OrderCommand]:
    check = ActiveCustomerCheck(store, streams)
    return CommandHandler(store, ORDERS, max_attempts, check, max_seconds, streams)


def customer_handler(
    store: EventStore, max_attempts: int = 5, max_seconds: float = 30.0, streams: StreamCache | None = None
) -> CommandHandler[customer.CustomerState, CustomerCommand]:
    return CommandHandler(store, CUSTOMERS, max_attempts, max_seconds=max_seconds, streams=streams)
