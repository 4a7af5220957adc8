"""The one path of every unary query RPC: parse the request (every bad field at once), wait until the read model
reflects the request's consistency tokens, read; errors -> status.

A servicer (`orders`, `customers`) is a table of `Query` entries; what an entry knows is only what differs between
RPCs: how to parse the request and how to read the answer.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, Generic, NoReturn, TypeVar

import grpc
from cqrs.orders.v1 import consistency_pb2
from google.protobuf.message import Message

from core.errors import InvalidArgument
from core.grpc_errors import abort_for
from core.log_throttle import per_request
from core.rpc_table import Context, Rpc
from query_service.consistency import ReadYourWrites, TooManyWaiters, parse_requirement
from query_service.request_checks import collect

log = logging.getLogger(__name__)

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)
Src = TypeVar("Src")  # what the reads of a table read from: its servicer
Parsed = TypeVar("Parsed")


class Query(Rpc[Req, Resp], Generic[Req, Src, Parsed, Resp]):
    """A unary read: `parse` turns the request into what `read` needs (InvalidArgument names each bad field), and
    `read(source, parsed, consistency)` answers once the read model reflects the request's consistency tokens."""

    def __init__(
        self,
        request: type[Req],
        parse: Callable[[Req], Parsed],
        read: Callable[[Src, Parsed, consistency_pb2.ReadConsistency], Awaitable[Resp]],
    ) -> None:
        super().__init__(request)
        self.parse = parse
        self.read = read


class QueryRunner(Generic[Src]):
    """Runs the unary reads of one servicer (`source`), all with read-your-writes."""

    def __init__(self, source: Src, read_your_writes: ReadYourWrites) -> None:
        self._source = source
        self._ryw = read_your_writes

    async def run(self, method: str, entry: Query[Any, Src, Any, Message], request: Any, context: Context) -> Message:
        """Parses the request and its consistency tokens (all violations at once), waits for them, reads."""
        try:
            requirement: consistency_pb2.ConsistencyRequirement = request.consistency
            requirements, violations = parse_requirement(requirement)
            parsed = collect(violations, lambda: entry.parse(request))
            if violations:
                raise InvalidArgument(violations)
            while True:
                # Every reader switches generations at once, between two of our awaits: an answer read across a
                # switch may come from a generation the tokens were not checked against, so it is waited for and
                # read again there (switches are minutes apart; this repeats only for one that lands just here).
                switches = self._ryw.switches
                consistency = await self._ryw.ensure(
                    requirements, accept_stale=requirement.accept_stale, time_remaining=context.time_remaining()
                )
                answer = await entry.read(self._source, parsed, consistency)
                if self._ryw.switches == switches:
                    return answer
        except Exception as exc:  # CancelledError (the client left) is a BaseException and passes through
            await fail(context, method, exc)


async def fail(context: Context, method: str, exc: Exception) -> NoReturn:
    """Ends the RPC with the status that `exc` deserves; never returns."""
    if isinstance(exc, TooManyWaiters):
        per_request.log(log, logging.WARNING, (method, TooManyWaiters), "%s: %s", method, exc)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    await abort_for(context, method, exc, log)
