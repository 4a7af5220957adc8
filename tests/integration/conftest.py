"""Fixtures for tests of single components against the real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import pytest

from command_service.event_store import EventStore
from command_service.group_commit import GroupCommitter
from command_service.migrate import migrate
from tests.support import create_database


@pytest.fixture
async def event_store_dsn(postgres_dsn: str, unique_name: str) -> str:
    """A fresh, migrated database of its own for this test."""
    dsn = await create_database(postgres_dsn, unique_name)
    await migrate(dsn)
    return dsn


@pytest.fixture
async def pg_pool(event_store_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(event_store_dsn, min_size=1, max_size=40, timeout=10, command_timeout=10)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture(params=["own-transactions", "group-commit"])
async def event_store(request: pytest.FixtureRequest, pg_pool: asyncpg.Pool) -> AsyncIterator[EventStore]:
    """The event store in both write modes: every guarantee must hold with and without group commit."""
    committer = GroupCommitter(pg_pool, timeout=10) if request.param == "group-commit" else None
    store = EventStore(pg_pool, committer=committer)
    try:
        yield store
    finally:
        await store.close()
