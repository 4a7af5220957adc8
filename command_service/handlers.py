"""Command handling: load the stream, decide, append; with idempotency and bounded optimistic retries."""

from __future__ import annotations

import asyncio
import logging
import random
from dataclasses import dataclass

from command_service.domain.commands import CreateOrder, OrderCommand
from command_service.domain.order import decide, fold
from command_service.event_store import (
    CommandReply,
    DuplicateRequest,
    EventStore,
    RequestRecord,
    VersionConflict,
)
from core.envelope import EventMetadata
from core.errors import Conflict, FailedPrecondition, ServiceError
from core.events import decode_event
from core.order_events import ORDER_STREAM_TYPE

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CommandContext:
    """Everything about a command that is not the command itself."""

    request_id: str
    request_hash: str
    expected_version: int | None = None
    correlation_id: str = ""


class OrderCommandHandler:
    """Runs one order command: idempotent by request_id, optimistic on the stream version."""

    def __init__(self, store: EventStore, max_attempts: int = 5) -> None:
        self._store = store
        self._max_attempts = max_attempts

    async def handle(self, command: OrderCommand, ctx: CommandContext) -> CommandReply:
        command_type = type(command).__name__
        prior = await self._replay(ctx, command_type)
        if prior is not None:
            return prior
        for attempt in range(1, self._max_attempts + 1):
            recorded = await self._store.load_stream(command.order_id)
            state = fold(decode_event(r.event_type, r.schema_version, r.payload) for r in recorded)
            current_version = recorded[-1].version if recorded else 0
            last_position = recorded[-1].position if recorded else 0
            try:
                if ctx.expected_version is not None and ctx.expected_version != current_version:
                    raise Conflict(
                        f"order {command.order_id} is at version {current_version}, "
                        f"not the expected version {ctx.expected_version}"
                    )
                events = decide(state, command)
            except ServiceError:
                # A concurrent duplicate of this request may have committed between our replay check and the
                # load; its effect then makes the checks fail. The first reply is the right answer.
                prior = await self._replay(ctx, command_type)
                if prior is not None:
                    return prior
                raise
            try:
                return await self._store.append(
                    stream_type=ORDER_STREAM_TYPE,
                    stream_id=command.order_id,
                    expected_version=current_version,
                    events=events,
                    metadata=EventMetadata(
                        request_id=ctx.request_id,
                        correlation_id=ctx.correlation_id or ctx.request_id,
                        causation_id=ctx.request_id,
                    ),
                    request=RequestRecord(ctx.request_id, command_type, ctx.request_hash),
                    last_position=last_position,
                )
            except VersionConflict:
                if ctx.expected_version is not None or isinstance(command, CreateOrder):
                    raise Conflict(f"order {command.order_id} was changed concurrently; reload it and retry") from None
                log.debug("version conflict on %s (attempt %d); retrying", command.order_id, attempt)
                await asyncio.sleep(random.uniform(0, 0.005 * attempt))
            except DuplicateRequest:
                prior = await self._replay(ctx, command_type)
                if prior is not None:
                    return prior
                raise
        raise Conflict(
            f"order {command.order_id} is being changed by many writers at once; "
            f"gave up after {self._max_attempts} attempts, retry later"
        )

    async def _replay(self, ctx: CommandContext, command_type: str) -> CommandReply | None:
        """The first reply for a repeated request_id, or None when the id is new."""
        logged = await self._store.find_request(ctx.request_id)
        if logged is None:
            return None
        if logged.command_type != command_type or logged.request_hash != ctx.request_hash:
            raise FailedPrecondition(
                f"request_id {ctx.request_id!r} was already used for a different {logged.command_type} "
                "command; use a new request_id for a new command"
            )
        return logged.reply
