"""The reader's index on `events` (migration 0005, built CONCURRENTLY) and an append held open beside its build:
what the migration tests share."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from command_service.migrate import load_migrations

(READER_INDEX,) = [m for m in load_migrations() if m.concurrent_index == "events_xact_id_position"]


async def without_reader_index(pool: asyncpg.Pool) -> None:
    """As a store migrated up to 0004 is before 0005."""
    await pool.execute("DROP INDEX IF EXISTS events_xact_id_position")
    await pool.execute("DELETE FROM schema_migrations WHERE version = $1", READER_INDEX.version)


async def reader_index_valid(db: asyncpg.Pool | asyncpg.Connection) -> bool | None:
    """True once built, False for a build left half-way, None when there is no such index."""
    valid: bool | None = await db.fetchval(
        "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass('events_xact_id_position')"
    )
    return valid


async def open_append(dsn: str) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    """A connection in the middle of an append: it holds the lock an INSERT into `events` takes, uncommitted."""
    writer = await asyncpg.connect(dsn)
    append = writer.transaction()
    await append.start()
    await writer.execute("LOCK TABLE events IN ROW EXCLUSIVE MODE")
    return writer, append


async def until_waiting_for_a_lock(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    """Until `conn`'s statement waits for a lock (the index build, for the open append to end)."""
    pid = conn.get_server_pid()
    deadline = time.monotonic() + 10
    while await pool.fetchval("SELECT wait_event_type FROM pg_stat_activity WHERE pid = $1", pid) != "Lock":
        assert time.monotonic() < deadline, "the index build never waited for the open append"
        await asyncio.sleep(0.02)
