"""PyMongo's asynchronous request and reply, awaited in the calling task instead of three new tasks a round trip.

PyMongo 4.x (`pymongo.network_layer`) sends every request through `asyncio.wait_for` (a task around a write that
never waits) and waits for every reply with two new tasks under `asyncio.wait` and a timeout: the read, and a
loop that checks every 0.5 s whether the connection's pool cancelled it (a pool reset after a failed heartbeat).
A round trip took about nine event-loop turns; on the local MongoDB-wire server a `find_one` by `_id` cost the
client 0.41 ms of CPU, 0.33 ms with this path (docs/performance.md, "Levers measured in one run").

`install()` replaces the two functions PyMongo's asynchronous pool calls by name (`async_sendall`,
`async_receive_message`) with versions that do the same work in the calling task:

* the request is handed to the transport directly (`PyMongoProtocol.write` never suspends: its write buffer
  limit is the largest message, so the timeout around it could not fire);
* the reply is awaited directly, and one timer per reply does what the extra task did: at the operation's
  deadline, and every 0.5 s before it, it checks the deadline and the connection's cancellation, and when either
  is due cancels the waiting task, whose read then ends with PyMongo's own `TimeoutError("timed out")` or
  `_OperationCancelled`. A cancellation from outside (a gRPC deadline, shutdown) still propagates as itself.

`install()` also makes new connections read their replies with `core.mongo_protocol.ReplyProtocol` (one socket
read a reply, no pause between round trips). Everything else stays PyMongo's: reply checks, and the pool closing
a connection whose read failed.
What it replaces is private to PyMongo, so it is installed only while the pool still calls PyMongo's own
functions by these names and the protocol's `read` and `write` take what they took in 4.9 to 4.20; otherwise
PyMongo's paths run (`tests/integration/test_mongo_round_trip.py` compares both against a real server, timeouts
and cancellations included).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from typing import Any

import pymongo
from pymongo import _csot, network_layer
from pymongo.asynchronous import pool
from pymongo.common import MAX_MESSAGE_SIZE
from pymongo.errors import ProtocolError, _OperationCancelled
from pymongo.message import _UNPACK_REPLY

from core import mongo_protocol

_log = logging.getLogger(__name__)
_PYMONGO_SENDALL = network_layer.async_sendall
_PYMONGO_RECEIVE = network_layer.async_receive_message
# How often a waiting reply checks its connection's cancellation, as PyMongo's own poll does.
CANCELLATION_POLL_SECONDS: float = getattr(network_layer, "_POLL_TIMEOUT", 0.5)


async def send_all(conn: network_layer.PyMongoProtocol, buf: bytes) -> None:
    """`pymongo.network_layer.async_sendall`, without the task `asyncio.wait_for` wraps the write in."""
    await conn.write(buf)


async def receive_message(
    conn: pool.AsyncConnection, request_id: int | None, max_message_size: int = MAX_MESSAGE_SIZE
) -> Any:
    """`pymongo.network_layer.async_receive_message`, with the reply awaited in the calling task."""
    task = asyncio.current_task()
    if task is None:  # not in a task: nothing to cancel, so PyMongo's own path
        return await _PYMONGO_RECEIVE(conn, request_id, max_message_size)
    if conn.cancel_context.cancelled:
        raise _OperationCancelled("operation cancelled")
    watch = _ReplyWatch(conn, task, _deadline(conn))
    try:
        data, op_code = await conn.conn.get_conn.read(request_id, max_message_size)
    except asyncio.CancelledError:
        if watch.reason is not None and task.uncancel() == 0:
            raise watch.reason from None
        raise
    finally:
        watch.stop()
    try:
        unpack_reply = _UNPACK_REPLY[op_code]
    except KeyError:
        raise ProtocolError(f"Got opcode {op_code!r} but expected {_UNPACK_REPLY.keys()!r}") from None
    return unpack_reply(data)


def _deadline(conn: pool.AsyncConnection) -> float | None:
    """The reply's deadline on `time.monotonic()`, as PyMongo computes it: the operation's (CSOT) or the socket's."""
    if _csot.get_timeout():
        deadline: float | None = _csot.get_deadline()
        return deadline
    timeout = conn.conn.gettimeout
    return time.monotonic() + timeout if timeout else None


class _ReplyWatch:
    """One timer while a reply is awaited: cancels the waiting task once the deadline passes or the pool cancels
    the connection, and remembers which (`reason`) so the read can raise PyMongo's error for it."""

    def __init__(self, conn: pool.AsyncConnection, task: asyncio.Task[Any], deadline: float | None) -> None:
        self.reason: BaseException | None = None
        self._conn = conn
        self._task = task
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(self._next_delay(), self._check)

    def _next_delay(self) -> float:
        if self._deadline is None:
            return CANCELLATION_POLL_SECONDS
        return max(min(self._deadline - time.monotonic(), CANCELLATION_POLL_SECONDS), 0.0)

    def _check(self) -> None:
        if self._conn.cancel_context.cancelled:
            self.reason = _OperationCancelled("operation cancelled")
        elif self._deadline is not None and time.monotonic() >= self._deadline:
            self.reason = TimeoutError("timed out")
        else:
            self._handle = self._loop.call_later(self._next_delay(), self._check)
            return
        self._task.cancel()

    def stop(self) -> None:
        self._handle.cancel()


def _protocol_matches() -> bool:
    """Whether PyMongo's protocol still reads and writes as this module expects (private API, see the docstring)."""
    protocol = getattr(network_layer, "PyMongoProtocol", None)
    read, write = getattr(protocol, "read", None), getattr(protocol, "write", None)
    if not (inspect.iscoroutinefunction(read) and inspect.iscoroutinefunction(write)):
        return False
    return list(inspect.signature(read).parameters) == ["self", "request_id", "max_message_size"] and list(
        inspect.signature(write).parameters
    ) == ["self", "message"]


# The names PyMongo's asynchronous pool calls its round trip by (module globals, looked up at each call).
_POOL_NAMES = ("async_sendall", "async_receive_message")


def _pool_functions() -> tuple[object, object]:
    return getattr(pool, _POOL_NAMES[0], None), getattr(pool, _POOL_NAMES[1], None)


def _set_pool_functions(sendall: object, receive: object) -> None:
    setattr(pool, _POOL_NAMES[0], sendall)
    setattr(pool, _POOL_NAMES[1], receive)


def install() -> bool:
    """Makes every `AsyncMongoClient` of this process use this module's round trip and, for connections made from
    now on, `core.mongo_protocol`'s reader of replies; idempotent.

    Returns False when either no longer fits PyMongo (its pool calls other functions by these names, or its protocol
    changed shape); what does not fit is left as PyMongo's own.
    """
    reader = mongo_protocol.install()
    if not reader:
        _log.warning("PyMongo %s: its asynchronous wire protocol is not the one this process replaces; PyMongo's "
                     "own reads the replies (more CPU per MongoDB call)", pymongo.version)  # fmt: skip
    current = _pool_functions()
    if current == (send_all, receive_message):
        return reader
    if current != (_PYMONGO_SENDALL, _PYMONGO_RECEIVE) or not _protocol_matches():
        _log.warning("PyMongo %s: its asynchronous round trip is not the one this process replaces; "
                     "PyMongo's own is used (more CPU per MongoDB call)", pymongo.version)  # fmt: skip
        return False
    _set_pool_functions(send_all, receive_message)
    return reader


def uninstall() -> None:
    """Puts PyMongo's own round trip and reader back, for connections made from now on (the tests compare both)."""
    _set_pool_functions(_PYMONGO_SENDALL, _PYMONGO_RECEIVE)
    mongo_protocol.uninstall()
