"""Which migrations run outside a transaction, and the one shape such a migration may take (no I/O)."""

from __future__ import annotations

import pytest

from command_service.migrate import Migration, load_migrations


def test_the_shipped_migrations_run_in_transactions_except_the_reader_index() -> None:
    shapes = {m.name: m.concurrent_index for m in load_migrations()}
    assert shapes["0005_events_xact_id_index.sql"] == "events_xact_id_position"
    assert [name for name, index in shapes.items() if index is not None] == ["0005_events_xact_id_index.sql"]


@pytest.mark.parametrize(
    ("sql", "index"),
    [
        ("ALTER TABLE events ADD COLUMN note text;", None),
        ("-- built CONCURRENTLY elsewhere\nCREATE INDEX IF NOT EXISTS a ON events (x);", None),
        ("-- why\ncreate unique index concurrently if not exists Events_Note\n  on events (note);\n", "events_note"),
        ("CREATE INDEX CONCURRENTLY IF NOT EXISTS b ON events (x)", "b"),
    ],
)
def test_a_concurrent_index_migration_is_recognised_by_its_one_statement(sql: str, index: str | None) -> None:
    assert Migration(9, "0009_x.sql", sql).concurrent_index == index


@pytest.mark.parametrize(
    "sql",
    [
        "CREATE INDEX CONCURRENTLY b ON events (x);",  # a rerun after a crash would fail on the existing index
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS b ON events (x); CREATE INDEX CONCURRENTLY IF NOT EXISTS c ON e (y);",
        "ALTER TABLE events ADD COLUMN n int; CREATE INDEX CONCURRENTLY IF NOT EXISTS b ON events (n);",
        "DROP INDEX CONCURRENTLY IF EXISTS b;",
    ],
)
def test_any_other_concurrently_migration_is_refused(sql: str) -> None:
    with pytest.raises(ValueError, match="holds exactly one statement"):
        _ = Migration(9, "0009_x.sql", sql).concurrent_index
