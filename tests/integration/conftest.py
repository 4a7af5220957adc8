"""Fixtures for tests of single components against the real servers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from pymongo import AsyncMongoClient

from command_service.event_store import EventStore
from command_service.group_commit import GroupCommitter
from command_service.migrate import migrate
from tests.support import StartedCommands, create_database

Doc = dict[str, Any]


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


@pytest.fixture
async def logged(mongo_url: str, unique_name: str) -> AsyncIterator[tuple[AsyncMongoClient[Doc], StartedCommands]]:
    """A MongoDB client that logs every command it sends; the test's database is dropped after it."""
    log = StartedCommands()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True, event_listeners=[log])
    try:
        yield client, log
    finally:
        await client.drop_database(unique_name)
        await client.close()
