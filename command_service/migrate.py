"""Applies the event-store migrations; idempotent and safe when several processes start at once."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources

import asyncpg

from command_service.outages import CONNECTION_LOST, is_connection_lost
from core.backoff import exponential

log = logging.getLogger(__name__)

# Arbitrary constant: serialises concurrent migrators (e.g. several replicas starting together).
_MIGRATION_LOCK_KEY = 0x0C0A5_0001
_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")
# While another migrator holds the lock: how often to try again (doubling up to the cap).
_LOCK_POLL_SECONDS = 0.05
_LOCK_POLL_CAP_SECONDS = 1.0


# A migration that builds an index without holding up the event store's writes: exactly one statement of this form,
# run outside a transaction (CONCURRENTLY requires it) and with IF NOT EXISTS (a rerun after a crash is harmless).
_CONCURRENT_INDEX = re.compile(
    r"CREATE\s+(?:UNIQUE\s+)?INDEX\s+CONCURRENTLY\s+IF\s+NOT\s+EXISTS\s+([a-z_][a-z0-9_]*)\s+ON\s[^;]+;?", re.I
)


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str
    # The index a concurrent-index migration builds; None for a migration that runs in one transaction.
    concurrent_index: str | None = field(init=False)

    def __post_init__(self) -> None:
        """Raises ValueError for a CONCURRENTLY migration of any other shape than `_CONCURRENT_INDEX`."""
        object.__setattr__(self, "concurrent_index", _concurrent_index(self.name, self.sql))


def _concurrent_index(name: str, sql: str) -> str | None:
    code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--")).strip()
    if not re.search(r"\bCONCURRENTLY\b", code, re.I):
        return None
    match = _CONCURRENT_INDEX.fullmatch(code)
    if match is None:
        raise ValueError(
            f"migration {name}: a CONCURRENTLY migration holds exactly one statement, "
            "`CREATE [UNIQUE] INDEX CONCURRENTLY IF NOT EXISTS <name> ON ...` (it runs outside a transaction)"
        )
    return match.group(1).lower()


def load_migrations() -> list[Migration]:
    """All migrations shipped in command_service/migrations, in version order."""
    found: list[Migration] = []
    for entry in resources.files("command_service.migrations").iterdir():
        match = _NAME.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), entry.name, entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration versions: {versions}")
    return found


# A migration's DDL waits at most this long for its table locks, then gives up and tries again later. PostgreSQL
# queues lock requests in order: while an ALTER TABLE waits behind a long transaction (a report, a stuck client),
# every append that arrives after it waits too, so an unbounded wait would stall the event store's writes.
LOCK_TIMEOUT_SECONDS = 5.0
LOCK_ATTEMPTS = 6
LOCK_RETRY_PAUSE_SECONDS = 5.0  # the first pause; doubled after each attempt, up to the cap
LOCK_RETRY_PAUSE_CAP_SECONDS = 30.0


# What fails a migration: a statement PostgreSQL refuses, or PostgreSQL lost (`command_service.outages`).
_FAILURES: tuple[type[BaseException], ...] = (asyncpg.PostgresError, *CONNECTION_LOST)


class MigrationFailed(RuntimeError):
    """A migration failed (PostgreSQL refused a statement, or the connection was lost); the message says what
    remains of it."""


class MigrationLocked(MigrationFailed):
    """A migration could not take its table locks in any attempt; nothing of it was applied."""


async def migrate(dsn: str, timeout: float = 30.0) -> list[str]:
    """Applies pending migrations, each in one transaction (a concurrent index build outside one); returns the
    names applied (empty when up to date)."""
    conn = await asyncpg.connect(dsn, timeout=timeout)
    try:
        return await migrate_connection(conn)
    finally:
        await conn.close()


async def migrate_connection(
    conn: asyncpg.Connection,
    migrations: Sequence[Migration] | None = None,
    *,
    lock_timeout: float = LOCK_TIMEOUT_SECONDS,
    attempts: int = LOCK_ATTEMPTS,
    retry_pause: float = LOCK_RETRY_PAUSE_SECONDS,
) -> list[str]:
    """`migrate` on a connection the caller opened (and closes); `migrations`: the shipped ones unless given.
    Raises `MigrationLocked` when a migration's locks stay taken for `attempts` waits of `lock_timeout` seconds,
    `MigrationFailed` when PostgreSQL refuses a migration or is lost; the migrations before it stay applied."""
    applied_now: list[str] = []
    await _take_migration_lock(conn)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version    integer PRIMARY KEY,
                   name       text NOT NULL,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for migration in load_migrations() if migrations is None else migrations:
            if migration.version in done:
                continue
            await _apply(conn, migration, lock_timeout, attempts, retry_pause)
            log.info("applied migration %s", migration.name)
            applied_now.append(migration.name)
    finally:
        # A lost connection has released the session's lock already (and the error that lost it is the one to see).
        with contextlib.suppress(*CONNECTION_LOST):
            await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK_KEY)
    return applied_now


async def _take_migration_lock(conn: asyncpg.Connection) -> None:
    """Polls for the migrators' lock instead of blocking on it: a statement that waits keeps its snapshot, and a
    concurrent index build waits for every older snapshot in the database, the waiting migrator's too (a deadlock
    that PostgreSQL would break by failing one of them)."""
    attempt = 0
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _MIGRATION_LOCK_KEY):
        attempt += 1
        await asyncio.sleep(exponential(attempt, _LOCK_POLL_SECONDS, _LOCK_POLL_CAP_SECONDS))


async def _apply(
    conn: asyncpg.Connection, migration: Migration, lock_timeout: float, attempts: int, retry_pause: float
) -> None:
    """One migration, its lock waits bounded by `lock_timeout` (retried `attempts` times)."""
    for attempt in range(1, attempts + 1):
        try:
            if index := migration.concurrent_index:
                await _build_index(conn, migration, index, lock_timeout)
            else:
                async with conn.transaction():
                    await conn.execute(f"SET LOCAL lock_timeout = '{_milliseconds(lock_timeout)}ms'")
                    await conn.execute(migration.sql)
                    await _record(conn, migration)
            return
        except asyncpg.LockNotAvailableError as exc:
            if attempt == attempts:
                raise MigrationLocked(
                    f"migration {migration.name} could not take its table locks: {attempts} waits of "
                    f"{lock_timeout:g} s each, all behind other transactions (pg_stat_activity shows them; "
                    f"{exc}); {_remains(migration)}. Run the migration again once they have ended."
                ) from exc
            pause = exponential(attempt, retry_pause, LOCK_RETRY_PAUSE_CAP_SECONDS)
            log.warning(
                "migration %s waited %g s for its table locks (attempt %d of %d): %s; trying again in %g s",
                migration.name, lock_timeout, attempt, attempts, exc, pause,
            )  # fmt: skip
            await asyncio.sleep(pause)
        except _FAILURES as exc:
            raise MigrationFailed(_failure(migration, exc)) from exc


def _failure(migration: Migration, exc: BaseException) -> str:
    if isinstance(exc, asyncpg.PostgresError) and not is_connection_lost(exc):
        return f"migration {migration.name} failed, PostgreSQL refused it: {exc.sqlstate} {exc}; {_remains(migration)}"
    return (
        f"migration {migration.name} failed, PostgreSQL was lost or is not taking work ({type(exc).__name__}: {exc}); "
        f"{_remains(migration, lost=True)}"
    )


def _remains(migration: Migration, *, lost: bool = False) -> str:
    """What a failed attempt leaves: nothing of a transaction (unless the connection was lost while it committed);
    an invalid index of a concurrent build, which the next run drops."""
    if migration.concurrent_index:
        return (
            f"index {migration.concurrent_index} may be left invalid (queries do not use it); the next run drops it "
            "and builds it again"
        )
    if lost:
        return "it was applied whole or not at all; run the migration again"
    return "nothing of it was applied"


async def _build_index(conn: asyncpg.Connection, migration: Migration, index: str, lock_timeout: float) -> None:
    """A concurrent-index migration, outside a transaction: appends go on while the index builds. A build that
    stopped half-way (a lock timeout, a crash, a duplicate for a unique index) leaves an invalid index behind, which
    IF NOT EXISTS would keep for good: it is dropped first. Its waits for older transactions are lock waits, so
    `lock_timeout` bounds them too (and leaves such an invalid index for the next attempt)."""
    await conn.execute(f"SET lock_timeout = '{_milliseconds(lock_timeout)}ms'")
    try:
        if await conn.fetchval("SELECT NOT indisvalid FROM pg_index WHERE indexrelid = to_regclass($1)", index):
            log.warning("migration %s: dropping the invalid index %s an interrupted build left", migration.name, index)
            await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {index}")
        await conn.execute(migration.sql)
        await _record(conn, migration)
    finally:
        if not conn.is_closed():  # else the error that closed it is the one to report
            await conn.execute("RESET lock_timeout")


async def _record(conn: asyncpg.Connection, migration: Migration) -> None:
    sql = "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)"
    await conn.execute(sql, migration.version, migration.name)


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))
