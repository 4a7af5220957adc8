"""A small asyncio TCP fault proxy put between a service and one dependency (PostgreSQL, NATS or MongoDB).

Modes (switched at any time, from the test's event loop):

* pass-through (`heal()`): bytes flow both ways unchanged;
* `latency(seconds)`: every chunk is held `seconds` before it is forwarded, in both directions;
* `blackhole()`: the connections that exist stay open but nothing flows on them any more (both directions are
  read and discarded, so neither side sees an error, a FIN or backpressure); new connections are accepted and
  treated the same way. This is a half-open connection as a client sees it behind a lost NAT entry, a failed-over
  load balancer or a pulled cable: only the client's own timeouts can tell;
* `reset()`: every open connection is closed with a TCP RST (both sides), and new connections are reset as soon as
  they are accepted, until `heal()`.

`heal()` lets *new* connections flow again. A connection that was blackholed stays dead (it is never revived),
because a real half-open connection does not come back either: the client has to notice and reconnect by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024


@dataclass(eq=False)
class _Connection:
    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    dead: bool = False  # blackholed: everything read from either side is discarded
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def _abort_with_rst(writer: asyncio.StreamWriter | None) -> None:
    """Closes the socket so that the kernel sends RST instead of FIN (SO_LINGER on, timeout 0)."""
    if writer is None:
        return
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class FaultProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to `upstream_host:upstream_port` unless told otherwise."""

    def __init__(self, upstream_host: str, upstream_port: int, name: str = "proxy") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.name = name
        self.mode = "pass"
        self._latency = 0.0
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self.accepted = 0

    @property
    def port(self) -> int:
        assert self._server is not None, "proxy not started"
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self._connections):
            self._drop(conn, rst=False)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), timeout=2)
            self._server = None

    # ------------------------------------------------------------------------------------------- modes

    def latency(self, seconds: float) -> None:
        """Adds `seconds` to every chunk forwarded on the live connections (and new ones)."""
        self.mode, self._latency = "latency", seconds
        log.info("%s: latency %.3fs", self.name, seconds)

    def blackhole(self) -> None:
        """Nothing flows any more on the open connections nor on new ones; nobody is told."""
        self.mode = "blackhole"
        for conn in self._connections:
            conn.dead = True
        log.info("%s: blackhole (%d connections now half-open)", self.name, len(self._connections))

    def reset(self) -> None:
        """Resets every open connection (RST to both sides); new connections are reset on accept until heal."""
        self.mode = "reset"
        count = len(self._connections)
        for conn in list(self._connections):
            self._drop(conn, rst=True)
        log.info("%s: reset %d connections", self.name, count)

    def heal(self) -> None:
        """New connections flow normally again (blackholed ones stay dead, as real half-open connections do)."""
        self.mode, self._latency = "pass", 0.0
        log.info("%s: healed", self.name)

    # ------------------------------------------------------------------------------------------- plumbing

    def _drop(self, conn: _Connection, *, rst: bool) -> None:
        self._connections.discard(conn)
        for task in conn.tasks:
            task.cancel()
        for writer in (conn.client, conn.upstream):
            if writer is None:
                continue
            if rst:
                _abort_with_rst(writer)
            else:
                with contextlib.suppress(Exception):
                    writer.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self.mode == "reset":
            _abort_with_rst(writer)
            return
        conn = _Connection(client=writer, dead=self.mode == "blackhole")
        self._connections.add(conn)
        try:
            if conn.dead:
                # Accepted, never connected upstream: the client waits for an answer that never comes.
                await self._discard(reader)
                return
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.upstream_host, self.upstream_port), timeout=5
                )
            except (OSError, TimeoutError):
                return  # the dependency is down: the client sees its connection closed
            conn.upstream = up_writer
            if conn not in self._connections:  # reset while we were connecting
                _abort_with_rst(up_writer)
                return
            conn.tasks = [
                asyncio.create_task(self._pump(conn, reader, up_writer)),
                asyncio.create_task(self._pump(conn, up_reader, writer)),
            ]
            await asyncio.wait(conn.tasks, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            pass
        finally:
            if conn in self._connections:
                self._drop(conn, rst=False)

    async def _discard(self, reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while await reader.read(_CHUNK):
                pass

    async def _pump(self, conn: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                data = await reader.read(_CHUNK)
                if not data:
                    if conn.dead:
                        # The other side of a half-open connection left: nobody on this side hears of it either.
                        # Keep the peer's socket as it is until its owner gives up (or we are reset/closed).
                        await asyncio.Event().wait()
                    return
                if conn.dead:
                    continue
                if self.mode == "latency" and self._latency > 0:
                    await asyncio.sleep(self._latency)
                    if conn.dead:
                        continue
                writer.write(data)
                await writer.drain()
        except (OSError, ConnectionError):
            return
