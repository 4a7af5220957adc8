"""The one path of every command RPC: request -> command (validated once) -> handler -> reply; errors -> status.

A servicer (`orders`, `customers`) is a table of `Command` entries; what an entry knows is only what differs
between RPCs: how to build the command from the request and which response carries the result.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from command_service.event_store import CommandReply
from command_service.handlers import CommandContext, CommandHandler
from command_service.outages import EVENT_STORE
from core import logs
from core.auth import authenticated_subject
from core.consistency import ConsistencyToken
from core.errors import DependencyUnavailable, FieldViolation, InvalidArgument
from core.grpc_errors import abort_for
from core.rpc_table import Context, Rpc

log = logging.getLogger(__name__)

MAX_REQUEST_ID_LENGTH = 128
CORRELATION_HEADER = "x-correlation-id"
# A command stops this long before the caller's deadline, so that its UNAVAILABLE reaches the caller in time.
DEADLINE_MARGIN_SECONDS = 0.25

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
C = TypeVar("C")


class Command(Rpc[Req, Resp], Generic[Req, C, Resp]):
    """A command RPC: `decode` builds the command from the request, `response(result=...)` is the reply.

    `required` names message fields the request must set: a missing one is reported as such, not as the empty
    sub-fields the command would otherwise be validated with.
    """

    def __init__(
        self,
        request: type[Req],
        decode: Callable[[Req], C],
        response: Callable[..., Resp],
        *,
        required: tuple[str, ...] = (),
    ) -> None:
        super().__init__(request)
        self.decode = decode
        self.response = response
        self.required = required


class CommandRunner(Generic[C]):
    """Runs the command RPCs of one aggregate through its handler.

    `violations` is the aggregate's shape check; `result` builds the result message (`CommandResult`,
    `CustomerCommandResult`) whose `id_field` names the stream.
    """

    def __init__(
        self,
        handler: CommandHandler[Any, C],
        violations: Callable[[C], list[FieldViolation]],
        result: Callable[..., Message],
        *,
        id_field: str,
    ) -> None:
        self._handler = handler
        self._violations = violations
        self._result = result
        self._id_field = id_field

    async def run(self, method: str, entry: Command[Any, C, Message], request: Any, context: Context) -> Message:
        """Decodes and validates all fields at once, handles the command within the deadline, builds the reply."""
        try:
            command = self._decode(entry, request)
            ctx = CommandContext(
                request_id=request.request_id,
                request_hash=_fingerprint(method, request),
                expected_version=_expected_version(request),
                correlation_id=_metadata_value(context, CORRELATION_HEADER) or request.request_id,
                subject=authenticated_subject(),
            )
            logs.correlation_id.set(ctx.correlation_id)
            reply = await self._handle(command, ctx, context)
            return entry.response(result=self._result_of(reply))
        except Exception as exc:  # CancelledError (the client left) is a BaseException and passes through
            await abort_for(context, method, exc, log)

    def _decode(self, entry: Command[Any, C, Message], request: Any) -> C:
        """The request's command, or InvalidArgument with every malformed field of request and command."""
        violations = _envelope_violations(request)
        violations += [FieldViolation(name, "required") for name in entry.required if not request.HasField(name)]
        command = entry.decode(request)
        violations += self._violations(command)
        if violations:
            raise InvalidArgument(_without_shadowed(violations))
        return command

    async def _handle(self, command: C, ctx: CommandContext, context: Context) -> CommandReply:
        # One budget for the whole command (load, decide, append, retries), inside the caller's deadline: a
        # PostgreSQL that accepts connections but answers nothing (a blackholed network) must get UNAVAILABLE
        # before the client gives up, not DEADLINE_EXCEEDED. Stopped mid-append, the outcome is unknown; the
        # client's retry with the same request_id then writes it once.
        budget = _command_budget(context, self._handler.max_seconds)
        try:
            async with asyncio.timeout(budget):
                return await self._handler.handle(command, ctx)
        except TimeoutError as exc:
            detail = f"no answer within the command's budget of {budget:.2f}s"
            raise DependencyUnavailable(EVENT_STORE, detail, timed_out=True) from exc

    def _result_of(self, reply: CommandReply) -> Message:
        return self._result(
            **{self._id_field: reply.stream_id},
            version=reply.version,
            position=reply.position,
            consistency_token=consistency_token(reply),
        )


def consistency_token(reply: CommandReply) -> str:
    """The opaque token a query waits on to read this command's write."""
    return ConsistencyToken(reply.stream_type, reply.stream_id, reply.version, reply.position).encode()


def _expected_version(request: Any) -> int | None:
    if "expected_version" in request.DESCRIPTOR.fields_by_name and request.HasField("expected_version"):
        return int(request.expected_version)
    return None


def _envelope_violations(request: Any) -> list[FieldViolation]:
    """Violations of the fields every command request has (request_id, expected_version)."""
    violations: list[FieldViolation] = []
    request_id = request.request_id
    if not request_id:
        violations.append(FieldViolation("request_id", "required: a unique idempotency key per command"))
    elif len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable() or request_id.strip() != request_id:
        violations.append(
            FieldViolation("request_id", f"must be 1..{MAX_REQUEST_ID_LENGTH} printable characters, no spaces around")
        )
    expected = _expected_version(request)
    if expected is not None and expected < 0:
        violations.append(FieldViolation("expected_version", "must be >= 0"))
    return violations


def _without_shadowed(violations: list[FieldViolation]) -> list[FieldViolation]:
    """Drops `a.b` violations when `a` itself is already reported (e.g. a missing message)."""
    whole = {v.field for v in violations}
    return [v for v in violations if not any(v.field.startswith(f + ".") for f in whole)]


def _fingerprint(method: str, request: Message) -> str:
    """Identifies the command independent of its request_id, to detect a request_id reused for another command.

    Stored in the request log: the method name and the encoding must stay as they are, or repeats of requests
    logged before a change would look like different commands.
    """
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(method.encode() + b"\0" + copy.SerializeToString(deterministic=True)).hexdigest()


def _command_budget(context: Context, max_seconds: float) -> float:
    """Seconds the command may take: the caller's remaining deadline less a margin to answer, capped."""
    remaining = context.time_remaining()
    if remaining is None:
        return max_seconds
    return max(0.05, min(max_seconds, remaining - DEADLINE_MARGIN_SECONDS))


def _metadata_value(context: Context, key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
