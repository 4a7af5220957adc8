"""`python -m bench.view_growth`: how the cost of the two derived views that read accumulated data grows with it.

The projector's per-event cost should not depend on how much the read model already holds. Two views still do:

* the sales report: each shard of a day keeps the tags of the facts it counted until `projector.sales_tags`
  forgets those their orders' checkpoints cover, and each roll-up reads all of the day's shards: measured with
  every tag of the day held (as before the sweeper) and after a sweep;
* the customer statistics, when recomputed: that aggregates every order of the customer, so an order event costs
  more the more orders its customer has. The projector increments them instead where it can (an order whose
  views are complete, the usual case); the increment reads the stored statistics and writes them back.

This measures them with the projector's own writers (`SalesViews.count`, `OrderStatsViews.recompute_order_stats`,
`OrderStatsViews.read_order_stats` + `write_order_stats`) against a fresh local MongoDB-wire server, at growing
sizes: for each size, the MongoDB-wire server's CPU (from /proc) and the wall time of one batch of three
placements after that many facts of the day, of one recompute of a customer with that many orders, and of one
increment of that customer's statistics (one order cancelled). Orders are folded from real events by the
`orders` projection (change log included), so documents have their production shape. A lever that removes the
growth flattens its column; run it before and after.

    python -m bench.view_growth [--sizes 250 1000 4000] [--repeats 20]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import bson
from pymongo import AsyncMongoClient

from bench.cpu import window
from core.envelope import EventMetadata, RecordedEvent
from core.events import Event
from core.order_events import OrderCreated, OrderItemAdded, OrderPlaced
from core.projections import Document
from core.projections.orders import ORDERS
from core.projections.sales import SHARDS_COLLECTION
from core.values import Address
from localservers import MongoServer, free_port
from projector.mongo_writer import MongoDocument, ReadModelWriter
from projector.order_stats import OrderStatsViews
from projector.sales_tags import MAX_CHECKS_PER_SWEEP, SalesTagSweeper
from projector.sales_views import SalesViews
from projector.view_sources import Step

ADDRESS = Address("Ada Lovelace", "12 Analytical St", "", "London", "N1 9GU", "GB")
BATCH = 3  # placements per measured sales batch (the size of a live batch)
SEED_BATCH = 100


# The items of the measured orders: (sku, name, quantity, unit price in cents).
ITEMS: Final = (("SKU-1", "Anvil", 2, 1999), ("SKU-2", "Bell", 1, 500))


def placed_order(
    order_id: str, customer_id: str, at: datetime, items: Sequence[tuple[str, str, int, int]] = ITEMS
) -> Document:
    """An order document as the projector writes it after create, `items` and place (change log included)."""
    events: list[Event] = [
        OrderCreated(order_id, customer_id, "EUR", ADDRESS),
        *(OrderItemAdded(*item) for item in items),
        OrderPlaced(),
    ]
    doc: Document | None = None
    for version, event in enumerate(events, 1):
        recorded = RecordedEvent(
            event_id=uuid.uuid4(),
            stream_type=ORDERS.stream_type,
            stream_id=order_id,
            version=version,
            event_type=event.event_type,
            schema_version=event.schema_version,
            payload=event.to_payload(),
            metadata=EventMetadata(f"req-{uuid.uuid4().hex[:8]}", "bench", "bench"),
            position=version,
            recorded_at=at,
        )
        doc = ORDERS.project(doc, recorded, event)
    assert doc is not None
    return doc


def orders_of(customer_id: str, count: int, at: datetime) -> dict[str, Document]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    return {order_id: placed_order(order_id, customer_id, at) for order_id in ids}


async def measured(
    server_pid: int,
    call: Callable[[], Awaitable[object]],
    repeats: int,
    prepare: Callable[[], Awaitable[object]] | None = None,
) -> tuple[float, float]:
    """Mean server CPU ms (the kernel counts it in 10 ms ticks: only the mean of many calls is exact enough) and
    median wall ms of `call`, each time after `prepare`, which is not measured."""
    cpu: list[float] = []
    wall: list[float] = []
    for _ in range(repeats):
        if prepare is not None:
            await prepare()
        with window({"mongo": [server_pid]}, client=False) as spent:
            started = time.perf_counter()
            await call()
            wall.append(1000 * (time.perf_counter() - started))
        cpu.append(1000 * (spent.cpu_s["mongo"] or 0.0))
    return statistics.mean(cpu), statistics.median(wall)


async def sales_growth(client: AsyncMongoClient[MongoDocument], pid: int, size: int, repeats: int) -> list[float]:
    """Server CPU and wall ms of a batch of placements after `size` facts of the day, and the shards' bytes: with
    every tag of the day held, then once the orders' checkpoints cover them and `SalesTagSweeper` forgot them."""
    database = client[f"sales_{size}"]
    views = SalesViews(database)
    await views.ensure_indexes()
    at = datetime.now(UTC)
    seeded = orders_of("seed-customer", size, at)
    ids = list(seeded)
    for start in range(0, size, SEED_BATCH):
        await views.count(ids[start : start + SEED_BATCH], docs=seeded)
    counted = dict(seeded)

    async def one_batch() -> None:
        batch = orders_of("new-customer", BATCH, at)
        counted.update(batch)
        await views.count(batch, docs=batch)

    async def shards_kilobytes() -> float:
        return sum([len(bson.encode(doc)) async for doc in database[SHARDS_COLLECTION].find()]) / 1024

    held = [*await measured(pid, one_batch, repeats), await shards_kilobytes()]
    # What the projector leaves: the orders written, their checkpoints at their versions; two sweeps forget.
    docs = list(counted.values())
    for start in range(0, len(docs), SEED_BATCH):
        chunk = docs[start : start + SEED_BATCH]
        await database[ORDERS.collection].insert_many(chunk)
        await database["checkpoints"].insert_many(
            [{"_id": d["_id"], "stream_type": ORDERS.stream_type, "version": d["version"]} for d in chunk]
        )
    sweeper = SalesTagSweeper(database, grace=0.0)

    async def sweep_all() -> None:  # a backlog this size takes several sweeps (`MAX_CHECKS_PER_SWEEP`)
        for _ in range(2 + len(docs) // MAX_CHECKS_PER_SWEEP):
            await sweeper.sweep()

    swept, _ = await measured(pid, sweep_all, 1)
    print(f"[view_growth] {size}: sweeping {len(docs)} tags: server CPU {swept:.0f} ms", file=sys.stderr)
    forgotten = [*await measured(pid, one_batch, repeats), await shards_kilobytes()]
    await client.drop_database(database.name)
    return [*held, *forgotten]


async def stats_growth(client: AsyncMongoClient[MongoDocument], pid: int, size: int, repeats: int) -> list[float]:
    """Server CPU and wall ms of recomputing the statistics of a customer with `size` orders."""
    database = client[f"stats_{size}"]
    views = OrderStatsViews(database)
    await ReadModelWriter(database, ORDERS).ensure_indexes()
    customer = "customer-1"
    orders = orders_of(customer, size, datetime.now(UTC))
    documents, order_ids = list(orders.values()), list(orders)
    for start in range(0, size, SEED_BATCH):
        await database[ORDERS.collection].insert_many(documents[start : start + SEED_BATCH])

    async def next_order_event() -> None:  # as a placement would: the sum of the order versions grows
        await database[ORDERS.collection].update_one({"_id": order_ids[0]}, {"$inc": {"version": 1}})

    async def recompute() -> None:
        await views.recompute_order_stats([customer])

    cpu, wall = await measured(pid, recompute, repeats, prepare=next_order_event)

    steps: list[Step] = []

    async def cancel_next_order() -> None:  # the order write of the batch (not measured): one placed order fewer
        before = await database[ORDERS.collection].find_one({"_id": order_ids[len(steps) + 1]})
        assert before is not None
        after = {**before, "version": before["version"] + 1, "status": "CANCELLED"}
        await database[ORDERS.collection].replace_one({"_id": before["_id"]}, after)
        steps.append((before, after))

    async def increment() -> None:  # as the pipeline does: read the statistics, then write them incremented
        prior = await views.read_order_stats([customer])
        write = await views.write_order_stats([customer], None, {customer: [steps[-1]]}, prior)
        assert write.incremented == [customer], "the bench measures the increment, not a recompute"

    increment_cpu, increment_wall = await measured(pid, increment, repeats, prepare=cancel_next_order)
    await client.drop_database(database.name)
    return [cpu, wall, increment_cpu, increment_wall]


async def run(sizes: list[int], repeats: int) -> list[list[float]]:
    with tempfile.TemporaryDirectory(prefix="cqrs-view-growth-") as workdir:
        server = MongoServer(Path(workdir) / "mongo", free_port())
        server.start()
        try:
            assert server.pid is not None
            client: AsyncMongoClient[MongoDocument] = AsyncMongoClient(server.url, tz_aware=True)
            try:
                rows = []
                for size in sizes:
                    sales = await sales_growth(client, server.pid, size, repeats)
                    stats = await stats_growth(client, server.pid, size, repeats)
                    rows.append([float(size), *sales, *stats])
                    print(f"[view_growth] {size}: sales {sales}, statistics {stats}", file=sys.stderr, flush=True)
                return rows
            finally:
                await client.close()
        finally:
            server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.view_growth", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[250, 1000, 4000], help="facts / orders per size")
    parser.add_argument("--repeats", type=int, default=20, help="measured calls per size (default 20)")
    args = parser.parse_args(argv)
    rows = asyncio.run(run(args.sizes, args.repeats))
    print(
        f"| size (facts of the day / orders of the customer) | sales batch of {BATCH}, every tag held: server CPU ms "
        "| wall ms | shards KB | tags forgotten: server CPU ms | wall ms | shards KB "
        "| statistics recompute: server CPU ms | wall ms | statistics increment: server CPU ms | wall ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size, *sales, stats_cpu, stats_wall, inc_cpu, inc_wall in rows:
        held = f"{sales[0]:.1f} | {sales[1]:.1f} | {sales[2]:,.0f}"
        forgotten = f"{sales[3]:.1f} | {sales[4]:.1f} | {sales[5]:,.0f}"
        stats = f"{stats_cpu:.1f} | {stats_wall:.1f} | {inc_cpu:.1f} | {inc_wall:.1f}"
        print(f"| {size:,.0f} | {held} | {forgotten} | {stats} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
