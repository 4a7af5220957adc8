"""A migration never stalls the event store's appends behind a long transaction: its DDL waits for table locks
at most `lock_timeout`, then gives up, tries again, and finally fails applying nothing.

PostgreSQL grants lock requests in order, so an ALTER TABLE waiting for a reader's lock makes every append that
arrives after it wait too; without the bound they would wait as long as the reader runs.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from command_service.event_store import EventStore
from command_service.migrate import Migration, MigrationLocked, migrate_connection
from tests.support import registered_customer

EXTRA = Migration(99, "0099_note_column.sql", "ALTER TABLE events ADD COLUMN note text")
LOCK_TIMEOUT = 0.5


async def _has_note_column(pool: asyncpg.Pool) -> bool:
    columns = await pool.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'events'")
    return "note" in {row["column_name"] for row in columns}


async def test_a_migration_behind_a_long_transaction_gives_up_and_appends_keep_flowing(
    event_store_dsn: str, pg_pool: asyncpg.Pool
) -> None:
    store = EventStore(pg_pool)
    await registered_customer(store)
    reader = await asyncpg.connect(event_store_dsn)  # a long report: holds its lock on `events` until it ends
    migrator = await asyncpg.connect(event_store_dsn)
    try:
        report = reader.transaction()
        await report.start()
        await reader.fetch("SELECT position FROM events LIMIT 1")
        started = time.monotonic()
        migrating = asyncio.create_task(
            migrate_connection(migrator, [EXTRA], lock_timeout=LOCK_TIMEOUT, attempts=3, retry_pause=0.2)
        )
        # Appends while the ALTER TABLE waits and between its attempts: each waits at most one lock_timeout.
        for _ in range(5):
            await asyncio.sleep(0.1)
            append_started = time.monotonic()
            await asyncio.wait_for(registered_customer(store), timeout=5)
            assert time.monotonic() - append_started < LOCK_TIMEOUT + 1.0
        with pytest.raises(MigrationLocked, match=r"0099_note_column\.sql could not take its table locks: 3 waits"):
            await asyncio.wait_for(migrating, timeout=30)
        assert time.monotonic() - started < 3 * LOCK_TIMEOUT + 0.2 + 0.4 + 3.0
        assert not await _has_note_column(pg_pool)  # nothing of it applied
        assert await pg_pool.fetchval("SELECT count(*) FROM schema_migrations WHERE version = 99") == 0
        await report.rollback()  # the report ends: the migration goes through
        assert await migrate_connection(migrator, [EXTRA], lock_timeout=LOCK_TIMEOUT) == [EXTRA.name]
        assert await _has_note_column(pg_pool)
        assert await pg_pool.fetchval("SELECT count(*) FROM events") == 6
    finally:
        await reader.close()
        await migrator.close()


async def test_a_lock_released_between_attempts_lets_the_migration_through(
    event_store_dsn: str, pg_pool: asyncpg.Pool
) -> None:
    reader = await asyncpg.connect(event_store_dsn)
    migrator = await asyncpg.connect(event_store_dsn)
    try:
        report = reader.transaction()
        await report.start()
        await reader.fetch("SELECT position FROM events LIMIT 1")
        migrating = asyncio.create_task(
            migrate_connection(migrator, [EXTRA], lock_timeout=LOCK_TIMEOUT, attempts=4, retry_pause=0.5)
        )
        await asyncio.sleep(LOCK_TIMEOUT + 0.2)  # the first attempt has given up
        assert not migrating.done()
        await report.rollback()
        assert await asyncio.wait_for(migrating, timeout=30) == [EXTRA.name]
        assert await _has_note_column(pg_pool)
    finally:
        await reader.close()
        await migrator.close()
