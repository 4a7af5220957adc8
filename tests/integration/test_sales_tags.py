"""The sales report's tags are forgotten once their orders' checkpoints cover them, on the real MongoDB-wire server:
the shards hold the facts in flight only, and no fact counts twice, however its order's later events, a crash
before a checkpoint or a redelivered batch come (`projector.sales_tags`, `fact_updates(above=...)`)."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from core.projections.sales import COUNTED_FIELD, SHARDS_COLLECTION, rows_from_orders, sales_documents, shard_of
from projector import sales_tags
from projector.registry import SALES_REPORT
from projector.sales_tags import SalesTagSweeper
from projector.sales_views import MAX_BATCH_AGE_SECONDS, SalesViews
from projector.view_sources import ViewSources
from tests.integration.test_sales_report import Doc, apply_in_batches, mongo, reports, sample_streams
from tests.unit.test_sales_report import D1, D2, order_events

__all__ = ["mongo"]  # the fixture


async def held_tags(database: AsyncDatabase[Doc]) -> list[str]:
    return [tag async for shard in database[SHARDS_COLLECTION].find() for tag in shard.get(COUNTED_FIELD) or ()]


async def expected_reports(database: AsyncDatabase[Doc]) -> dict[str, Doc]:
    """The report verify folds from the order documents as they are."""
    return sales_documents(rows_from_orders([d async for d in database["orders"].find()]))


async def test_covered_tags_go_at_the_second_sweep_and_later_events_count_no_fact_twice(
    mongo: AsyncMongoClient[Doc], unique_name: str
) -> None:
    database = mongo[unique_name]
    events = sample_streams()
    first_day = [e for e in events if e.recorded_at <= D1]
    rest = events[len(first_day) :]
    await apply_in_batches(database, first_day, 3)
    placed_on_d1 = await held_tags(database)
    assert len(placed_on_d1) == 2  # two orders placed on D1

    sweeper = SalesTagSweeper(database, grace=0.0, full_scan_every=1)
    found = await sweeper.sweep()
    assert (found.held, found.checked, found.forgotten) == (2, 2, 0)  # found covered: kept for now
    assert sorted(await held_tags(database)) == sorted(placed_on_d1)
    # A fact counted meanwhile (its order's checkpoint not there yet: no document) stays beside the others going.
    in_flight = "order-in-flight:placed"
    await database[SHARDS_COLLECTION].update_one({}, {"$push": {COUNTED_FIELD: in_flight}})
    gone = await sweeper.sweep()
    assert (gone.held, gone.checked, gone.forgotten) == (3, 1, 2)  # the two not looked up again
    assert await held_tags(database) == [in_flight]
    await database[SHARDS_COLLECTION].update_many({}, {"$pull": {COUNTED_FIELD: in_flight}})

    # The rest cancels one of the D1 orders: its placement, tag forgotten, must not count again.
    await apply_in_batches(database, rest, 3)
    assert await reports(database) == await expected_reports(database)
    await sweeper.sweep()
    await sweeper.sweep()
    assert await held_tags(database) == []
    # Every batch again (a redelivery, a replay): nothing changes, with no tag left to recognise the facts.
    built = await reports(database)
    await apply_in_batches(database, events, 4)
    assert await reports(database) == built


async def test_a_tag_stays_while_its_order_is_ahead_of_its_checkpoint_and_the_retry_counts_the_fact_once(
    mongo: AsyncMongoClient[Doc], unique_name: str
) -> None:
    """A batch that counted a placement and died before its checkpoint: the order's document is ahead of the
    checkpoint, the tag must outlive every sweep until the retried batch has moved the checkpoint on."""
    database = mongo[unique_name]
    events = order_events("EUR", [("ANVIL", 2, 1250)], placed_at=D1, cancelled_at=D2)
    order_id = events[0].stream_id
    placed = next(e for e in events if e.event_type == "OrderPlaced")
    upto_placed = [e for e in events if e.version <= placed.version]
    await apply_in_batches(database, upto_placed, 100)
    # The crash: documents and views written, the checkpoint left where the batch found it.
    await database["checkpoints"].update_one({"_id": order_id}, {"$set": {"version": placed.version - 1}})

    sweeper = SalesTagSweeper(database, grace=0.0, full_scan_every=1)
    for _ in range(3):
        swept = await sweeper.sweep()
        assert (swept.held, swept.checked, swept.forgotten) == (1, 1, 0)  # looked up while behind
    assert await held_tags(database) == [f"{order_id}:placed"]

    await apply_in_batches(database, upto_placed, 100)  # redelivered: the stream is ahead, its views done again
    assert (await reports(database))["2026-03-01/EUR"]["placed_orders"] == 1
    await sweeper.sweep()
    assert (await sweeper.sweep()).forgotten == 1
    await apply_in_batches(database, events, 100)
    assert await reports(database) == await expected_reports(database)


async def test_a_tag_goes_only_at_a_sweep_a_full_grace_after_the_one_that_found_it(
    mongo: AsyncMongoClient[Doc], unique_name: str
) -> None:
    database = mongo[unique_name]
    await apply_in_batches(database, order_events("EUR", [("ROPE", 1, 300)], placed_at=D1), 100)
    sweeper = SalesTagSweeper(database, grace=0.5, full_scan_every=1)
    assert (await sweeper.sweep()).forgotten == 0
    assert (await sweeper.sweep()).forgotten == 0  # seen twice, but not a grace apart
    await asyncio.sleep(0.6)
    assert (await sweeper.sweep()).forgotten == 1
    # A new sweeper (a restarted replica) knows nothing it saw: it waits a full grace again.
    await apply_in_batches(database, order_events("EUR", [("ROPE", 1, 300)], placed_at=D1), 100)
    fresh = SalesTagSweeper(database, grace=0.5, full_scan_every=1)
    assert (await fresh.sweep()).forgotten == 0
    assert len(await held_tags(database)) == 1


async def test_a_batch_that_read_its_checkpoints_too_long_ago_counts_nothing_and_fails_its_orders(
    mongo: AsyncMongoClient[Doc], unique_name: str
) -> None:
    """Counted on an old checkpoint, a fact whose tag a sweep forgot meanwhile would count twice."""
    database = mongo[unique_name]
    events = order_events("EUR", [("KITE", 1, 999)], placed_at=D1)
    await apply_in_batches(database, events, 100)
    order_id = events[0].stream_id
    await database[SHARDS_COLLECTION].delete_many({})
    writer = SalesViews(database).writers()[SALES_REPORT.name]
    failed: set[str] = set()
    old = time.monotonic() - MAX_BATCH_AGE_SECONDS - 1
    await writer([order_id], {}, failed, ViewSources(checkpoints={order_id: 0}, loaded_at=old))
    assert failed == {order_id}
    assert await database[SHARDS_COLLECTION].count_documents({}) == 0
    await writer([order_id], {}, failed := set(), ViewSources(checkpoints={order_id: 0}, loaded_at=time.monotonic()))
    assert failed == set() and len(await held_tags(database)) == 1


async def test_most_sweeps_look_at_today_and_yesterday_only_and_a_full_one_at_every_day(
    mongo: AsyncMongoClient[Doc], unique_name: str
) -> None:
    """Facts land on the days their events were recorded: an older day's shard gets tags only from replays and
    resumed streams, so it is read by every third sweep here (every 20th by default), not by each."""
    database = mongo[unique_name]
    await apply_in_batches(database, order_events("EUR", [("ROPE", 1, 300)], placed_at=D1), 100)  # March 2026
    await apply_in_batches(database, order_events("EUR", [("ROPE", 1, 300)], placed_at=datetime.now(UTC)), 100)
    sweeper = SalesTagSweeper(database, grace=0.0, full_scan_every=3)
    swept = [(s.held, s.checked, s.forgotten) for s in [await sweeper.sweep() for _ in range(4)]]
    # Full: both looked up, found covered. Today's: today's forgotten; then nothing. Full: the older one, found
    # covered three sweeps ago (not looked up again), forgotten.
    assert swept == [(2, 2, 0), (1, 0, 1), (0, 0, 0), (1, 0, 1)]
    assert await held_tags(database) == []


async def test_a_sweep_reads_a_bounded_number_of_tags_and_the_next_ones_get_further(
    mongo: AsyncMongoClient[Doc], unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards from before the sweeper may hold every tag of their days: a sweep stops reading at a bound, and
    forgetting what it read lets the next sweeps reach the rest."""
    monkeypatch.setattr(sales_tags, "MAX_HELD_PER_SWEEP", 1)
    database = mongo[unique_name]
    ids: dict[int, str] = {}  # one order per shard: a sweep reads whole shards
    while len(ids) < 4:
        order_id = str(uuid.uuid4())
        ids.setdefault(shard_of(order_id), order_id)
    orders = [order_events("EUR", [("ROPE", 1, 300)], placed_at=D1, order_id=order_id) for order_id in ids.values()]
    await apply_in_batches(database, [e for events in orders for e in events], 100)
    assert len(await held_tags(database)) == 4
    sweeper = SalesTagSweeper(database, grace=0.0, full_scan_every=1)
    swept = [await sweeper.sweep() for _ in range(12)]
    assert all(s.held <= 1 for s in swept)
    assert sum(s.forgotten for s in swept) == 4
    assert await held_tags(database) == []
