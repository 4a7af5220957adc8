"""The sales report against the real servers.

* The projector's own `Pipeline` over MongoDB: the report documents are the same however the events are cut into
  batches and however often a batch comes again; the aggregation yields exactly the rows verify computes in
  Python; a recomputation from an older snapshot never replaces a fuller report.
* The whole system (commands -> PostgreSQL -> relay -> JetStream -> projector -> MongoDB), with the events'
  recorded times moved to chosen days before the relay publishes them: GetSalesReport over gRPC, its
  INVALID_ARGUMENT answers, `cqrs verify` clean and finding a tampered, missing or stray report document (and
  repairing it), and `cqrs rebuild` writing the same report as the live projector.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import date, datetime
from typing import Any

import asyncpg
import grpc
import pytest
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from command_service.domain import commands as cmd
from command_service.handlers import order_handler
from core.dependency_metrics import dependency_metrics
from core.envelope import RecordedEvent
from core.events import decode_event
from core.projections.sales import (
    COUNTED_FIELD,
    REPORT_VERSION_FIELD,
    SALES_COLLECTION,
    SHARDS_COLLECTION,
    rows_from_orders,
    sales_documents,
)
from cqrs_client import OrdersClient, field_violations
from cqrsctl.rebuild import RebuildConfig, run_rebuild
from cqrsctl.verify import FindingKind, run_verify
from projector.pipeline import Pipeline
from projector.planning import WRITE_FAILED, decode_recorded
from projector.registry import PROJECTIONS
from projector.repair import Repairer
from projector.sales_tags import SalesTagSweeper
from projector.sales_views import SalesViews
from query_service.config import QuerySettings
from query_service.server import RunningServer, start_query_server
from tests.integration.test_relay import ADDRESS, ctx
from tests.integration.test_verify import System, projected_system
from tests.support import registered_customer
from tests.unit.test_sales_report import D1, D2, D3, order_events

Doc = dict[str, Any]
BY_TYPE = {p.stream_type: p for p in PROJECTIONS}


# ---- the pipeline: batches, redelivery, the aggregation, racing writers ----------------------------------------


def store_order(streams: Sequence[Sequence[RecordedEvent]]) -> list[RecordedEvent]:
    """The streams' events as the event store orders them: by recorded time, positions renumbered to match."""
    ordered = sorted((e for events in streams for e in events), key=lambda e: (e.recorded_at, e.version))
    return [dataclasses.replace(e, position=n) for n, e in enumerate(ordered, start=1)]


def sample_streams() -> list[RecordedEvent]:
    return store_order(
        [
            order_events("EUR", [("ANVIL", 2, 1250), ("ROPE", 1, 300)], placed_at=D1, cancelled_at=D2),
            order_events("EUR", [("ANVIL", 1, 1250)], placed_at=D1),
            order_events("EUR", [("ROPE", 4, 300)], placed_at=D2, deleted_at=D3),
            order_events("EUR", [("KITE", 9, 999)], cancelled_at=D2),
            order_events("USD", [("BELL", 3, 99)], placed_at=D2, cancelled_at=D3),
        ]
    )


@pytest.fixture
async def mongo(mongo_url: str, unique_name: str) -> AsyncIterator[AsyncMongoClient[Doc]]:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True)
    try:
        yield client
    finally:
        for name in await client.list_database_names():
            if name.startswith(unique_name):
                await client.drop_database(name)
        await client.close()


async def apply_in_batches(database: AsyncDatabase[Doc], events: Sequence[RecordedEvent], size: int) -> None:
    """Applies the events through the projector's own pipeline, `size` at a time (as a rebuild does)."""
    pipeline = Pipeline(
        database, BY_TYPE, dependency_metrics(CollectorRegistry()), stream_name="", park_after=1, max_backoff=1.0
    )
    await pipeline.ensure_indexes()
    for start in range(0, len(events), size):
        outcome = await pipeline.apply(decode_recorded(events[start : start + size], BY_TYPE))
        assert not outcome.unsettled and not outcome.parks, outcome


async def reports(database: AsyncDatabase[Doc]) -> dict[str, Doc]:
    return {str(d["_id"]): d async for d in database[SALES_COLLECTION].find()}


async def test_the_report_is_the_same_whatever_the_batches_and_however_often_they_come(
    mongo: AsyncMongoClient[Doc], unique_name: str
) -> None:
    events = sample_streams()
    once = mongo[unique_name]
    await apply_in_batches(once, events, 2000)
    built = await reports(once)
    orders = [d async for d in once["orders"].find()]
    assert built == sales_documents(rows_from_orders(orders))
    eur_d2 = built["2026-03-02/EUR"]  # ROPE placed (deleted since: still a sale), the ANVIL order cancelled
    assert (eur_d2["placed_orders"], eur_d2["cancelled_orders"], eur_d2["net_revenue_minor"]) == (1, 1, 1200 - 2800)
    assert built["2026-03-01/EUR"]["placed_revenue_minor"] == 2 * 1250 + 300 + 1250

    # Redelivered: the whole batch again, then an old part of it; nothing is counted twice.
    await apply_in_batches(once, events, 2000)
    await apply_in_batches(once, events[: len(events) // 2], 4)
    assert await reports(once) == built

    # Other batch boundaries (one event at a time, three at a time) give the same documents.
    for size in (1, 3):
        other = mongo[f"{unique_name}_b{size}"]
        await apply_in_batches(other, events, size)
        assert await reports(other) == built, f"batches of {size}"

    # Every fact is counted once, in one shard of its day: as many tags as facts, none twice.
    tags = [tag async for shard in once[SHARDS_COLLECTION].find() for tag in shard[COUNTED_FIELD]]
    assert len(tags) == len(set(tags)) == sum(report[REPORT_VERSION_FIELD] for report in built.values())


async def test_a_recomputation_never_replaces_a_report_of_more_facts(
    mongo: AsyncMongoClient[Doc], unique_name: str
) -> None:
    """A replica that rolled up an older snapshot loses: only a report of at least as many facts replaces."""
    database = mongo[unique_name]
    await apply_in_batches(database, sample_streams(), 2000)
    key = "2026-03-01/EUR"
    built = (await reports(database))[key]
    views = SalesViews(database)

    fuller = {**built, REPORT_VERSION_FIELD: built[REPORT_VERSION_FIELD] + 1, "placed_orders": 99}
    await database[SALES_COLLECTION].replace_one({"_id": key}, fuller)
    await views.roll_up([key])
    assert (await reports(database))[key] == fuller  # left alone

    older = {**built, REPORT_VERSION_FIELD: built[REPORT_VERSION_FIELD] - 1, "placed_orders": 1}
    await database[SALES_COLLECTION].replace_one({"_id": key}, older)
    await views.roll_up([key])
    assert (await reports(database))[key] == built  # replaced by the roll-up

    await database[SALES_COLLECTION].delete_one({"_id": key})
    await views.roll_up([key, "not-a-key"])  # a missing document is created; a malformed key is ignored
    assert (await reports(database))[key] == built


# ---- the whole system ------------------------------------------------------------------------------------------


async def test_an_order_whose_days_report_is_refused_is_not_checkpointed_and_counts_once_it_is_taken(
    mongo: AsyncMongoClient[Doc], unique_name: str
) -> None:
    """The report is keyed by order, its documents by day: a refused day must fail the orders that count on it (their
    checkpoints unmoved, the stream parked once offered enough), so that the day's report is written once MongoDB
    takes it (here by the park's resumption)."""
    database = mongo[unique_name]
    await database.create_collection(SALES_COLLECTION, validator={"placed_orders": {"$lte": 1}})  # one placement
    pipeline = Pipeline(
        database, BY_TYPE, dependency_metrics(CollectorRegistry()), stream_name="", park_after=5, max_backoff=1.0
    )
    await pipeline.ensure_indexes()
    first = order_events("EUR", [("ANVIL", 1, 100)], placed_at=D1)
    second = order_events("EUR", [("ROPE", 1, 200)], placed_at=D1)
    assert not (await pipeline.apply(decode_recorded(first, BY_TYPE))).unsettled

    refused = await pipeline.apply(decode_recorded(second, BY_TYPE))

    order_id = second[0].stream_id
    assert order_id in refused.unsettled, refused.unsettled
    checkpoint = await database["checkpoints"].find_one({"_id": order_id})
    assert checkpoint is None or checkpoint["version"] < second[-1].version
    park = await pipeline.parks.get(order_id)
    assert park is not None and park.kind == WRITE_FAILED
    await database.command("collMod", SALES_COLLECTION, validator={})  # MongoDB takes it again
    resumed = await Repairer(pipeline, decode_event).resume_held(park)
    assert resumed is not None and resumed.resumed, resumed
    day = (await reports(database))[f"{D1.date().isoformat()}/EUR"]
    assert (day["placed_orders"], day["placed_revenue_minor"]) == (2, 300)


async def test_recomputing_the_views_after_a_sweep_counts_every_fact_once(
    mongo: AsyncMongoClient[Doc], unique_name: str
) -> None:
    """A generation that was active has had its counted facts' tags swept: recomputing its views (`cqrs rebuild
    --generation N` of a retired one) must not count those facts again."""
    database = mongo[unique_name]
    await apply_in_batches(database, order_events("EUR", [("ANVIL", 2, 1250)], placed_at=D1), 100)
    sweeper = SalesTagSweeper(database, grace=0.0, full_scan_every=1)
    await sweeper.sweep()
    assert (await sweeper.sweep()).forgotten == 1
    pipeline = Pipeline(
        database, BY_TYPE, dependency_metrics(CollectorRegistry()), stream_name="", park_after=1, max_backoff=1.0
    )

    await pipeline.recompute_views()

    day = (await reports(database))[f"{D1.date().isoformat()}/EUR"]
    assert (day["placed_orders"], day["placed_revenue_minor"]) == (1, 2500)


async def move_to(pool: asyncpg.Pool, order_id: str, event_type: str, at: datetime) -> None:
    """Records the order's `event_type` event at `at` (before the relay publishes it)."""
    moved = await pool.execute(
        "UPDATE events SET recorded_at = $3 WHERE stream_id = $1 AND event_type = $2", order_id, event_type, at
    )
    assert moved == "UPDATE 1", (order_id, event_type, moved)


async def sales_workload(system: System) -> None:
    """Four orders on D1 and D2, in EUR and USD, placed and cancelled on chosen days, plus a cancelled draft.

    The relay is stopped while the days are set, so every event is published with its final recorded time."""
    await system.stop_relay()
    orders = order_handler(system.store)
    customer = await registered_customer(system.store)

    async def order(name: str, currency: str, lines: list[tuple[str, int, int]], *steps: str) -> None:
        order_id = str(uuid.uuid4())
        system.orders[name] = order_id
        await orders.handle(cmd.CreateOrder(order_id, customer, currency, ADDRESS), ctx())
        for sku, quantity, price in lines:
            await orders.handle(cmd.AddOrderItem(order_id, sku, sku.title(), quantity, price), ctx())
        for step in steps:
            kind, _, day = step.partition("@")
            command = cmd.PlaceOrder(order_id) if kind == "place" else cmd.CancelOrder(order_id, "changed my mind")
            await orders.handle(command, ctx())
            at = {"D1": D1, "D2": D2}[day]
            await move_to(system.pool, order_id, "OrderPlaced" if kind == "place" else "OrderCancelled", at)

    await order("a", "EUR", [("ANVIL", 2, 1250), ("ROPE", 1, 300)], "place@D1", "cancel@D2")
    await order("b", "EUR", [("ANVIL", 1, 1250)], "place@D1")
    await order("c", "EUR", [("ROPE", 4, 300)], "place@D2")
    await order("d", "USD", [("BELL", 3, 99)], "place@D2")
    await order("draft", "EUR", [("KITE", 9, 999)], "cancel@D2")
    await system.start_relay()


@pytest.fixture
async def system(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, mongo_url: str, unique_name: str
) -> AsyncIterator[System]:
    async with projected_system(
        event_store_dsn, pg_pool, nats_url, mongo_url, unique_name, sales_workload, batch_size=3
    ) as projected:
        yield projected


@pytest.fixture
async def query_server(system: System) -> AsyncIterator[RunningServer]:
    settings = QuerySettings(
        mongo_url=system.config.mongo_url, mongo_database=system.config.mongo_database,
        query_listen="127.0.0.1:0", grace_seconds=1,
    )  # fmt: skip
    running = await start_query_server(settings, health_interval=0.2)
    try:
        yield running
    finally:
        await running.stop()


def _skus(items: Any) -> list[tuple[str, int, int]]:
    return [(s.sku, s.net_quantity, s.net_revenue_minor) for s in items]


async def test_get_sales_report_over_grpc(system: System, query_server: RunningServer) -> None:
    address = f"127.0.0.1:{query_server.port}"
    async with OrdersClient.connect(address, address) as client:
        report = await client.get_sales_report(date(2026, 3, 1), "2026-03-02")
        assert [(d.date, d.currency, d.placed_orders, d.cancelled_orders) for d in report.days] == [
            ("2026-03-01", "EUR", 2, 0), ("2026-03-02", "EUR", 1, 1), ("2026-03-02", "USD", 1, 0)
        ]  # fmt: skip
        d1 = report.days[0]
        assert (d1.placed_revenue_minor, d1.cancelled_revenue_minor, d1.net_revenue_minor) == (4050, 0, 4050)
        assert d1.average_order_value_minor == 2025
        d2 = report.days[1]  # C placed (1,200), A cancelled (2,800)
        assert (d2.placed_revenue_minor, d2.cancelled_revenue_minor, d2.net_revenue_minor) == (1200, 2800, -1600)

        eur, usd = report.currencies
        assert (eur.currency, eur.placed_orders, eur.cancelled_orders, eur.net_revenue_minor) == ("EUR", 3, 1, 2450)
        assert eur.average_order_value_minor == 1750  # 5,250 over 3 placed orders
        # ROPE sold 5, 1 came back: 4 units, 1,200; ANVIL sold 3, 2 came back: 1 unit, 1,250.
        assert _skus(eur.top_by_quantity) == [("ROPE", 4, 1200), ("ANVIL", 1, 1250)]
        assert _skus(eur.top_by_revenue) == [("ANVIL", 1, 1250), ("ROPE", 4, 1200)]
        assert (eur.top_by_quantity[0].placed_quantity, eur.top_by_quantity[0].cancelled_quantity) == (5, 1)
        assert (usd.currency, _skus(usd.top_by_quantity)) == ("USD", [("BELL", 3, 297)])

        only_usd = await client.get_sales_report("2026-03-01", "2026-03-31", currency="USD", top_n=1)
        assert [(d.date, d.currency) for d in only_usd.days] == [("2026-03-02", "USD")]
        assert [c.currency for c in only_usd.currencies] == ["USD"]

        # D2 alone: ROPE 4 placed and 1 cancelled (3, 900); ANVIL only cancelled (-2, -2,500).
        second_day = await client.get_sales_report("2026-03-02", "2026-03-02", currency="EUR", top_n=1)
        assert _skus(second_day.currencies[0].top_by_quantity) == [("ROPE", 3, 900)]
        assert _skus(second_day.currencies[0].top_by_revenue) == [("ROPE", 3, 900)]

        assert not (await client.get_sales_report("2026-04-01", "2026-04-30")).days

        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await client.get_sales_report("2026-03-02", "2026-03-01", currency="euro", top_n=500)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert {v.field for v in field_violations(bad.value)} == {"to_date", "currency", "top_n"}
        with pytest.raises(grpc.aio.AioRpcError) as too_long:
            await client.get_sales_report("2025-01-01", "2026-03-01")
        assert too_long.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [(v.field, v.description) for v in field_violations(too_long.value)] == [
            ("to_date", "the range covers 425 days; at most 366 are allowed")
        ]


async def tamper_report(system: System) -> tuple[str, str]:
    key = "2026-03-02/EUR"
    await system.db[SALES_COLLECTION].update_one({"_id": key}, {"$inc": {"skus.0.cancelled_quantity": 1}})
    return key, "skus.0.cancelled_quantity"


async def delete_report(system: System) -> tuple[str, str]:
    key = "2026-03-01/EUR"
    await system.db[SALES_COLLECTION].delete_one({"_id": key})
    return key, ""


async def stray_report(system: System) -> tuple[str, str]:
    doc = await system.db[SALES_COLLECTION].find_one({"_id": "2026-03-02/USD"})
    assert doc is not None
    await system.db[SALES_COLLECTION].insert_one({**doc, "_id": "2026-03-05/USD", "day": "2026-03-05"})
    return "2026-03-05/USD", ""


async def test_verify_checks_the_report_and_repairs_it(system: System) -> None:
    clean = await system.verify()
    assert clean.clean, clean.findings
    assert await system.db[SALES_COLLECTION].count_documents({}) == 3

    await system.stop_projector()
    before = await reports(system.db)
    expected = {tamper_report: FindingKind.DOCUMENT_DIFFERS, delete_report: FindingKind.DOCUMENT_MISSING,
                stray_report: FindingKind.ORPHAN_DOCUMENT}  # fmt: skip
    found: dict[str, tuple[FindingKind, list[str]]] = {}
    for corrupt in expected:
        key, path = await corrupt(system)
        found[key] = (expected[corrupt], [path] if path else [])

    result = await run_verify(system.config, repair=True)

    by_key = {f.stream_id: (f.kind, [d.path for d in f.diffs]) for f in result.findings}
    assert by_key == found, result.findings
    assert all(f.collection == SALES_COLLECTION for f in result.findings)
    assert {(r.stream_id, r.action) for r in result.repairs} == {
        ("2026-03-02/EUR", "replaced"), ("2026-03-01/EUR", "inserted"), ("2026-03-05/USD", "deleted")
    }  # fmt: skip
    assert await reports(system.db) == before
    again = await system.verify()
    assert again.clean, again.findings


async def test_a_rebuilt_generation_has_the_live_report(system: System) -> None:
    """The live projector (JetStream batches) and `cqrs rebuild` (PostgreSQL batches of 2,000, then of 2) agree."""
    live = await reports(system.db)
    assert live
    c = system.config
    for batch_size, new in ((2000, False), (2, True)):
        config = RebuildConfig(c.postgres_dsn, c.mongo_url, c.mongo_database, batch_size=batch_size,
                               settle_seconds=2.0, timeout_seconds=10.0, new=new)  # fmt: skip
        result = await run_rebuild(config)
        assert await reports(system.db.client[result.database]) == live, f"batches of {batch_size}"
