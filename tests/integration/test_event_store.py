"""Event store + handler guarantees against a real PostgreSQL: concurrency, idempotency, atomicity."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

from command_service.domain import commands as cmd
from command_service.event_store import EventStore, RequestRecord, VersionConflict
from command_service.handlers import CommandContext, CommandHandler, order_handler
from core.envelope import EventMetadata
from core.errors import Conflict, FailedPrecondition
from core.order_events import OrderItemAdded
from core.values import Address
from tests.support import registered_customer

ADDRESS = Address("Ada", "1 Main St", "", "London", "N1", "GB")


def ctx(request_id: str | None = None, expected_version: int | None = None, fingerprint: str = "") -> CommandContext:
    rid = request_id or str(uuid.uuid4())
    return CommandContext(request_id=rid, request_hash=fingerprint or rid, expected_version=expected_version)


async def counts(pool: asyncpg.Pool) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM events) e, (SELECT count(*) FROM outbox) o, (SELECT count(*) FROM request_log) r"
    )
    assert row is not None
    return row["e"], row["o"], row["r"]


async def create_order(handler: CommandHandler[Any, cmd.OrderCommand], store: EventStore) -> str:
    order_id = str(uuid.uuid4())
    customer_id = await registered_customer(store)
    await handler.handle(cmd.CreateOrder(order_id, customer_id, "EUR", ADDRESS), ctx())
    return order_id


async def test_append_writes_events_outbox_and_request_log_in_one_go(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    handler = order_handler(event_store)
    order_id = await create_order(handler, event_store)
    reply = await handler.handle(cmd.AddOrderItem(order_id, "SKU-1", "Thing", 2, 150), ctx())
    assert (reply.stream_id, reply.version) == (order_id, 2)
    assert await counts(pg_pool) == (3, 3, 3)  # with the customer's registration
    rows = await pg_pool.fetch("SELECT position, version, event_type, metadata FROM events ORDER BY position")
    assert [r["event_type"] for r in rows] == ["CustomerRegistered", "OrderCreated", "OrderItemAdded"]
    assert reply.position == rows[-1]["position"]


async def test_concurrent_appends_at_one_version_have_exactly_one_winner(event_store: EventStore) -> None:
    handler = order_handler(event_store)
    order_id = await create_order(handler, event_store)
    meta = EventMetadata("r", "r", "r")

    async def attempt(i: int) -> bool:
        try:
            await event_store.append(
                stream_type="order",
                stream_id=order_id,
                expected_version=1,
                events=[OrderItemAdded(f"SKU-{i}", "x", 1, 1)],
                metadata=meta,
                request=RequestRecord(f"req-{i}", "AddOrderItem", f"h{i}"),
                last_position=0,
            )
            return True
        except VersionConflict:
            return False

    results = await asyncio.gather(*(attempt(i) for i in range(20)))
    assert results.count(True) == 1
    events = await event_store.load_stream(order_id)
    assert [e.version for e in events] == [1, 2]


async def test_concurrent_commands_with_expected_version_one_wins_rest_aborted(event_store: EventStore) -> None:
    handler = order_handler(event_store)
    order_id = await create_order(handler, event_store)

    async def attempt(i: int) -> str:
        try:
            await handler.handle(cmd.AddOrderItem(order_id, f"SKU-{i}", "x", 1, 1), ctx(expected_version=1))
            return "ok"
        except Conflict:
            return "aborted"

    results = await asyncio.gather(*(attempt(i) for i in range(10)))
    assert results.count("ok") == 1 and results.count("aborted") == 9
    assert [e.version for e in await event_store.load_stream(order_id)] == [1, 2]


async def test_concurrent_commands_without_expected_version_all_land_in_distinct_versions(
    event_store: EventStore,
) -> None:
    handler = order_handler(event_store, max_attempts=50)
    order_id = await create_order(handler, event_store)
    replies = await asyncio.gather(
        *(handler.handle(cmd.AddOrderItem(order_id, f"SKU-{i}", "x", 1, 1), ctx()) for i in range(8))
    )
    assert sorted(r.version for r in replies) == list(range(2, 10))
    assert [e.version for e in await event_store.load_stream(order_id)] == list(range(1, 10))


async def test_repeated_request_id_returns_first_reply_and_writes_nothing(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    handler = order_handler(event_store)
    order_id = await create_order(handler, event_store)
    first = await handler.handle(cmd.AddOrderItem(order_id, "SKU-1", "x", 1, 1), ctx("add-once"))
    before = await counts(pg_pool)
    again = await handler.handle(cmd.AddOrderItem(order_id, "SKU-1", "x", 1, 1), ctx("add-once"))
    assert again == first
    assert await counts(pg_pool) == before


async def test_concurrent_duplicates_of_one_request_write_once(event_store: EventStore, pg_pool: asyncpg.Pool) -> None:
    handler = order_handler(event_store)
    order_id = await create_order(handler, event_store)
    before = await counts(pg_pool)
    replies = await asyncio.gather(
        *(handler.handle(cmd.AddOrderItem(order_id, "SKU-9", "x", 1, 1), ctx("same-request")) for _ in range(10))
    )
    assert len(set(replies)) == 1
    assert await counts(pg_pool) == (before[0] + 1, before[1] + 1, before[2] + 1)


async def test_concurrent_duplicates_of_one_create_write_once(event_store: EventStore, pg_pool: asyncpg.Pool) -> None:
    handler = order_handler(event_store)
    customer_id = await registered_customer(event_store)
    order_id = str(uuid.uuid4())
    before = await counts(pg_pool)
    create = cmd.CreateOrder(order_id, customer_id, "EUR", ADDRESS)
    replies = await asyncio.gather(*(handler.handle(create, ctx("create-once")) for _ in range(10)))
    assert len(set(replies)) == 1
    assert await counts(pg_pool) == (before[0] + 1, before[1] + 1, before[2] + 1)


async def test_repeats_return_the_first_reply_even_after_later_changes(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    """A repeat is answered from the request log whatever the stream looks like now, and writes nothing."""
    handler = order_handler(event_store)
    order_id = await create_order(handler, event_store)
    add = cmd.AddOrderItem(order_id, "SKU-1", "x", 1, 1)
    first = await handler.handle(add, ctx("add", expected_version=1))
    noop = await handler.handle(cmd.ChangeItemQuantity(order_id, "SKU-1", 1), ctx("noop"))  # already 1
    await handler.handle(cmd.AddOrderItem(order_id, "SKU-2", "y", 1, 1), ctx())
    before = await counts(pg_pool)
    assert await handler.handle(add, ctx("add", expected_version=1)) == first  # version 1 is long gone
    assert await handler.handle(cmd.ChangeItemQuantity(order_id, "SKU-1", 1), ctx("noop")) == noop
    assert await counts(pg_pool) == before


async def test_request_id_reused_for_another_command_is_refused_and_writes_nothing(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    handler = order_handler(event_store)
    order_id = await create_order(handler, event_store)
    await handler.handle(cmd.AddOrderItem(order_id, "SKU-1", "x", 1, 1), ctx("rid", fingerprint="first"))
    before = await counts(pg_pool)
    with pytest.raises(FailedPrecondition, match="already used"):
        await handler.handle(cmd.AddOrderItem(order_id, "SKU-2", "x", 1, 1), ctx("rid", fingerprint="second"))
    assert await counts(pg_pool) == before


async def test_rejected_command_writes_nothing(event_store: EventStore, pg_pool: asyncpg.Pool) -> None:
    handler = order_handler(event_store)
    order_id = await create_order(handler, event_store)
    before = await counts(pg_pool)
    with pytest.raises(FailedPrecondition):
        await handler.handle(cmd.PlaceOrder(order_id), ctx())  # no lines yet
    with pytest.raises(Conflict):
        await handler.handle(cmd.AddOrderItem(order_id, "SKU-1", "x", 1, 1), ctx(expected_version=7))
    assert await counts(pg_pool) == before


async def test_noop_command_is_logged_but_writes_no_event(event_store: EventStore, pg_pool: asyncpg.Pool) -> None:
    handler = order_handler(event_store)
    order_id = await create_order(handler, event_store)
    added = await handler.handle(cmd.AddOrderItem(order_id, "SKU-1", "x", 2, 1), ctx())
    before = await counts(pg_pool)
    same = await handler.handle(cmd.ChangeItemQuantity(order_id, "SKU-1", 2), ctx())
    assert (same.version, same.position) == (added.version, added.position)
    assert await counts(pg_pool) == (before[0], before[1], before[2] + 1)


async def test_migrations_are_idempotent(event_store_dsn: str) -> None:
    from command_service.migrate import migrate

    assert await migrate(event_store_dsn) == []
    assert list(await asyncio.gather(migrate(event_store_dsn), migrate(event_store_dsn))) == [[], []]
