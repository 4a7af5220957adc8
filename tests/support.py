"""Helpers shared by integration and end-to-end tests."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from pymongo.monitoring import CommandFailedEvent, CommandListener, CommandStartedEvent, CommandSucceededEvent

from command_service.domain.customer_commands import RegisterCustomer
from command_service.event_store import EventStore
from command_service.handlers import CommandContext, customer_handler

T = TypeVar("T")

# What a command sent to MongoDB carries besides the command itself.
_SESSION_FIELDS = frozenset({"lsid", "$db", "$clusterTime", "$readPreference", "txnNumber"})


class StartedCommands(CommandListener):
    """Every command a MongoDB client sends (`event_listeners=[...]`), in order: (name, the command without its
    session fields, as `explain` accepts it; `session_fields=True`: as sent)."""

    def __init__(self, *, session_fields: bool = False) -> None:
        self.commands: list[tuple[str, dict[str, Any]]] = []
        self._dropped = frozenset() if session_fields else _SESSION_FIELDS

    def started(self, event: CommandStartedEvent) -> None:
        command = {k: v for k, v in event.command.items() if k not in self._dropped}
        self.commands.append((event.command_name, command))

    def succeeded(self, event: CommandSucceededEvent) -> None:
        pass

    def failed(self, event: CommandFailedEvent) -> None:
        pass


async def eventually(
    probe: Callable[[], Awaitable[T | None]], *, what: str, timeout: float = 15.0, interval: float = 0.05
) -> T:
    """Polls `probe` until it returns a truthy value (returned); fails saying what was awaited and the last value."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while True:
        last = await probe()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}; last value: {last!r}")
        await asyncio.sleep(interval)


def with_database(dsn: str, database: str) -> str:
    """The same server DSN pointing at another database."""
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


async def create_database(server_dsn: str, name: str) -> str:
    """Creates an empty database (name must be a safe identifier) and returns its DSN."""
    conn = await asyncpg.connect(server_dsn, timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(server_dsn, name)


async def registered_customer(store: EventStore, name: str = "Ada Lovelace") -> str:
    """Registers a customer through the real handler (orders need one) and returns its id."""
    customer_id = str(uuid.uuid4())
    request_id = str(uuid.uuid4())
    await customer_handler(store).handle(
        RegisterCustomer(customer_id, name, f"{customer_id}@example.com"),
        CommandContext(request_id=request_id, request_hash=request_id),
    )
    return customer_id
