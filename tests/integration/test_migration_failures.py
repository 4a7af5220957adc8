"""A migration that fails says which one, why, and what remains of it, in one line from `cqrs migrate` (exit 2):
PostgreSQL refusing a statement leaves nothing; a connection lost in the middle of a concurrent index build leaves
an invalid index that the next run drops and builds again."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from command_service.migrate import Migration, MigrationFailed, migrate_connection
from cqrsctl.main import main
from tests.integration.reader_index import (
    READER_INDEX,
    open_append,
    reader_index_valid,
    until_waiting_for_a_lock,
    without_reader_index,
)
from tests.support import create_database

LOST = (
    r"^migration 0005_events_xact_id_index\.sql failed, PostgreSQL was lost or is not taking work "
    r"\(\w+: .*terminating connection due to administrator command\); "
    r"index events_xact_id_position may be left invalid \(queries do not use it\); the next run drops it"
)


async def test_a_statement_postgresql_refuses_applies_nothing_of_its_migration(
    event_store_dsn: str, pg_pool: asyncpg.Pool
) -> None:
    refused = Migration(
        98, "0098_two_steps.sql", "ALTER TABLE events ADD COLUMN note text; ALTER TABLE nowhere ADD x int;"
    )
    conn = await asyncpg.connect(event_store_dsn)
    try:
        with pytest.raises(MigrationFailed) as failed:
            await migrate_connection(conn, [refused])
    finally:
        await conn.close()
    assert str(failed.value) == (
        'migration 0098_two_steps.sql failed, PostgreSQL refused it: 42P01 relation "nowhere" does not exist; '
        "nothing of it was applied"
    )
    columns = await pg_pool.fetch("SELECT column_name FROM information_schema.columns WHERE table_name = 'events'")
    assert "note" not in {row["column_name"] for row in columns}
    assert await pg_pool.fetchval("SELECT count(*) FROM schema_migrations WHERE version = 98") == 0


async def test_cqrs_migrate_reports_a_refused_migration_in_one_line(
    postgres_dsn: str, unique_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn = await create_database(postgres_dsn, unique_name)
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("CREATE VIEW events AS SELECT 1 AS position")  # not the table the first migration makes
    finally:
        await conn.close()
    code = await asyncio.to_thread(main, ["migrate", "--dsn", dsn])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("cqrs migrate: migration 0001_event_store.sql failed, PostgreSQL refused it: ")
    assert err.endswith("; nothing of it was applied\n") and err.count("\n") == 1


async def test_a_build_whose_connection_is_lost_is_reported_and_built_by_the_next_run(
    event_store_dsn: str, pg_pool: asyncpg.Pool
) -> None:
    """The migrator's backend is terminated while its concurrent build waits for an open append, three times."""
    for _ in range(3):
        await without_reader_index(pg_pool)
        writer, append = await open_append(event_store_dsn)
        migrator = await asyncpg.connect(event_store_dsn)
        try:
            migrating = asyncio.create_task(migrate_connection(migrator, [READER_INDEX], lock_timeout=30))
            await until_waiting_for_a_lock(pg_pool, migrator)
            assert await pg_pool.fetchval("SELECT pg_terminate_backend($1)", migrator.get_server_pid())
            with pytest.raises(MigrationFailed, match=LOST):
                await asyncio.wait_for(migrating, timeout=10)
            assert await reader_index_valid(pg_pool) is False
            await append.rollback()
            rerun = await asyncpg.connect(event_store_dsn)
            try:
                assert await migrate_connection(rerun, [READER_INDEX]) == [READER_INDEX.name]
            finally:
                await rerun.close()
            assert await reader_index_valid(pg_pool) is True
        finally:
            await writer.close()
            await migrator.close()
