"""PyMongo's asynchronous wire protocol, reading each reply in one socket read and leaving the socket registered.

PyMongo 4.x's `pymongo.network_layer.PyMongoProtocol` reads a reply in two socket reads (its 16-byte header, then
a buffer sized for the rest) and pauses reading after every reply, so that the next request resumes it: two
`epoll_ctl` calls and two reads per round trip, about 10 % of a client's CPU per `find_one` on the local
MongoDB-wire server (docs/performance.md, "Levers measured in one run"). `ReplyProtocol` reads into one buffer
that holds any ordinary reply whole (a larger one gets a buffer of its own size) and pauses reading only while
replies nobody has asked for pile up (an exhaust cursor or a streaming monitor outrunning its reader), which is
what PyMongo's pause is there for.

It changes how bytes become messages, nothing else: the header checks and their errors, compressed replies, the
futures `read` awaits and the way a failure closes the connection are PyMongo's own (`PyMongoProtocol`'s other
methods run unchanged). It is installed (`core.mongo_round_trip.install`) only while PyMongo's protocol still
keeps its state in the attributes this class fills; `tests/integration/test_mongo_round_trip.py` runs the same
calls, large replies and failures through both.
"""

from __future__ import annotations

import struct

from pymongo import network_layer, pool_shared
from pymongo.errors import ProtocolError

HEADER_SIZE = 16
COMPRESSION_HEADER_SIZE = 9
OP_COMPRESSED = 2012
# Replies up to this size arrive in one read into the shared buffer; larger ones get a buffer of their own.
READ_BUFFER_SIZE = 32 * 1024
# Unread replies past this many pause reading until `read` takes one (PyMongo pauses after every reply).
MAX_UNREAD_REPLIES = 8

_HEADER = struct.Struct("<iiii")  # length, request id, response to, op code
_COMPRESSION_HEADER = struct.Struct("<iiB")  # original op code, uncompressed size, compressor id
_PYMONGO_PROTOCOL = network_layer.PyMongoProtocol
_PROTOCOL_NAME = "PyMongoProtocol"  # the module global PyMongo's pool builds each connection's protocol by
# PyMongoProtocol's state that `read`, `close` and `connection_lost` use, which this class must keep up.
_STATE = {"_pending_messages", "_done_messages", "_connection_lost", "_max_message_size", "_closed", "transport"}


class ReplyProtocol(network_layer.PyMongoProtocol):
    """`PyMongoProtocol` with one read per reply and no pause between round trips (see the module docstring)."""

    def __init__(self, timeout: float | None = None) -> None:
        super().__init__(timeout=timeout)
        self._buffer = bytearray(READ_BUFFER_SIZE)
        self._view = memoryview(self._buffer)
        self._filled = 0  # bytes of the buffer received and not yet part of a delivered reply
        self._large: bytearray | None = None  # a reply larger than the buffer, being received
        self._large_filled = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._connection_lost:
            self._filled = 0  # drained and dropped: nobody reads this connection any more
            return self._view
        if self._large is not None:
            return memoryview(self._large)[self._large_filled :]
        return self._view[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if nbytes == 0:
            self.close(OSError("connection closed"))
            return
        if self._connection_lost:
            return
        if self._large is not None:
            self._large_filled += nbytes
            if self._large_filled == len(self._large):
                message, self._large = memoryview(self._large), None
                self._deliver(message)
            return
        self._filled += nbytes
        try:
            self._deliver_complete_replies()
        except ProtocolError as exc:
            self.close(exc)

    def _deliver_complete_replies(self) -> None:
        start = 0
        while self._filled - start >= HEADER_SIZE:
            length = _HEADER.unpack_from(self._buffer, start)[0]
            self._check_length(length)
            if length > READ_BUFFER_SIZE:
                self._start_large(start, length)
                return
            if self._filled - start < length:
                break
            self._deliver(memoryview(bytes(self._view[start : start + length])))
            start += length
            if self._connection_lost:
                return
        if start:
            rest = self._filled - start
            self._view[:rest] = self._view[start : self._filled]
            self._filled = rest

    def _start_large(self, start: int, length: int) -> None:
        """Moves a reply larger than the buffer into one of its own size; the rest of it is read straight there."""
        received = self._filled - start
        self._large = bytearray(length)
        self._large[:received] = self._view[start : self._filled]
        self._large_filled = received
        self._filled = 0

    def _check_length(self, length: int) -> None:
        """PyMongo's checks of a reply's length, with its errors."""
        if length <= HEADER_SIZE:
            raise ProtocolError(f"Message length ({length!r}) not longer than standard message header size (16)")
        if length > self._max_message_size:
            raise ProtocolError(
                f"Message length ({length!r}) is larger than server max message size ({self._max_message_size!r})"
            )

    def _deliver(self, message: memoryview) -> None:
        """Hands one whole reply (header included) to the `read` waiting for it, or keeps it for the next one."""
        _, _, response_to, op_code = _HEADER.unpack_from(message)
        body = message[HEADER_SIZE:]
        compressor_id = None
        if op_code == OP_COMPRESSED:
            if len(message) <= HEADER_SIZE + COMPRESSION_HEADER_SIZE:
                self.close(ProtocolError(f"Message length ({len(message)!r}) not longer than standard "
                                         "OP_COMPRESSED message header size (25)"))  # fmt: skip
                return
            op_code, uncompressed_size, compressor_id = _COMPRESSION_HEADER.unpack_from(body)
            if uncompressed_size <= 0 or uncompressed_size + HEADER_SIZE > self._max_message_size:
                self.close(ProtocolError(f"Uncompressed message size ({uncompressed_size!r}) is invalid or larger "
                                         f"than server max message size ({self._max_message_size!r})"))  # fmt: skip
                return
            body = body[COMPRESSION_HEADER_SIZE:]
        waiter = self._pending_messages.popleft() if self._pending_messages else self._closed.get_loop().create_future()
        if waiter.done():  # its reader gave up (cancelled): PyMongo closes such a connection
            self.close(None)
            return
        waiter.set_result((op_code, compressor_id, response_to, body))
        self._done_messages.append(waiter)
        if len(self._done_messages) > MAX_UNREAD_REPLIES:
            self.transport.pause_reading()  # `read` resumes it


def protocol_matches() -> bool:
    """Whether PyMongo still builds its connections' protocol by this name and keeps the state this class fills
    (private API, see the module docstring)."""
    if getattr(pool_shared, _PROTOCOL_NAME, None) not in (_PYMONGO_PROTOCOL, ReplyProtocol):
        return False
    assigned = set(_PYMONGO_PROTOCOL.__init__.__code__.co_names)  # the attributes its __init__ sets
    methods = all(callable(getattr(_PYMONGO_PROTOCOL, name, None)) for name in ("read", "close", "connection_lost"))
    return _STATE <= assigned and methods


def install() -> bool:
    """Makes PyMongo's asynchronous connections (made from now on) use `ReplyProtocol`; False if PyMongo changed."""
    if not protocol_matches():
        return False
    setattr(pool_shared, _PROTOCOL_NAME, ReplyProtocol)
    return True


def uninstall() -> None:
    setattr(pool_shared, _PROTOCOL_NAME, _PYMONGO_PROTOCOL)
