"""The relay lease: which command_service replica relays the outbox, with failover bounded in time.

A PostgreSQL session-level advisory lock, held on a connection of its own, that the server releases by itself
when the holder stops proving it is alive:

* the session runs with `idle_session_timeout`: the holder sends a heartbeat (`SELECT 1`) every third of it, so
  a holder that is frozen (SIGSTOP, a stalled VM) or cut off (half-open TCP) goes quiet and the server ends its
  session, which releases the lock; a standby takes over on its next attempt. TCP keepalives and
  `tcp_user_timeout` on the server side close a dead peer's socket sooner still.
* a holder that comes back after losing the lease learns it from its next heartbeat (the session is gone) and
  stops relaying; what it published meanwhile is harmless (Nats-Msg-Id dedupe, the projector's version guard).
* a replica whose own connection broke while the server kept the session (the client saw a timeout, the server
  did not) does not wait for its orphaned session to time out: it terminates the session it remembers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import asyncpg

from command_service.outages import CONNECTION_LOST

log = logging.getLogger(__name__)

RELAY_LOCK_KEY = 0x0C0A5_0002
CONNECT_TIMEOUT_SECONDS = 5.0


@dataclass(frozen=True, slots=True)
class Session:
    """A server session, identified across restarts (pids are reused)."""

    pid: int
    started: str


def lease_holder_name() -> str:
    """`application_name` of the lease session: which host and process holds the relay (pg_stat_activity)."""
    return f"cqrs-relay {socket.gethostname()[:40]} pid={os.getpid()}"


class LeaseLost(Exception):
    """The lease's session ended (server restart, idle timeout after a freeze, network failure)."""


class RelayLease:
    """One attempt at holding the relay lock; make a new one after it is lost or released."""

    def __init__(self, dsn: str, lease_seconds: float, previous_session: Session | None = None) -> None:
        self._dsn = dsn
        self._lease_seconds = lease_seconds
        self._conn: asyncpg.Connection | None = None
        self.previous_session = previous_session
        self.session: Session | None = None  # this lease's server session, once connected

    @property
    def _query_timeout(self) -> float:
        return max(1.0, self._lease_seconds / 3)

    async def acquire(self, poll_interval: float, stopping: Callable[[], bool]) -> bool:
        """Waits until this replica holds the lock (True) or `stopping()` (False). Raises on connection failure."""
        self._conn = await asyncpg.connect(
            self._dsn,
            timeout=CONNECT_TIMEOUT_SECONDS,
            server_settings={
                "application_name": lease_holder_name(),
                "idle_session_timeout": f"{int(self._lease_seconds * 1000)}",
                "tcp_keepalives_idle": "5",
                "tcp_keepalives_interval": "2",
                "tcp_keepalives_count": "3",
                "tcp_user_timeout": f"{int(self._lease_seconds * 1000)}",
            },
        )
        started = await self._conn.fetchval(
            "SELECT backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            timeout=self._query_timeout,
        )
        self.session = Session(self._conn.get_server_pid(), str(started))
        while not stopping():
            if await self._conn.fetchval(
                "SELECT pg_try_advisory_lock($1)", RELAY_LOCK_KEY, timeout=self._query_timeout
            ):
                return True
            await self._end_own_orphaned_session()
            await asyncio.sleep(poll_interval)  # standby: another replica is relaying
        return False

    async def _end_own_orphaned_session(self) -> None:
        """Terminates our previous session if it is the one still holding the lock (see the module docstring)."""
        old, self.previous_session = self.previous_session, None
        if old is None or self._conn is None:
            return
        # pid *and* start time: after a server restart the pid may belong to another replica's session.
        ended = await self._conn.fetchval(
            """SELECT pg_terminate_backend(l.pid) FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
                WHERE l.locktype = 'advisory' AND l.granted AND l.pid = $1 AND a.backend_start::text = $2
                  AND ((l.classid::bigint << 32) | l.objid::bigint) = $3""",
            old.pid,
            old.started,
            RELAY_LOCK_KEY,
            timeout=self._query_timeout,
        )
        if ended:
            log.warning("outbox relay: ended this replica's orphaned lock session (backend pid %d)", old.pid)

    async def hold(self) -> None:
        """Heartbeats until the session ends; then raises LeaseLost. Cancel it to stop holding."""
        assert self._conn is not None
        interval = self._lease_seconds / 3
        while True:
            await asyncio.sleep(interval)
            try:
                await self._conn.fetchval("SELECT 1", timeout=self._query_timeout)
            except CONNECTION_LOST as exc:
                raise LeaseLost(f"relay lease session ended: {exc!r}") from exc

    async def release(self) -> None:
        """Closes the session (which releases the lock); never raises, never waits long."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            await asyncio.wait_for(conn.close(), timeout=2.0)
        except Exception:
            conn.terminate()
