"""`cqrs rebuild` against the real servers: a live read model built by the relay and a real projector, then a new
generation built from PostgreSQL beside it, compared, resumed after a crash, and built with a changed projection;
and the event reader that must not skip a transaction that commits late.

Each test has its own PostgreSQL database, stream, subjects, durable consumer and MongoDB databases.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry

from command_service.domain import commands as cmd
from command_service.domain.customer_commands import RenameCustomer
from command_service.event_store import EventStore
from command_service.handlers import customer_handler, order_handler
from command_service.migrate import load_migrations, migrate
from core.generations import COLLECTION
from core.order_events import OrderPlaced
from cqrsctl.rebuild import RebuildConfig, RebuildMetrics, RebuildResult, rebuild_status, run_rebuild
from cqrsctl.rebuild.generations import BUILDING, COMPARED
from cqrsctl.rebuild.reader import Cursor, EventReader
from cqrsctl.rebuild.shadow import DIFFERS
from projector.registry import PROJECTIONS
from tests.integration.reader_index import reader_index_valid
from tests.integration.test_relay import ADDRESS, ctx
from tests.integration.test_verify import System, projected_system
from tests.support import registered_customer

Doc = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]
CUSTOMERS = 8
ORDERS_PER_CUSTOMER = 7


async def _customer_workload(store: EventStore, index: int) -> None:
    """One customer (renamed if odd) and its orders: placed, cancelled, deleted, or a changed draft."""
    orders, customers = order_handler(store), customer_handler(store)
    customer = await registered_customer(store, f"Customer {index}")
    if index % 2:
        await customers.handle(RenameCustomer(customer, f"Renamed {index}"), ctx())
    for n in range(ORDERS_PER_CUSTOMER):
        order = str(uuid.uuid4())
        await orders.handle(cmd.CreateOrder(order, customer, "EUR", ADDRESS), ctx())
        for item in range(1 + n % 3):
            await orders.handle(
                cmd.AddOrderItem(order, f"SKU-{item}", f"Item {item}", 1 + item, 250 * (item + 1)), ctx()
            )
        match n % 4:
            case 0:
                await orders.handle(cmd.PlaceOrder(order), ctx())
            case 1:
                await orders.handle(cmd.CancelOrder(order, "changed my mind"), ctx())
            case 2:
                await orders.handle(cmd.ChangeItemQuantity(order, "SKU-0", 5), ctx())
            case _:
                await orders.handle(cmd.DeleteOrder(order), ctx())


@pytest.fixture
async def live(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, mongo_url: str, unique_name: str
) -> AsyncIterator[System]:
    """A few hundred events of several customers and their orders, projected by the real projector, at rest."""

    async def workload(system: System) -> None:
        await asyncio.gather(*(_customer_workload(system.store, i) for i in range(CUSTOMERS)))

    async with projected_system(event_store_dsn, pg_pool, nats_url, mongo_url, unique_name, workload) as system:
        yield system


def rebuild_config(system: System, **overrides: Any) -> RebuildConfig:
    c = system.config
    values: dict[str, Any] = {"batch_size": 50, "settle_seconds": 5.0, "timeout_seconds": 10.0}
    values.update(overrides)
    return RebuildConfig(c.postgres_dsn, c.mongo_url, c.mongo_database, **values)


async def generation_doc(system: System, generation: int) -> Doc:
    doc = await system.db[COLLECTION].find_one({"_id": generation})
    assert doc is not None, f"no generation {generation} recorded"
    return doc


async def cli(system: System, *args: str) -> tuple[int, Any]:
    """Runs `python -m cqrsctl.main rebuild --json ...` and returns its exit status and JSON."""
    c = system.config
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cqrsctl.main", "rebuild", "--json", "--postgres-dsn", c.postgres_dsn,
        "--mongo-url", c.mongo_url, "--mongo-database", c.mongo_database, "--settle-seconds", "2", *args,
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
    assert process.returncode is not None
    assert stdout, f"no output; stderr: {stderr.decode()}"
    return process.returncode, json.loads(stdout)


# ---- (1) a rebuilt generation equals the live read model -------------------------------------------------------


async def test_a_rebuilt_generation_equals_the_live_read_model(live: System) -> None:
    events = await live.pool.fetchval("SELECT count(*) FROM events")
    assert events >= 200

    metrics = RebuildMetrics(CollectorRegistry())
    result = await run_rebuild(rebuild_config(live), metrics=metrics)

    assert (result.generation, result.database, result.resumed) == (2, f"{live.config.mongo_database}_g2", False)
    assert metrics.registry.get_sample_value("cqrs_rebuild_events_applied_total") == events
    assert metrics.registry.get_sample_value("cqrs_rebuild_state", {"state": "compared"}) == 1
    assert result.equal, [dataclasses.asdict(d) for d in result.differences]
    assert result.events_applied == events
    report_days = await live.db["sales_daily"].count_documents({})  # one per day and currency with sales
    assert report_days >= 1
    assert result.documents_compared == CUSTOMERS * (1 + ORDERS_PER_CUSTOMER) + report_days
    assert result.position == await live.pool.fetchval("SELECT max(position) FROM events")
    doc = await generation_doc(live, 2)
    assert (doc["state"], doc["events_applied"], doc["differences"]) == (COMPARED, events, 0)
    active = await live.db[COLLECTION].find_one({"_id": "active"})
    assert active is not None and (active["generation"], active["database"]) == (1, live.config.mongo_database)
    # The generation carries the projector's own bookkeeping too: a checkpoint per stream at its last version.
    streams = await live.pool.fetchval("SELECT count(DISTINCT stream_id) FROM events")
    assert await live.db.client[result.database]["checkpoints"].count_documents({}) == streams

    # The CLI: a second rebuild is a new generation (the last one is finished); --sample; --status.
    code, report = await cli(live, "--sample", "5")
    assert (code, report["generation"], report["equal"], report["resumed"]) == (0, 3, True, False)
    assert report["events_per_second"] > 0
    code, rows = await cli(live, "--status")
    assert code == 0
    assert [(r["generation"], r["state"], r["active"]) for r in rows] == [
        (1, "live", True), (2, COMPARED, False), (3, COMPARED, False),
    ]  # fmt: skip


# ---- (2) a crash mid-rebuild resumes from the recorded position ------------------------------------------------


class Crash(Exception):
    pass


async def test_a_crashed_rebuild_resumes_from_its_recorded_position(live: System) -> None:
    events = await live.pool.fetchval("SELECT count(*) FROM events")
    recorded: list[Doc] = []

    async def crash_after_three_batches(batches: int) -> None:
        recorded.append(await generation_doc(live, 2))
        if batches == 3:
            # Crash as if batch 3 was written to MongoDB but not recorded: its cursor goes back to batch 2's, so
            # the resumed run applies batch 3 again (the version guard makes that harmless).
            previous = recorded[1]
            await live.db[COLLECTION].update_one(
                {"_id": 2}, {"$set": {"cursor": previous["cursor"], "events_applied": previous["events_applied"]}}
            )
            raise Crash

    with pytest.raises(Crash):
        await run_rebuild(rebuild_config(live, batch_size=20), on_batch=crash_after_three_batches)
    crashed = await generation_doc(live, 2)
    assert (crashed["state"], crashed["events_applied"]) == (BUILDING, 40)
    assert Cursor.from_document(crashed["cursor"]) == Cursor.from_document(recorded[1]["cursor"])

    result = await run_rebuild(rebuild_config(live, batch_size=20))

    assert (result.generation, result.resumed) == (2, True)
    assert result.events_applied == events - 40
    assert result.equal, [dataclasses.asdict(d) for d in result.differences]
    doc = await generation_doc(live, 2)
    assert (doc["state"], doc["events_applied"]) == (COMPARED, events)


async def test_a_generation_begun_with_other_projection_versions_is_not_resumed(live: System) -> None:
    """An interrupted Job, then the next release's Job (its orders projection changed): resuming would finish the
    generation with documents of both projection versions, and the changed collection is not compared."""

    async def crash_after_two_batches(batches: int) -> None:
        if batches == 2:
            raise Crash

    with pytest.raises(Crash):
        await run_rebuild(rebuild_config(live, batch_size=20), on_batch=crash_after_two_batches)
    assert (await generation_doc(live, 2))["state"] == BUILDING
    next_release = tuple(
        dataclasses.replace(p, version=p.version + 1) if p.name == "orders" else p for p in PROJECTIONS
    )

    result = await run_rebuild(rebuild_config(live, batch_size=20), projections=next_release)

    assert (result.generation, result.resumed) == (3, False)
    assert (await generation_doc(live, 2))["state"] == BUILDING  # left as it was, for the operator to drop


async def test_a_rebuild_under_writes_faster_than_it_applies_still_ends(live: System) -> None:
    """Every batch the rebuild applies (5 events) brings 6 new events: a rebuild that caught up "until no event is
    left" would chase them forever. It stops at the transactions that started after each pass began."""
    before = {r["stream_id"] for r in await live.pool.fetch("SELECT DISTINCT stream_id FROM events")}
    added = 0

    async def writes_faster(_batches: int) -> None:
        nonlocal added
        for _ in range(6):
            await registered_customer(live.store, "Meanwhile")
            added += 1

    async with asyncio.timeout(120):  # the chase, before the fix: a test timeout, not a hang of the whole run
        result = await run_rebuild(rebuild_config(live, batch_size=5, settle_seconds=0.5), on_batch=writes_faster)
    assert added > 0
    built = result.database
    for collection in ("orders", "customers"):
        ids = {str(d["_id"]) async for d in live.db.client[built][collection].find({}, {"_id": 1})}
        live_ids = {str(d["_id"]) async for d in live.db[collection].find({"_id": {"$in": list(before)}}, {"_id": 1})}
        assert live_ids <= ids  # everything written before the rebuild began is in the generation


# ---- (3) a changed projection shows in the shadow compare ------------------------------------------------------


def with_extra_field_on_placed_orders() -> tuple[Any, ...]:
    """The registry with the orders projection writing one more field when an order is placed."""
    orders = next(p for p in PROJECTIONS if p.name == "orders")
    handler = orders.handlers[OrderPlaced.event_type]

    def on_placed(doc: Any, recorded: Any, event: Any) -> Any:
        return {**handler(doc, recorded, event), "placed_by_rebuild": True}

    changed = dataclasses.replace(orders, handlers={**orders.handlers, OrderPlaced.event_type: on_placed})
    return tuple(changed if p is orders else p for p in PROJECTIONS)


async def test_a_changed_projection_shows_its_differences(live: System) -> None:
    placed = await live.db["orders"].count_documents({"status": "PLACED"})
    assert placed > 0

    result: RebuildResult = await run_rebuild(
        rebuild_config(live, settle_seconds=1.0), projections=with_extra_field_on_placed_orders()
    )

    assert result.difference_count == placed
    assert {(d.collection, d.kind) for d in result.differences} == {("orders", DIFFERS)}
    assert {tuple(f.path for f in d.fields) for d in result.differences} == {("placed_by_rebuild",)}
    assert (await generation_doc(live, 2))["differences"] == placed

    # The CLI compares the same generation again: exit 1 and the differences in --json; 0 when accepted or when
    # the field is ignored.
    code, report = await cli(live, "--generation", "2")
    assert (code, report["equal"], report["difference_count"], report["resumed"]) == (1, False, placed, True)
    assert report["differences"][0]["fields"] == [{"path": "placed_by_rebuild", "live": "<absent>", "generation": True}]
    code, report = await cli(live, "--generation", "2", "--accept-differences")
    assert (code, report["accepted"]) == (0, True)
    code, report = await cli(live, "--generation", "2", "--ignore-field", "orders.placed_by_rebuild")
    assert (code, report["equal"]) == (0, True)
    assert [r["differences"] for r in await rebuild_status(rebuild_config(live)) if r["generation"] == 2] == [0]


# ---- (4) the event reader never skips a transaction that commits late ------------------------------------------


async def insert_event(conn: asyncpg.Connection | asyncpg.Pool, stream_id: str, version: int) -> int:
    position = await conn.fetchval(
        """INSERT INTO events (event_id, stream_type, stream_id, version, event_type, schema_version, payload,
                               metadata)
           VALUES ($1, 'order', $2, $3, 'OrderPlaced', 1, '{}', '{}') RETURNING position""",
        uuid.uuid4(), stream_id, version,
    )  # fmt: skip
    return int(position)


async def read_all(reader: EventReader, cursor: Cursor) -> tuple[list[int], Cursor]:
    positions: list[int] = []
    while True:
        batch = await reader.next_batch(cursor, 2)
        if not batch.events:
            return positions, cursor
        positions += [e.position for e in batch.events]
        cursor = batch.cursor


async def test_the_reader_does_not_skip_a_late_commit(event_store_dsn: str, pg_pool: asyncpg.Pool) -> None:
    reader = EventReader(pg_pool, timeout=10)
    early = await insert_event(pg_pool, "s-early", 1)
    seen, cursor = await read_all(reader, Cursor())
    assert seen == [early]

    older = await asyncpg.connect(event_store_dsn)  # gets its transaction id first, inserts last
    late = await asyncpg.connect(event_store_dsn)  # takes a position, then stays open while others commit
    try:
        older_tx, late_tx = older.transaction(), late.transaction()
        await older_tx.start()
        await older.fetchval("SELECT pg_current_xact_id()")
        await late_tx.start()
        held = await insert_event(late, "s-late", 1)
        after = [await insert_event(pg_pool, f"s-after-{i}", 1) for i in range(3)]
        higher = await insert_event(older, "s-older", 1)
        await older_tx.commit()
        assert held < min(after) and held < higher

        # `held` is not committed: nothing after it may be passed by the reader (a position-ordered reader
        # would read `higher`, written by the older transaction, and then never look below it again).
        seen, cursor = await read_all(reader, cursor)
        assert held not in seen and set(seen) <= {higher}

        await late_tx.commit()
        more, cursor = await read_all(reader, cursor)
        assert sorted(seen + more) == sorted([held, higher, *after])
        assert len(seen + more) == len(set(seen + more))
        assert (await read_all(reader, cursor))[0] == []
    finally:
        await older.close()
        await late.close()


async def test_the_reader_orders_by_transaction_id_as_a_number(pg_pool: asyncpg.Pool) -> None:
    """9 < 10 as transaction ids (not as text): the cursor compares numbers, so the order must be numeric too."""
    for xact_id in ("10", "9"):
        await pg_pool.execute(
            """INSERT INTO events (event_id, stream_type, stream_id, version, event_type, schema_version, payload,
                                   metadata, xact_id)
               VALUES ($1, 'order', $2::text, 1, 'OrderPlaced', 1, '{}', '{}', $2::text::xid8)""",
            uuid.uuid4(), xact_id,
        )  # fmt: skip
    batch = await EventReader(pg_pool, timeout=10).next_batch(Cursor(), 10)
    assert [e.stream_id for e in batch.events] == ["9", "10"]
    assert batch.cursor == Cursor(10, batch.events[-1].position)


async def test_the_migration_orders_older_events_first_and_is_idempotent(event_store_dsn: str) -> None:
    conn = await asyncpg.connect(event_store_dsn)
    try:
        # As before migration 0004: no column; events written then; then the migration.
        await conn.execute("DROP INDEX events_xact_id_position; ALTER TABLE events DROP COLUMN xact_id")
        await conn.execute("DELETE FROM schema_migrations WHERE version IN (4, 5)")
        old = [await insert_event(conn, f"old-{i}", 1) for i in range(3)]
        assert await migrate(event_store_dsn) == ["0004_events_xact_id.sql", "0005_events_xact_id_index.sql"]
        assert await reader_index_valid(conn) is True
        (migration,) = [m for m in load_migrations() if m.version == 4]
        await conn.execute(migration.sql)  # again: harmless
        new = await insert_event(conn, "new", 1)
        rows = await conn.fetch("SELECT position, xact_id::text AS x FROM events ORDER BY position")
        assert [(r["position"], r["x"]) for r in rows[:3]] == [(p, "0") for p in old]
        assert int(rows[3]["x"]) > 0 and rows[3]["position"] == new
    finally:
        await conn.close()
