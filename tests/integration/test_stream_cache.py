"""The command side's stream cache against a real PostgreSQL: a cached stream saves the read, and a cache left behind
by another replica's writes never changes an answer (it costs one more round trip, never a wrong decision)."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from command_service.domain import commands as cmd
from command_service.domain.customer_commands import DeactivateCustomer, RenameCustomer
from command_service.event_store import EventStore
from command_service.handlers import CommandContext, customer_handler, order_handler
from command_service.stream_cache import EVENTS_PER_STREAM, PROBE_EVERY, StaleRatio, StreamCache
from core.errors import AlreadyExists, Conflict, FailedPrecondition, NotFound
from core.values import Address
from tests.support import registered_customer

ADDRESS = Address("Ada", "1 Main St", "", "London", "N1", "GB")


def ctx(expected_version: int | None = None, request_id: str | None = None) -> CommandContext:
    rid = request_id or str(uuid.uuid4())
    return CommandContext(request_id=rid, request_hash=rid, expected_version=expected_version)


class Replica:
    """One command_service replica's handlers over the shared event store, with its own cache and metrics."""

    def __init__(self, store: EventStore, capacity: int = 100, max_attempts: int = 5, window: int = 64) -> None:
        self.registry = CollectorRegistry()
        self.streams = StreamCache(store, capacity, self.registry, StaleRatio(window))
        self.orders = order_handler(store, max_attempts, streams=self.streams)
        self.customers = customer_handler(store, streams=self.streams)

    def reads(self, result: str) -> float:
        return self.registry.get_sample_value("cqrs_command_stream_cache_reads_total", {"result": result}) or 0.0

    def stale(self) -> float:
        return self.registry.get_sample_value("cqrs_command_stream_cache_stale_total") or 0.0

    def trusted(self) -> float | None:
        return self.registry.get_sample_value("cqrs_command_stream_cache_trusted")


async def versions(pool: asyncpg.Pool, stream_id: str) -> list[int]:
    rows = await pool.fetch("SELECT version FROM events WHERE stream_id = $1 ORDER BY version", stream_id)
    return [row["version"] for row in rows]


async def new_order(replica: Replica, store: EventStore) -> str:
    order_id = str(uuid.uuid4())
    await replica.orders.handle(cmd.CreateOrder(order_id, await registered_customer(store), "EUR", ADDRESS), ctx())
    return order_id


async def test_commands_on_a_stream_this_replica_wrote_read_nothing_from_postgresql(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    replica = Replica(event_store)
    order_id = await new_order(replica, event_store)
    misses = replica.reads("miss")
    for n in range(5):
        reply = await replica.orders.handle(cmd.AddOrderItem(order_id, f"SKU-{n}", "Thing", 1, 100), ctx())
        assert reply.version == n + 2
    await replica.orders.handle(cmd.PlaceOrder(order_id), ctx())
    assert replica.reads("miss") == misses  # every decision came from the cache
    assert replica.reads("hit") >= 6
    assert await versions(pg_pool, order_id) == list(range(1, 8))


async def test_two_replicas_writing_one_order_in_turn_lose_no_write_and_skip_no_version(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    a, b = Replica(event_store), Replica(event_store)
    order_id = await new_order(a, event_store)
    for n in range(8):
        writer = (a, b)[n % 2]
        reply = await writer.orders.handle(cmd.AddOrderItem(order_id, f"SKU-{n}", "Thing", 1, 100), ctx())
        assert reply.version == n + 2
    assert await versions(pg_pool, order_id) == list(range(1, 10))
    assert a.stale() >= 3  # each of a's turns after b's found its cache behind, and decided again
    rows = await pg_pool.fetch(
        "SELECT payload->>'sku' AS sku FROM events WHERE stream_id = $1 AND event_type = 'OrderItemAdded'", order_id
    )
    assert sorted(row["sku"] for row in rows) == [f"SKU-{n}" for n in range(8)]


async def test_concurrent_commands_through_two_caches_have_one_winner_per_version(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    a, b = Replica(event_store, max_attempts=50), Replica(event_store, max_attempts=50)  # 10 racing writers
    order_id = await new_order(a, event_store)
    await b.orders.handle(cmd.AddOrderItem(order_id, "SKU-0", "Thing", 1, 100), ctx())  # both caches hold it now
    await a.orders.handle(cmd.AddOrderItem(order_id, "SKU-1", "Thing", 1, 100), ctx())
    replies = await asyncio.gather(
        *(
            (a, b)[n % 2].orders.handle(cmd.AddOrderItem(order_id, f"SKU-{n}", "Thing", 1, 100), ctx())
            for n in range(2, 12)
        )
    )
    assert sorted(reply.version for reply in replies) == list(range(4, 14))
    assert await versions(pg_pool, order_id) == list(range(1, 14))


async def test_a_rejection_decided_on_a_stale_cache_is_checked_against_postgresql_first(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    a, b = Replica(event_store), Replica(event_store)
    order_id = await new_order(a, event_store)  # a holds the order without lines
    await b.orders.handle(cmd.AddOrderItem(order_id, "SKU-1", "Thing", 1, 100), ctx())
    # a's cache has no SKU-1 line: the change would be refused on it, but the order in PostgreSQL has that line.
    reply = await a.orders.handle(cmd.ChangeItemQuantity(order_id, "SKU-1", 3), ctx())
    assert reply.version == 3
    # The client's expected version is right and a's cache is behind it: accepted, not a false conflict.
    await b.orders.handle(cmd.AddOrderItem(order_id, "SKU-2", "Thing", 1, 100), ctx())
    assert (await a.orders.handle(cmd.PlaceOrder(order_id), ctx(expected_version=4))).version == 5
    # A true rejection stays a rejection, and writes nothing.
    with pytest.raises(FailedPrecondition):
        await b.orders.handle(cmd.AddOrderItem(order_id, "SKU-3", "Thing", 1, 100), ctx())
    with pytest.raises(Conflict, match="not the expected version 4"):
        await b.orders.handle(cmd.CancelOrder(order_id, "changed my mind"), ctx(expected_version=4))
    assert await versions(pg_pool, order_id) == [1, 2, 3, 4, 5]


async def test_a_customer_deactivated_through_another_replica_cannot_get_an_order_from_a_stale_cache(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    a, b = Replica(event_store), Replica(event_store)
    customer_id = await registered_customer(event_store)
    await a.orders.handle(cmd.CreateOrder(str(uuid.uuid4()), customer_id, "EUR", ADDRESS), ctx())  # a: active
    await b.customers.handle(DeactivateCustomer(customer_id), ctx())
    refused = str(uuid.uuid4())
    with pytest.raises(FailedPrecondition, match="deactivated"):
        await a.orders.handle(cmd.CreateOrder(refused, customer_id, "EUR", ADDRESS), ctx())
    assert await versions(pg_pool, refused) == []
    assert a.stale() == 1  # the append's guard on the customer's version caught it


async def test_a_customer_changed_through_another_replica_only_makes_the_order_decide_again(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    a, b = Replica(event_store), Replica(event_store)
    customer_id = await registered_customer(event_store)
    await a.orders.handle(cmd.CreateOrder(str(uuid.uuid4()), customer_id, "EUR", ADDRESS), ctx())
    await b.customers.handle(RenameCustomer(customer_id, "Ada B."), ctx())  # a's cached customer is now behind
    order_id = str(uuid.uuid4())
    reply = await a.orders.handle(cmd.CreateOrder(order_id, customer_id, "EUR", ADDRESS), ctx())
    assert reply.version == 1 and a.stale() == 1


async def test_a_repeated_request_id_on_a_cached_stream_returns_the_first_reply_and_writes_nothing(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    replica = Replica(event_store)
    order_id = await new_order(replica, event_store)
    first = await replica.orders.handle(cmd.AddOrderItem(order_id, "SKU-1", "Thing", 1, 100), ctx(request_id="r-1"))
    again = await replica.orders.handle(cmd.AddOrderItem(order_id, "SKU-1", "Thing", 1, 100), ctx(request_id="r-1"))
    assert again == first
    assert await versions(pg_pool, order_id) == [1, 2]


async def test_the_cache_keeps_at_most_its_capacity_least_recently_used_first_out(event_store: EventStore) -> None:
    writer = Replica(event_store)
    first, second, third = [await new_order(writer, event_store) for _ in range(3)]
    replica = Replica(event_store, capacity=2)
    for stream_id in (first, second, first, third):  # third evicts second, the least recently used
        await replica.streams.read(stream_id)
    assert (replica.reads("miss"), replica.reads("hit")) == (3, 1)
    assert (await replica.streams.read(first)) is not None and replica.reads("hit") == 2
    assert (await replica.streams.read(second)) is not None and replica.reads("miss") == 4
    assert replica.registry.get_sample_value("cqrs_command_stream_cache_streams") == 2


async def test_a_cache_of_size_zero_reads_every_stream_from_postgresql(event_store: EventStore) -> None:
    replica = Replica(event_store, capacity=0)
    order_id = await new_order(replica, event_store)
    misses = replica.reads("miss")
    await replica.orders.handle(cmd.AddOrderItem(order_id, "SKU-1", "Thing", 1, 100), ctx())
    assert replica.reads("miss") == misses + 1 and replica.reads("hit") == 0


async def test_creating_a_stream_the_cache_does_not_hold_reads_nothing(event_store: EventStore) -> None:
    replica = Replica(event_store)
    customer_id = await registered_customer(event_store)
    await replica.orders.handle(cmd.CreateOrder(str(uuid.uuid4()), customer_id, "EUR", ADDRESS), ctx())
    misses = replica.reads("miss")  # the customer, read once
    for _ in range(3):
        await replica.orders.handle(cmd.CreateOrder(str(uuid.uuid4()), customer_id, "EUR", ADDRESS), ctx())
    assert replica.reads("miss") == misses


async def test_creating_a_stream_that_exists_after_all_gets_the_answer_it_got_without_a_cache(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    a, b = Replica(event_store), Replica(event_store)
    customer_id = await registered_customer(event_store)
    order_id = str(uuid.uuid4())
    create = cmd.CreateOrder(order_id, customer_id, "EUR", ADDRESS)
    first = await b.orders.handle(create, ctx(request_id="create-1"))
    assert await a.orders.handle(create, ctx(request_id="create-1")) == first  # a repeat: the first reply
    b2 = Replica(event_store)
    with pytest.raises(AlreadyExists):
        await b2.orders.handle(create, ctx())  # another request for an order that exists
    with pytest.raises(NotFound, match=f"order {customer_id} not found"):  # the id names a customer's stream
        await Replica(event_store).orders.handle(cmd.CreateOrder(customer_id, customer_id, "EUR", ADDRESS), ctx())
    assert await versions(pg_pool, order_id) == [1]
    assert await versions(pg_pool, customer_id) == [1]


async def test_the_cache_holds_at_most_twenty_events_per_stream_of_its_capacity(event_store: EventStore) -> None:
    writer = Replica(event_store)
    short, long = await new_order(writer, event_store), await new_order(writer, event_store)
    for n in range(EVENTS_PER_STREAM):  # long: 1 + 20 events, more than a cache of one stream may hold
        await writer.orders.handle(cmd.AddOrderItem(long, f"SKU-{n}", "Thing", 1, 100), ctx())
    replica = Replica(event_store, capacity=1)
    for stream_id in (long, long, short, short):
        await replica.streams.read(stream_id)
    assert (replica.reads("miss"), replica.reads("hit")) == (3, 1)  # the long stream is read every time
    assert replica.registry.get_sample_value("cqrs_command_stream_cache_streams") == 1


async def test_a_replica_whose_cached_streams_keep_going_stale_reads_postgresql_until_they_stop(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    """Per-request round robin (every command of an order goes to the other replica than the one before) makes
    nearly every cached decision stale: the cache stops answering, but for a probe every PROBE_EVERY reads; once
    one replica has the orders to itself, the probes find the cache current and it answers again."""
    a, b = Replica(event_store, window=8), Replica(event_store, window=8)
    orders = [await new_order(a, event_store) for _ in range(4)]
    for n in range(6):
        for order_id in orders:
            for writer in (b, a):
                await writer.orders.handle(cmd.AddOrderItem(order_id, f"SKU-{n}-{id(writer)}", "Thing", 1, 1), ctx())
    assert a.trusted() == 0 and b.trusted() == 0
    hits, stale = a.reads("hit"), a.stale()
    for n in range(2 * PROBE_EVERY):  # still round robin: only the probes use the cache (and find it stale)
        order_id = orders[n % len(orders)]
        await b.orders.handle(cmd.AddOrderItem(order_id, f"SKU-rr-{n}", "Thing", 1, 1), ctx())
        await a.orders.handle(cmd.ChangeItemQuantity(order_id, f"SKU-rr-{n}", 2), ctx())
    assert a.reads("hit") - hits <= 2 * 2  # a probe per PROBE_EVERY reads (the order's and the customer's)
    assert a.stale() - stale <= 2

    for n in range(40 * PROBE_EVERY):  # sticky: a alone (window 8: about 20 probes bring the ratio down)
        await a.orders.handle(cmd.AddOrderItem(orders[n % len(orders)], f"SKU-a-{n}", "Thing", 1, 1), ctx())
        if a.trusted() == 1:
            break
    assert a.trusted() == 1
    misses = a.reads("miss")
    for order_id in orders:
        await a.orders.handle(cmd.AddOrderItem(order_id, "SKU-last", "Thing", 1, 1), ctx())
    assert a.reads("miss") == misses  # trusted again: every decision came from the cache
    for order_id in orders:  # and nothing was lost on the way
        rows = await pg_pool.fetch("SELECT version FROM events WHERE stream_id = $1 ORDER BY version", order_id)
        assert [row["version"] for row in rows] == list(range(1, len(rows) + 1))


async def test_a_command_that_changes_nothing_is_decided_again_when_another_replica_moved_the_stream(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    """A no-op writes no event, so only its own stream's guard shows that the cached stream it was decided on is
    behind: the change another replica made is never acknowledged as undone."""
    a, b = Replica(event_store), Replica(event_store)
    customer_id = await registered_customer(event_store)
    await a.customers.handle(RenameCustomer(customer_id, "Ann"), ctx())  # a caches the name Ann
    await b.customers.handle(RenameCustomer(customer_id, "Bob"), ctx())  # a is behind
    reply = await a.customers.handle(RenameCustomer(customer_id, "Ann"), ctx())
    assert reply.version == await pg_pool.fetchval("SELECT max(version) FROM events WHERE stream_id = $1", customer_id)
    assert reply.version == 4, "the rename back to Ann was acknowledged without being written"
    assert a.stale() == 1

    order_id = await new_order(a, event_store)
    await a.orders.handle(cmd.AddOrderItem(order_id, "SKU-1", "Thing", 1, 100), ctx())  # a caches quantity 1
    await b.orders.handle(cmd.ChangeItemQuantity(order_id, "SKU-1", 5), ctx())
    reply = await a.orders.handle(cmd.ChangeItemQuantity(order_id, "SKU-1", 1), ctx())
    assert reply.version == 4 and await versions(pg_pool, order_id) == [1, 2, 3, 4]


async def test_a_command_that_changes_nothing_on_a_stale_stream_gets_the_answer_postgresql_gives(
    event_store: EventStore,
) -> None:
    a, b = Replica(event_store), Replica(event_store)
    customer_id = await registered_customer(event_store)
    await a.customers.handle(RenameCustomer(customer_id, "Ann"), ctx())  # version 2, cached by a
    await b.customers.handle(RenameCustomer(customer_id, "Bob"), ctx())  # version 3
    with pytest.raises(Conflict, match="at version 3, not the expected version 2"):
        await a.customers.handle(RenameCustomer(customer_id, "Ann"), ctx(expected_version=2))
    await b.customers.handle(RenameCustomer(customer_id, "Ann"), ctx())  # version 4
    await a.customers.handle(RenameCustomer(customer_id, "Ann"), ctx())  # a re-reads: version 4, a no-op
    await b.customers.handle(DeactivateCustomer(customer_id), ctx())
    with pytest.raises(FailedPrecondition, match="deactivated"):
        await a.customers.handle(RenameCustomer(customer_id, "Ann"), ctx())
