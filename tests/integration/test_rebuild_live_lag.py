"""`cqrs rebuild` holds its build back while the live read model lags PostgreSQL (`--max-live-lag`), against the
real servers: a live projector that receives nothing (its relay stopped) holds the build until the relay runs
again; a read model with no live projector does not hold it (nothing would catch up); 0 turns the wait off."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient

from core.dependency_metrics import dependency_metrics
from core.generations import COLLECTION
from cqrsctl.rebuild import RebuildMetrics, activate, run_rebuild
from cqrsctl.rebuild.generations import BUILDING
from projector.pipeline import Pipeline
from projector.planning import decode_recorded
from tests.integration.test_rebuild import _customer_workload, generation_doc, rebuild_config
from tests.integration.test_sales_report import BY_TYPE, store_order
from tests.integration.test_verify import System, projected_system
from tests.support import eventually
from tests.unit.test_sales_report import D1, order_events

MAX_LAG = 0.5
# How long the test watches a held-back rebuild do nothing before it lets the live side catch up.
HELD_SECONDS = 3.0


@pytest.fixture
async def live(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, mongo_url: str, unique_name: str
) -> AsyncIterator[System]:
    """Two customers and their orders, projected by the real relay and projector (both still running), at rest."""

    async def workload(system: System) -> None:
        await asyncio.gather(*(_customer_workload(system.store, i) for i in range(2)))

    async with projected_system(event_store_dsn, pg_pool, nats_url, mongo_url, unique_name, workload) as system:
        yield system


async def unrelayed_events_older_than_the_limit(system: System) -> int:
    """Stops the relay, records more events (the live projector never receives them) and waits until they are
    older than `MAX_LAG`; returns how many events the store holds."""
    await system.stop_relay()
    await _customer_workload(system.store, 100)

    async def old_enough() -> bool:
        return bool(
            await system.pool.fetchval(
                "SELECT max(recorded_at) < clock_timestamp() - make_interval(secs => $1) FROM events", MAX_LAG
            )
        )

    await eventually(old_enough, what=f"the newest event to be older than {MAX_LAG}s")
    return int(await system.pool.fetchval("SELECT count(*) FROM events"))


async def test_the_build_waits_while_the_live_projector_is_behind_and_goes_on_once_it_caught_up(live: System) -> None:
    events = await unrelayed_events_older_than_the_limit(live)
    batches: list[float] = []

    async def on_batch(_: int) -> None:
        batches.append(time.monotonic())

    metrics = RebuildMetrics(CollectorRegistry())
    config = rebuild_config(live, max_live_lag_seconds=MAX_LAG)
    rebuild = asyncio.create_task(run_rebuild(config, on_batch=on_batch, metrics=metrics))
    try:
        await eventually(
            lambda: live.db[COLLECTION].find_one({"_id": 2}), what="the rebuild to open generation 2", timeout=30
        )
        await asyncio.sleep(HELD_SECONDS)  # what is asserted is that nothing happens meanwhile
        doc = await generation_doc(live, 2)
        assert not batches and not rebuild.done(), f"built {len(batches)} batches while the live side lagged"
        assert doc["state"] == BUILDING and not doc.get("events_applied"), doc
        held = metrics.registry.get_sample_value("cqrs_rebuild_held_back_seconds_total")
        assert held is not None and held >= HELD_SECONDS - 1.5, held

        relayed_at = time.monotonic()
        await live.start_relay()
        result = await asyncio.wait_for(rebuild, timeout=90)
    finally:
        rebuild.cancel()
    assert batches and batches[0] > relayed_at
    assert result.equal, result.differences
    assert result.events_applied == events
    assert result.held_back_seconds >= HELD_SECONDS


async def test_without_a_live_projector_or_with_no_limit_nothing_holds_the_build_back(live: System) -> None:
    """The same lag with the projector stopped (a read model restored from nothing, projectors not started yet):
    nothing would catch up, so nothing waits; the comparison reports what the live side lacks. And with the
    projector running, `max_live_lag_seconds=0` never waits."""
    events = await unrelayed_events_older_than_the_limit(live)
    await live.stop_projector()

    alone = await asyncio.wait_for(run_rebuild(rebuild_config(live, max_live_lag_seconds=MAX_LAG)), timeout=90)
    assert (alone.held_back_seconds, alone.events_applied) == (0.0, events)
    assert not alone.equal  # the live side lacks what the relay never sent

    await live.start_projector()
    unlimited = await asyncio.wait_for(run_rebuild(rebuild_config(live, max_live_lag_seconds=0)), timeout=90)
    assert unlimited.held_back_seconds == 0.0 and unlimited.events_applied == events
    assert not unlimited.equal


async def test_a_rollback_replays_only_while_the_live_projector_keeps_up(live: System) -> None:
    """A rollback to a retired generation first replays what it lacks (the whole store, for the first generation
    rolled back to), as the build does: it waits the same way. The switch's own tail does not (not tested here)."""
    config = rebuild_config(live, cutover=True, max_live_lag_seconds=MAX_LAG)
    switched = await run_rebuild(config)
    assert switched.cutover is not None and switched.cutover.generation == 2
    await unrelayed_events_older_than_the_limit(live)
    batches: list[float] = []

    async def on_batch(_: int) -> None:
        batches.append(time.monotonic())

    rollback = asyncio.create_task(activate(config, 1, on_batch=on_batch))
    try:
        await asyncio.sleep(HELD_SECONDS)  # what is asserted is that nothing happens meanwhile
        assert not batches and not rollback.done(), f"replayed {len(batches)} batches while the live side lagged"
        relayed_at = time.monotonic()
        await live.start_relay()
        back = await asyncio.wait_for(rollback, timeout=90)
    finally:
        rollback.cancel()
    assert (back.generation, back.previous_generation) == (1, 2)
    assert batches and batches[0] > relayed_at


async def test_the_views_recompute_waits_before_each_write(mongo_url: str, unique_name: str) -> None:
    """After the build every derived view is recomputed for every key, as heavy for the shared MongoDB as the build
    (a soak's live projectors fell minutes behind during it): the rebuild's wait runs before each write."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
    try:
        pipeline = Pipeline(
            client[unique_name], BY_TYPE, dependency_metrics(CollectorRegistry()), stream_name="", park_after=1,
            max_backoff=1.0,
        )  # fmt: skip
        await pipeline.ensure_indexes()
        streams = [order_events("EUR", [("ANVIL", 1, 100)], placed_at=D1, customer_id=f"c{n}") for n in range(5)]
        assert not (await pipeline.apply(decode_recorded(store_order(streams), BY_TYPE))).unsettled
        waits: list[int] = []

        async def before_each() -> None:
            waits.append(len(waits))

        keys = await pipeline.recompute_views(keys_per_write=2, before_each=before_each)
    finally:
        await client.drop_database(unique_name)
        await client.close()
    # Three views of 5 keys each (two by customer, the sales report by order): 3 writes of at most 2 keys each.
    assert keys == 3 * 5
    assert len(waits) == 3 * 3
