"""A migration never stalls the event store's appends behind a long transaction: its DDL waits for table locks
at most `lock_timeout`, then gives up, tries again, and finally fails applying nothing.

PostgreSQL grants lock requests in order, so an ALTER TABLE waiting for a reader's lock makes every append that
arrives after it wait too; without the bound they would wait as long as the reader runs. An index on `events` is
built CONCURRENTLY, outside a transaction: appends go on while it builds and while it waits for the transactions
that were writing when it started; an interrupted build's invalid index is dropped and built again by the next run.
"""

from __future__ import annotations

import asyncio
import time

import asyncpg
import pytest

from command_service.event_store import EventStore
from command_service.migrate import Migration, MigrationLocked, load_migrations, migrate, migrate_connection
from tests.integration.reader_index import (
    READER_INDEX,
    open_append,
    reader_index_valid,
    until_waiting_for_a_lock,
    without_reader_index,
)
from tests.support import create_database, registered_customer

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


async def test_the_reader_index_builds_while_appends_keep_flowing(event_store_dsn: str, pg_pool: asyncpg.Pool) -> None:
    """A plain CREATE INDEX would queue for its SHARE lock behind the open append, and every append after it would
    queue behind that (here for the whole lock_timeout, on a large store for the whole build)."""
    store = EventStore(pg_pool)
    await without_reader_index(pg_pool)
    writer, append = await open_append(event_store_dsn)
    migrator = await asyncpg.connect(event_store_dsn)
    try:
        migrating = asyncio.create_task(migrate_connection(migrator, [READER_INDEX], lock_timeout=10, attempts=1))
        await until_waiting_for_a_lock(pg_pool, migrator)  # for the open append to end
        for _ in range(5):
            append_started = time.monotonic()
            await asyncio.wait_for(registered_customer(store), timeout=5)
            assert time.monotonic() - append_started < 1.0
        assert not migrating.done()
        await append.rollback()
        assert await asyncio.wait_for(migrating, timeout=30) == [READER_INDEX.name]
        assert await reader_index_valid(pg_pool) is True
        assert await pg_pool.fetchval("SELECT count(*) FROM events") == 5
    finally:
        await writer.close()
        await migrator.close()


async def test_an_index_build_cut_short_is_built_again_by_the_next_run(
    event_store_dsn: str, pg_pool: asyncpg.Pool
) -> None:
    """Each time out leaves an invalid index (PostgreSQL keeps it); IF NOT EXISTS alone would keep it for good."""
    await without_reader_index(pg_pool)
    writer, append = await open_append(event_store_dsn)
    migrator = await asyncpg.connect(event_store_dsn)
    try:
        with pytest.raises(MigrationLocked, match=r"0005_events_xact_id_index\.sql could not take its table locks"):
            await migrate_connection(migrator, [READER_INDEX], lock_timeout=LOCK_TIMEOUT, attempts=2, retry_pause=0.1)
        assert await reader_index_valid(pg_pool) is False
        assert await pg_pool.fetchval("SELECT count(*) FROM schema_migrations WHERE version = 5") == 0
        await append.rollback()
        assert await migrate_connection(migrator, [READER_INDEX], lock_timeout=LOCK_TIMEOUT) == [READER_INDEX.name]
        assert await reader_index_valid(pg_pool) is True
        assert await migrator.fetchval("SHOW lock_timeout") == "0"  # the session's setting is back
    finally:
        await writer.close()
        await migrator.close()


async def test_migrators_started_together_on_a_new_database_all_succeed(postgres_dsn: str, unique_name: str) -> None:
    """Replicas or Jobs started at once. A migrator blocked in `pg_advisory_lock` would keep a snapshot that the
    concurrent index build waits for while it holds the lock: PostgreSQL would fail one of them as a deadlock."""
    shipped = [m.name for m in load_migrations()]
    for round_ in range(3):
        dsn = await create_database(postgres_dsn, f"{unique_name}_{round_}")
        results = await asyncio.wait_for(asyncio.gather(*(migrate(dsn) for _ in range(3))), timeout=60)
        assert sorted(results, key=len) == [[], [], shipped]  # one applied everything, the others found it done
        conn = await asyncpg.connect(dsn)
        try:
            assert await conn.fetchval("SELECT count(*) FROM schema_migrations") == len(shipped)
        finally:
            await conn.close()
