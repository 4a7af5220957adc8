"""`core.mongo_protocol.ReplyProtocol` over a real loopback socket, fed wire-protocol replies byte for byte as a
server could send them: split anywhere, several in one write, larger than its buffer, compressed, unread, or
malformed. Each reply must come out of PyMongo's `read` exactly as sent (the round trip against a MongoDB-wire
server is in `test_mongo_round_trip.py`)."""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import bson
import pytest
from pymongo.errors import ProtocolError

from core.mongo_protocol import MAX_UNREAD_REPLIES, READ_BUFFER_SIZE, ReplyProtocol

OP_MSG = 2013
OP_COMPRESSED = 2012
ZLIB = 2
MAX_MESSAGE_SIZE = 48_000_000


def op_msg(response_to: int, document: dict[str, object]) -> tuple[bytes, bytes]:
    """(the whole reply, its body as `read` returns it) of an OP_MSG carrying `document`."""
    body = struct.pack("<i", 0) + b"\x00" + bson.encode(document)
    return struct.pack("<iiii", 16 + len(body), 7, response_to, OP_MSG) + body, body


def compressed(response_to: int, body: bytes) -> bytes:
    packed = struct.pack("<iiB", OP_MSG, len(body), ZLIB) + zlib.compress(body)
    return struct.pack("<iiii", 16 + len(packed), 7, response_to, OP_COMPRESSED) + packed


@dataclass
class Link:
    """A client connection read by `ReplyProtocol`, and the server's side of it to write replies on."""

    protocol: ReplyProtocol
    server: asyncio.StreamWriter

    async def send(self, data: bytes, chunk: int | None = None) -> None:
        step = chunk or len(data)
        for start in range(0, len(data), step):
            self.server.write(data[start : start + step])
            await self.server.drain()
            if chunk:
                await asyncio.sleep(0)  # let the client read each piece on its own

    async def read(self, response_to: int) -> tuple[bytes, int]:
        data, op_code = await asyncio.wait_for(self.protocol.read(response_to, MAX_MESSAGE_SIZE), 5)
        return bytes(data), op_code


@pytest.fixture
async def link() -> AsyncIterator[Link]:
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_connect(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await accepted.put(writer)

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(lambda: ReplyProtocol(timeout=None), "127.0.0.1", port)
    server_side = await asyncio.wait_for(accepted.get(), 5)
    yield Link(protocol, server_side)
    transport.abort()
    server_side.close()
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize("chunk", [None, 1, 7, 4096])
async def test_replies_come_out_as_sent_however_the_bytes_arrive(link: Link, chunk: int | None) -> None:
    small = [op_msg(i, {"ok": 1, "n": i}) for i in range(1, 4)]
    large = op_msg(4, {"ok": 1, "blob": "x" * (2 * READ_BUFFER_SIZE + 5)})
    replies = [*small, large, op_msg(5, {"ok": 1, "after": "large"})]
    await link.send(b"".join(whole for whole, _ in replies), chunk)
    for response_to, (_, body) in enumerate(replies, start=1):
        assert await link.read(response_to) == (body, OP_MSG)


async def test_a_reply_that_arrives_in_one_segment_is_taken_in_one_read(link: Link) -> None:
    """PyMongo's reader takes every reply in two reads (its 16-byte header, then the rest); this one in one."""
    reads = 0
    buffer_updated = link.protocol.buffer_updated

    def counted(nbytes: int) -> None:
        nonlocal reads
        reads += 1
        buffer_updated(nbytes)

    link.protocol.buffer_updated = counted  # type: ignore[method-assign]  # the loop calls the instance's
    whole, body = op_msg(1, {"ok": 1, "docs": ["d" * 300] * 10})
    await link.send(whole)
    assert await link.read(1) == (body, OP_MSG)
    assert reads == 1


async def test_a_reply_awaited_before_it_arrives_is_handed_to_that_read(link: Link) -> None:
    whole, body = op_msg(1, {"ok": 1})
    waiting = asyncio.create_task(link.read(1))
    await asyncio.sleep(0.05)
    await link.send(whole)
    assert await waiting == (body, OP_MSG)


async def test_a_compressed_reply_is_decompressed_as_pymongo_does(link: Link) -> None:
    _, body = op_msg(1, {"ok": 1, "text": "y" * 5000})
    await link.send(compressed(1, body))
    assert await link.read(1) == (body, OP_MSG)


async def test_unread_replies_pause_reading_past_the_bound_and_a_read_resumes_it(link: Link) -> None:
    replies = [op_msg(i, {"ok": 1, "n": i}) for i in range(1, MAX_UNREAD_REPLIES + 4)]
    first, later = replies[: MAX_UNREAD_REPLIES + 1], replies[MAX_UNREAD_REPLIES + 1 :]
    await link.send(b"".join(whole for whole, _ in first))
    await asyncio.sleep(0.1)
    assert not link.protocol.transport.is_reading()
    await link.send(b"".join(whole for whole, _ in later))
    await asyncio.sleep(0.1)
    assert len(link.protocol._done_messages) == len(first)  # the later ones wait in the socket
    for response_to, (_, body) in enumerate(replies, start=1):
        assert await link.read(response_to) == (body, OP_MSG)
    assert link.protocol.transport.is_reading()


@pytest.mark.parametrize(
    ("length", "error"),
    [(16, "not longer than standard message header size"), (MAX_MESSAGE_SIZE + 1, "larger than server max")],
)
async def test_a_reply_of_impossible_length_closes_the_connection_with_pymongos_error(
    link: Link, length: int, error: str
) -> None:
    waiting = asyncio.create_task(link.read(1))
    await asyncio.sleep(0.05)
    await link.send(struct.pack("<iiii", length, 7, 1, OP_MSG) + b"\x00" * 16)
    with pytest.raises(ProtocolError, match=error):
        await waiting
    assert link.protocol.transport.is_closing()


async def test_a_reply_whose_reader_gave_up_closes_the_connection(link: Link) -> None:
    waiting = asyncio.create_task(link.read(1))
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await link.send(op_msg(1, {"ok": 1})[0])
    await asyncio.sleep(0.05)
    assert link.protocol.transport.is_closing()
