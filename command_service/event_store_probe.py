"""The readiness probe's own PostgreSQL connection, outside the command pool.

Readiness answers "is PostgreSQL reachable", not "is a pooled connection free": commands holding every pooled
connection (an overload) must neither delay the probe nor fail it. Through the pool the probe would queue in
asyncpg's acquire, which has no bound there, so readiness would stop updating exactly when the pool is busy, and
stay SERVING through an outage that began meanwhile. The probe's one connection is opened on first use and
again after any failure, and every step (connect, query) is bounded by `timeout`.
"""

from __future__ import annotations

import asyncpg


class EventStoreProbe:
    """`check()` asks PostgreSQL `SELECT 1` on a connection of its own; `close()` when done."""

    def __init__(self, dsn: str, timeout: float) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None

    async def check(self) -> None:
        """Returns once PostgreSQL has answered; raises what failed (connecting, the query, a timeout), after
        dropping the connection, so that the next check connects afresh."""
        try:
            if self._conn is None or self._conn.is_closed():
                self._conn = await asyncpg.connect(self._dsn, timeout=self._timeout)
            await self._conn.fetchval("SELECT 1", timeout=self._timeout)
        except TimeoutError as exc:
            self._drop()
            raise TimeoutError(f"no answer within {self._timeout:g}s") from exc
        except BaseException:
            self._drop()
            raise

    async def close(self) -> None:
        """Closes the connection politely within the timeout, else drops it."""
        conn, self._conn = self._conn, None
        if conn is None or conn.is_closed():
            return
        try:
            await conn.close(timeout=self._timeout)
        except Exception:
            conn.terminate()

    def _drop(self) -> None:
        # A connection that failed or timed out has nothing more to say: closed at once, without a goodbye.
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()
