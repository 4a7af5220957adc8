"""The peer comparison: single-event appends to fresh streams by 32 concurrent writers, same server, same duration.

* The `eventsourcing` library (9.5, PostgreSQL persistence through psycopg 3, its own tables in its own
  database): 32 threads (it is a synchronous library) each saving new aggregates of a trivial `Aggregate`
  class: one `Created` event per save, one transaction per save.
* Our `EventStore.append` (asyncpg): 32 asyncio tasks in one process, each appending one `OrderCreated` event to
  a fresh stream with a distinct request id: events + outbox row + request log in one transaction, exactly what a
  CreateOrder command writes. In a database of its own (migrated here), so no relay publishes these events.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import threading
import time
import uuid
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from command_service.config import CommandServiceSettings
from command_service.event_store import EventStore, RequestRecord, keep_session
from command_service.group_commit import GroupCommitter
from command_service.migrate import migrate
from core.envelope import EventMetadata
from core.order_events import ORDER_STREAM_TYPE, OrderCreated
from core.values import Address

ADDRESS = Address("Ada Lovelace", "12 Analytical St", "", "London", "N1 9GU", "GB")


def eventsourcing_appends(dsn: str, writers: int, duration: float) -> dict[str, Any]:
    """Saves of single-event aggregates by `writers` threads sharing one Application; saves/s."""
    from eventsourcing.application import Application
    from eventsourcing.domain import Aggregate

    class Thing(Aggregate):
        """A trivial aggregate: creating it records exactly one event."""

    parts = urlsplit(dsn)
    app: Application[Any] = Application(
        env={
            "PERSISTENCE_MODULE": "eventsourcing.postgres",
            "POSTGRES_DBNAME": parts.path.lstrip("/"),
            "POSTGRES_HOST": parts.hostname or "127.0.0.1",
            "POSTGRES_PORT": str(parts.port or 5432),
            "POSTGRES_USER": parts.username or "postgres",
            "POSTGRES_PASSWORD": parts.password or "",
            "POSTGRES_POOL_SIZE": str(writers),
            "POSTGRES_MAX_OVERFLOW": "0",
        }
    )
    try:
        app.save(Thing())  # creates the tables and warms the pool before the clock starts
        counts = [0] * writers
        errors: list[BaseException] = []
        deadline = time.monotonic() + duration

        def writer(i: int) -> None:
            try:
                while time.monotonic() < deadline:
                    app.save(Thing())
                    counts[i] += 1
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(writers)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=duration + 60)
        elapsed = time.monotonic() - started
        if errors:
            raise RuntimeError(f"eventsourcing writer failed: {errors[0]!r}") from errors[0]
    finally:
        app.close()
    return {"rate": sum(counts) / elapsed, "saves": sum(counts), "version": importlib.metadata.version("eventsourcing")}


async def our_appends(dsn: str, writers: int, duration: float) -> dict[str, Any]:
    """`EventStore.append` of one event to fresh streams from `writers` concurrent tasks; appends/s."""
    await migrate(dsn)
    pool = await asyncpg.create_pool(dsn, min_size=writers, max_size=writers, reset=keep_session)
    defaults = CommandServiceSettings()
    # Configured as command_service runs it: concurrent appends share transactions (group commit).
    committer = GroupCommitter(
        pool,
        timeout=defaults.postgres_timeout_seconds,
        max_batch=defaults.group_commit_max_batch,
        flushers=defaults.group_commit_flushers,
    )
    store = EventStore(pool, committer=committer)
    try:
        counts = [0] * writers
        customer_id = str(uuid.uuid4())

        async def append_one() -> None:
            order_id = str(uuid.uuid4())
            request_id = str(uuid.uuid4())
            await store.append(
                stream_type=ORDER_STREAM_TYPE,
                stream_id=order_id,
                expected_version=0,
                events=[OrderCreated(order_id, customer_id, "EUR", ADDRESS)],
                metadata=EventMetadata(request_id, request_id, request_id),
                request=RequestRecord(request_id, "CreateOrder", request_id),
                last_position=0,
            )

        await append_one()  # warm up before the clock starts
        deadline = time.monotonic() + duration

        async def writer(i: int) -> None:
            while time.monotonic() < deadline:
                await append_one()
                counts[i] += 1

        started = time.monotonic()
        await asyncio.gather(*(writer(i) for i in range(writers)))
        elapsed = time.monotonic() - started
    finally:
        await store.close()
        await pool.close()
    return {"rate": sum(counts) / elapsed, "appends": sum(counts)}
