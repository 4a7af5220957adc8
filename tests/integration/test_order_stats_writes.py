"""Customer order statistics written by increment or recompute, each a compare-and-set on `order_stats_seq`, on
the real MongoDB-wire server: an increment reads no order; one that other increments overtook is made again on the
current statistics, one a recompute overtook is recomputed; a recompute that keeps being overtaken gives up and
reports the customer refused."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterable
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from core.projections.customers import COLLECTION as CUSTOMERS
from core.projections.orders import COLLECTION as ORDERS
from projector.order_stats import ORDERS_PER_AGGREGATION, STATS_ATTEMPTS, OrderStatsViews, StatsWrite, StoredStats
from tests.support import StartedCommands

Doc = dict[str, Any]
CUSTOMER = "cust-1"


def order(order_id: str, version: int, status: str, total: int) -> Doc:
    return {
        "_id": order_id,
        "customer_id": CUSTOMER,
        "version": version,
        "status": status,
        "currency": "EUR",
        "total_minor": total,
        "deleted": False,
    }


def placed(doc: Doc) -> Doc:
    return {**doc, "version": doc["version"] + 1, "status": "PLACED"}


@pytest.fixture
async def logged(mongo_url: str, unique_name: str) -> AsyncIterator[tuple[AsyncDatabase[Doc], StartedCommands]]:
    log = StartedCommands()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True, event_listeners=[log])
    try:
        yield client[unique_name], log
    finally:
        await client.drop_database(unique_name)
        await client.close()


async def stats_of(database: AsyncDatabase[Doc]) -> Doc:
    doc = await database[CUSTOMERS].find_one({"_id": CUSTOMER})
    assert doc is not None
    return doc


async def write_orders(database: AsyncDatabase[Doc], docs: Iterable[Doc]) -> None:
    for doc in docs:
        await database[ORDERS].replace_one({"_id": doc["_id"]}, doc, upsert=True)


async def place(
    database: AsyncDatabase[Doc], views: OrderStatsViews, draft: Doc, prior: dict[str, StoredStats]
) -> StatsWrite:
    """A batch placing `draft`: its order write, then the statistics by increment on `prior`."""
    await write_orders(database, [placed(draft)])
    return await views.write_order_stats([CUSTOMER], None, {CUSTOMER: [(draft, placed(draft))]}, prior)


# Both drafts of the overtaking tests placed, each counted once.
BOTH_PLACED = {
    "draft_orders": 0,
    "placed_orders": 2,
    "cancelled_orders": 0,
    "placed_totals": [{"currency": "EUR", "total_minor": 1200}],
}


async def test_an_increment_reads_no_order_and_a_recompute_agrees_with_it(
    logged: tuple[AsyncDatabase[Doc], StartedCommands],
) -> None:
    database, log = logged
    views = OrderStatsViews(database)
    drafts = [order(f"o{n}", 3, "DRAFT", 100 * n) for n in range(1, 4)]
    await write_orders(database, drafts)
    first = await views.write_order_stats([CUSTOMER])  # no statistics yet: recomputed
    assert first == StatsWrite([], [], [CUSTOMER])
    start = await stats_of(database)
    assert (start["order_stats_seq"], start["order_stats_version"]) == (1, 9)

    prior = await views.read_order_stats([CUSTOMER])
    log.commands.clear()
    await write_orders(database, [placed(drafts[1])])
    write = await views.write_order_stats([CUSTOMER], None, {CUSTOMER: [(drafts[1], placed(drafts[1]))]}, prior)
    assert write == StatsWrite([CUSTOMER], [], [])
    assert [name for name, _ in log.commands] == ["update", "update"]  # our order write, then the statistics
    incremented = await stats_of(database)
    assert incremented["order_stats"] == {
        "draft_orders": 2,
        "placed_orders": 1,
        "cancelled_orders": 0,
        "placed_totals": [{"currency": "EUR", "total_minor": 200}],
    }
    assert (incremented["order_stats_seq"], incremented["order_stats_version"]) == (2, 10)

    await views.recompute_order_stats([CUSTOMER])
    recomputed = await stats_of(database)
    assert recomputed["order_stats"] == incremented["order_stats"]
    assert recomputed["order_stats_seq"] == 3


async def test_an_increment_overtaken_by_another_increment_is_made_again_on_the_current_statistics(
    logged: tuple[AsyncDatabase[Doc], StartedCommands],
) -> None:
    """Replica A reads the statistics before writing its order; replica B writes another order and the statistics
    (an increment) in between. A's increment, on the base it read, would drop B's placement: its compare-and-set
    fails, and since only increments came between (none of which can have counted A's order), A adds its change to
    the statistics as they are now, without reading a single order."""
    database, log = logged
    replica_a, replica_b = OrderStatsViews(database), OrderStatsViews(database)
    drafts = [order("o1", 2, "DRAFT", 500), order("o2", 2, "DRAFT", 700)]
    await write_orders(database, drafts)
    await replica_a.write_order_stats([CUSTOMER])

    prior_a = await replica_a.read_order_stats([CUSTOMER])
    b = await place(database, replica_b, drafts[1], await replica_b.read_order_stats([CUSTOMER]))
    assert b == StatsWrite([CUSTOMER], [], [])
    log.commands.clear()
    a = await place(database, replica_a, drafts[0], prior_a)
    assert a == StatsWrite([], [CUSTOMER], [])
    assert a.counts() == {"increment": 0, "redone": 1, "recompute": 0}
    # The order, the overtaken compare-and-set, the statistics read again, the increment on them: no aggregation.
    assert [name for name, _ in log.commands] == ["update", "update", "find", "update"]

    final = await stats_of(database)
    assert final["order_stats"] == BOTH_PLACED
    assert (final["order_stats_seq"], final["order_stats_version"]) == (3, 6)
    assert final["order_stats_increments"] == {"since": 1, "until": 3}  # the two increments after the recompute
    await replica_a.recompute_order_stats([CUSTOMER])
    assert (await stats_of(database))["order_stats"] == BOTH_PLACED


async def test_an_increment_overtaken_by_a_recompute_is_recomputed_and_counts_its_order_once(
    logged: tuple[AsyncDatabase[Doc], StartedCommands],
) -> None:
    """Replica A reads the statistics and writes its order; replica B recomputes the statistics from the orders,
    A's new one included. A's increment must not be made again on B's statistics (it would count A's placement
    twice): fails if it is."""
    database, _ = logged
    replica_a, replica_b = OrderStatsViews(database), OrderStatsViews(database)
    # A third order stays a draft: counted twice, A's placement would leave no counter below zero to give it away.
    drafts = [order("o1", 2, "DRAFT", 500), order("o2", 2, "DRAFT", 700), order("o3", 2, "DRAFT", 900)]
    await write_orders(database, drafts)
    await replica_a.write_order_stats([CUSTOMER])
    await place(database, replica_b, drafts[1], await replica_b.read_order_stats([CUSTOMER]))

    prior_a = await replica_a.read_order_stats([CUSTOMER])  # within a run of increments
    await write_orders(database, [placed(drafts[0])])
    await replica_b.recompute_order_stats([CUSTOMER])  # counts A's placement already
    a = await replica_a.write_order_stats([CUSTOMER], None, {CUSTOMER: [(drafts[0], placed(drafts[0]))]}, prior_a)
    assert a == StatsWrite([], [], [CUSTOMER])
    assert (await stats_of(database))["order_stats"] == {**BOTH_PLACED, "draft_orders": 1}


class OvertakenEveryTime(OrderStatsViews):
    """A replica that another one overtakes between every read of the counter and its write (the other writes
    the statistics right after each read)."""

    def __init__(self, database: AsyncDatabase[Doc]) -> None:
        super().__init__(database)
        self._database = database
        self.reads = 0

    async def read_order_stats(self, customer_ids: Iterable[str]) -> dict[str, StoredStats]:
        stored = await super().read_order_stats(customer_ids)
        self.reads += 1
        await self._database[CUSTOMERS].update_one({"_id": CUSTOMER}, {"$inc": {"order_stats_seq": 1}})
        return stored


async def test_a_recompute_overtaken_every_time_gives_up_after_its_attempts_and_reports_the_customer(
    logged: tuple[AsyncDatabase[Doc], StartedCommands], caplog: pytest.LogCaptureFixture
) -> None:
    database, _ = logged
    await write_orders(database, [order("o1", 1, "DRAFT", 0)])
    await OrderStatsViews(database).write_order_stats([CUSTOMER])
    contended = OvertakenEveryTime(database)
    failed: set[str] = set()
    with caplog.at_level(logging.WARNING, logger="projector.order_stats"):
        await contended.recompute_order_stats([CUSTOMER], failed)
    assert failed == {CUSTOMER}
    assert contended.reads == STATS_ATTEMPTS
    assert f"order statistics of {CUSTOMER} kept changing" in caplog.text and "other replicas" in caplog.text
    with pytest.raises(PyMongoError, match="kept changing"):
        await contended.recompute_order_stats([CUSTOMER])
    failed.clear()
    assert await contended.write_order_stats([CUSTOMER], failed) == StatsWrite([], [], [])  # given up: none written
    assert failed == {CUSTOMER}

    calm = OrderStatsViews(database)
    failed.clear()
    await calm.recompute_order_stats([CUSTOMER], failed)
    assert failed == set()


async def test_a_recompute_reads_busy_customers_in_aggregations_of_their_own(
    logged: tuple[AsyncDatabase[Doc], StartedCommands],
) -> None:
    """One aggregation reads every order of its customers: a call for several busy ones outlasted the socket
    timeout on the MongoDB-wire server, and the batch's retry recomputed them again, for ever. The customers'
    stored statistics say how many orders each has; a call stays within `ORDERS_PER_AGGREGATION` of them."""
    database, log = logged
    views = OrderStatsViews(database)
    busy = {"draft_orders": ORDERS_PER_AGGREGATION, "placed_orders": 0, "cancelled_orders": 0, "placed_totals": []}
    for customer in ("busy-1", "busy-2", "small"):
        await database[ORDERS].insert_one({**order(f"{customer}-o", 2, "DRAFT", 100), "customer_id": customer})
    for customer in ("busy-1", "busy-2"):  # as counted before most of their orders were deleted, say
        await database[CUSTOMERS].insert_one({"_id": customer, "order_stats": busy, "order_stats_seq": 1})
    log.commands.clear()
    write = await views.write_order_stats(["busy-1", "busy-2", "small"])  # no prior statistics: recomputed
    assert write == StatsWrite([], [], ["busy-1", "busy-2", "small"])
    read = [cmd["pipeline"][0]["$match"]["customer_id"]["$in"] for name, cmd in log.commands if name == "aggregate"]
    assert read == [["busy-1"], ["busy-2", "small"]]  # "small" has no statistics yet: it counts for nothing
    for customer in ("busy-1", "busy-2", "small"):
        doc = await database[CUSTOMERS].find_one({"_id": customer})
        assert doc is not None and doc["order_stats"]["draft_orders"] == 1, doc
