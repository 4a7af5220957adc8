"""Switching the services to a rebuilt generation of the read model (`cqrs rebuild --cutover`), against the real
servers: a live read model kept by the relay and a real projector, a real query service, commands and queries
running all the while; then a rollback to the retired generation, dropping a generation, and the deployment
Job's `--if-needed` mode.

Each test has its own PostgreSQL database, stream, subjects, durable consumer and MongoDB databases.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from cqrs.orders.v1 import consistency_pb2, query_service_pb2
from cqrs.orders.v1 import query_service_pb2_grpc as qgrpc

from command_service.domain import commands as cmd
from command_service.event_store import CommandReply
from command_service.handlers import order_handler
from core.consistency import ConsistencyToken
from core.events import decode_event
from core.generations import ACTIVE_ID, COLLECTION, LEGACY_VERSIONS, WRITER_PREFIX
from cqrsctl.rebuild import (
    CONTROL_COLLECTIONS,
    CutoverFailed,
    GenerationError,
    activate,
    drop_generation,
    run_rebuild,
)
from cqrsctl.rebuild.build import Builder
from cqrsctl.rebuild.generations import ACTIVE, DROPPED, RETIRED, Generations
from cqrsctl.rebuild.progress import RebuildProgress
from cqrsctl.rebuild.reader import Cursor, EventReader
from projector.planning import GAP, decode_recorded
from projector.registry import PROJECTIONS, registry_versions
from query_service.config import QuerySettings
from query_service.server import RunningServer, start_query_server
from tests.integration.test_rebuild import cli, generation_doc, live, rebuild_config
from tests.integration.test_relay import ADDRESS, ctx
from tests.integration.test_verify import System
from tests.support import eventually, registered_customer

if TYPE_CHECKING:
    from cqrs.orders.v1.query_service_pb2_grpc import OrderQueryServiceAsyncStub as Stub

__all__ = ["live"]  # the fixture, shared with test_rebuild

Doc = dict[str, Any]
POLL_SECONDS = 0.2


@pytest.fixture
async def query_server(live: System) -> AsyncIterator[RunningServer]:
    settings = QuerySettings(
        mongo_url=live.config.mongo_url, mongo_database=live.config.mongo_database, query_listen="127.0.0.1:0",
        generation_poll_seconds=POLL_SECONDS,
    )  # fmt: skip
    server = await start_query_server(settings, health_interval=0.2)
    try:
        yield server
    finally:
        await server.stop(0)


@dataclass
class Load:
    """Commands (create, add an item, place) and queries (read-your-writes and older orders) until stopped."""

    system: System
    stub: Stub
    written: list[CommandReply] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    queries: list[float] = field(default_factory=list)  # when each answered (monotonic)
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def commands(self) -> None:
        orders = order_handler(self.system.store)
        while not self.stop.is_set():
            # A customer per order: one customer receiving every order would keep its statistics moving at every
            # moment, and with a lagging projector the comparison may never see both sides at the same point
            # (`cqrs rebuild` then reports it; see the README on hot keys).
            customer = await registered_customer(self.system.store, "Load")
            order_id = str(uuid.uuid4())
            await orders.handle(cmd.CreateOrder(order_id, customer, "EUR", ADDRESS), ctx())
            await orders.handle(cmd.AddOrderItem(order_id, "SKU-L", "Lamp", 2, 1500), ctx())
            self.written.append(await orders.handle(cmd.PlaceOrder(order_id), ctx()))
            await asyncio.sleep(0.2)  # ~20 events/s: the whole system shares this process (and 2 cores)

    async def read(self, reply: CommandReply) -> None:
        token = ConsistencyToken(reply.stream_type, reply.stream_id, reply.version, reply.position).encode()
        request = query_service_pb2.GetOrderRequest(
            order_id=reply.stream_id, consistency=consistency_pb2.ConsistencyRequirement(consistency_tokens=[token])
        )
        try:
            response = await self.stub.GetOrder(request, timeout=10)
        except grpc.aio.AioRpcError as exc:
            self.failures.append(f"GetOrder {reply.stream_id} v{reply.version}: {exc.code().name} {exc.details()}")
            return
        if response.order.version < reply.version or response.order.total_minor != 3000:
            self.failures.append(f"GetOrder {reply.stream_id}: v{response.order.version}, wanted v{reply.version}")
        self.queries.append(time.monotonic())

    async def queries_loop(self) -> None:
        while not self.stop.is_set():
            if not self.written:
                await asyncio.sleep(0.01)
                continue
            # The latest write (read-your-writes across the switch) and an older one (must never go missing).
            await asyncio.gather(self.read(self.written[-1]), self.read(self.written[len(self.written) // 2]))
            await asyncio.sleep(0.05)


async def reflected(system: System, database: str) -> bool:
    """Every stream's checkpoint in `database` is at its PostgreSQL version."""
    versions = await system.pool.fetch("SELECT stream_id, max(version) AS v FROM events GROUP BY stream_id")
    db = system.db.client[database]
    checkpoints = {d["_id"]: d["version"] async for d in db["checkpoints"].find()}
    return all(checkpoints.get(r["stream_id"]) == r["v"] for r in versions)


async def one_more_order(system: System) -> str:
    orders = order_handler(system.store)
    customer = await registered_customer(system.store, "After")
    order_id = str(uuid.uuid4())
    await orders.handle(cmd.CreateOrder(order_id, customer, "EUR", ADDRESS), ctx())
    return order_id


async def test_cutovers_under_command_and_query_load_fail_no_query(live: System, query_server: RunningServer) -> None:
    """Two switches in a row (generation 1 -> 2 -> 3) while commands and read-your-writes queries run."""
    # Well inside pytest's own timeout, whose report of a stuck event loop names no line of the test: this one
    # fails with the traceback of the await that did not return.
    async with asyncio.timeout(200):
        await _cutovers_under_load(live, query_server)


async def _cutovers_under_load(live: System, query_server: RunningServer) -> None:
    base = live.config.mongo_database
    results = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{query_server.port}") as channel:
        load = Load(live, qgrpc.OrderQueryServiceStub(channel))
        workers = [asyncio.create_task(load.commands()), asyncio.create_task(load.queries_loop())]
        try:
            await eventually(_async(lambda: len(load.queries) >= 10), what="the query load to start")
            for _ in range(2):
                results.append(await run_rebuild(rebuild_config(live, cutover=True, settle_seconds=10.0)))

                async def new_generation_answers(switched_at: float = time.monotonic()) -> bool:
                    return sum(1 for t in load.queries if t > switched_at + 3 * POLL_SECONDS) >= 20

                await eventually(
                    new_generation_answers,
                    what="queries answered by the new generation",
                    timeout=45.0,  # each waits for its write to be projected: seconds apiece on a saturated machine
                )
        finally:
            load.stop.set()
            await asyncio.gather(*workers)

    assert load.failures == [], load.failures[:10]
    for result, (number, previous) in zip(results, ((2, 1), (3, 2)), strict=True):
        assert result.equal, result.differences[:5]
        assert result.cutover is not None
        assert (result.cutover.generation, result.cutover.previous_generation) == (number, previous)
        assert result.cutover.writers == 1  # the running projector reported that it moved
    assert len(load.written) >= 20 and len(load.queries) >= 40

    # The projector writes the newest generation; the older ones are retired and no longer written.
    assert live.projector is not None and live.projector.database == f"{base}_g3"
    assert (await generation_doc(live, 3))["state"] == ACTIVE
    assert [(await generation_doc(live, n))["state"] for n in (1, 2)] == [RETIRED, RETIRED]
    later = await one_more_order(live)
    await eventually(lambda: reflected(live, f"{base}_g3"), what="the new generation to reflect every event")
    assert await live.db.client[f"{base}_g3"]["orders"].find_one({"_id": later}) is not None
    assert await live.db.client[f"{base}_g2"]["orders"].find_one({"_id": later}) is None

    # Every acknowledged command is in the active generation, and the audit (of that generation) is clean.
    ids = [r.stream_id for r in load.written]
    found = await live.db.client[f"{base}_g3"]["orders"].count_documents({"_id": {"$in": ids}, "status": "PLACED"})
    assert found == len(ids)
    audit = await live.verify()
    assert audit.clean, audit.findings


async def test_a_rollback_replays_the_retired_generation_and_a_dropped_one_is_gone(live: System) -> None:
    base = live.config.mongo_database
    config = rebuild_config(live, cutover=True)
    first = await run_rebuild(config)
    assert first.cutover is not None and live.projector is not None
    written_in_g2 = await one_more_order(live)  # generation 1 (retired) never sees it
    await eventually(lambda: reflected(live, f"{base}_g2"), what="generation 2 to reflect every event")
    assert await live.db["orders"].find_one({"_id": written_in_g2}) is None

    with pytest.raises(GenerationError, match="active"):
        await drop_generation(config, 2)
    code, back = await cli(live, "--activate", "1")  # the rollback: generation 1 gets what it missed from PostgreSQL
    assert code == 0, back
    assert (back["generation"], back["previous_generation"], back["writers"]) == (1, 2, 1)
    assert (back["database"], back["previous_database"]) == (base, f"{base}_g2")
    assert await live.db["orders"].find_one({"_id": written_in_g2}) is not None
    assert live.projector.database == base
    assert (await generation_doc(live, 2))["state"] == RETIRED
    audit = await live.verify()
    assert audit.clean, audit.findings

    assert await drop_generation(config, 2) == f"{base}_g2"
    assert f"{base}_g2" not in await live.db.client.list_database_names()
    assert (await generation_doc(live, 2))["state"] == DROPPED
    with pytest.raises(GenerationError, match="dropped"):
        await activate(config, 2)


async def test_a_rollback_catches_up_on_what_was_committed_while_it_replayed_before_it_switches(live: System) -> None:
    """A rollback's first pass replays the whole event store into the retired generation, and commands go on
    meanwhile. The services must not switch to the generation before it caught up on those too: fails if the
    tailer still had them to feed once the active document moved (the switch's `events_applied`)."""
    config = rebuild_config(live, cutover=True, batch_size=5)
    first = await run_rebuild(config)
    assert first.cutover is not None
    during_the_replay: list[str] = []

    async def commands_meanwhile(batches: int) -> None:
        if len(during_the_replay) < 3:  # the first batches of the replay: the pass that reads them began before
            during_the_replay.append(await one_more_order(live))

    back = await activate(config, 1, on_batch=commands_meanwhile)
    assert len(during_the_replay) == 3
    assert (back.generation, back.previous_generation) == (1, 2)
    assert back.events_applied == 0, "the services switched to a generation still behind the commits of its replay"
    orders = live.db["orders"]
    assert await orders.count_documents({"_id": {"$in": during_the_replay}}) == 3


async def test_a_rollback_replays_only_what_came_after_the_generation_was_switched_to(live: System) -> None:
    """Generation 2 had every event up to the cursor of its switch (the tailer fed them); the projectors fed it the
    rest while it was active. Rolling back to it once generation 3 replaced it must replay the store from there,
    not from its first event (hours on a large store, for an operator's way back from a bad release): fails if
    the rollback reads events from before that cursor, or misses one committed after it."""
    config = rebuild_config(live, cutover=True)
    assert (await run_rebuild(config)).cutover is not None  # generation 2, active
    stored = await live.pool.fetchval("SELECT count(*) FROM events")
    while_2_was_active = await one_more_order(live)
    assert (await run_rebuild(config)).cutover is not None  # generation 3; 2 retired
    while_3_was_active = await one_more_order(live)
    before = (await generation_doc(live, 2)).get("events_applied", 0)

    back = await activate(config, 2)
    assert (back.generation, back.previous_generation) == (2, 3)
    replayed = (await generation_doc(live, 2)).get("events_applied", 0) - before
    since = await live.pool.fetchval("SELECT count(*) FROM events") - stored
    assert 0 < replayed <= since, f"replayed {replayed} events; {since} were committed after the switch to it"
    g2 = live.db.client[back.database]["orders"]
    await eventually(lambda: reflected(live, back.database), what="generation 2 to reflect every event")
    assert await g2.count_documents({"_id": {"$in": [while_2_was_active, while_3_was_active]}}) == 2
    audit = await live.verify()
    assert audit.clean, audit.findings


async def test_a_cutover_waits_for_a_projector_that_has_not_moved(live: System) -> None:
    """A live writer heartbeat still naming the old generation holds the switch (a projector that keeps
    writing generation 1 would take its events away from the new one); the switch gives up, saying who."""
    await live.db[COLLECTION].update_one(
        {"_id": f"{WRITER_PREFIX}stuck"},
        {"$set": {"generation": 1, "database": live.config.mongo_database, "seen_at": _far_future()}},
        upsert=True,
    )
    with pytest.raises(CutoverFailed, match="stuck"):
        await run_rebuild(rebuild_config(live, cutover=True, switch_timeout_seconds=2.0))


@pytest.mark.parametrize("then", ["finish", "go_back"])
async def test_a_switch_that_gave_up_is_finished_or_undone_by_activating_either_generation(
    live: System, then: str
) -> None:
    """A switch that gave up (here a projector did not move in time; a tail that failed after the switch leaves
    the same state) left generation 2 active and generation 1 unretired. The operator fixes the cause, then
    `--activate 2` finishes the switch and `--activate 1` goes back, as the error message says: fails if either is
    refused (the target "already active", the old one "active", a failed target) or the generation switched to
    misses an event committed meanwhile."""
    stuck = {"_id": f"{WRITER_PREFIX}stuck"}
    await live.db[COLLECTION].update_one(
        stuck,
        {"$set": {"generation": 1, "database": live.config.mongo_database, "seen_at": _far_future()}},
        upsert=True,
    )
    config = rebuild_config(live, cutover=True, switch_timeout_seconds=2.0)
    with pytest.raises(CutoverFailed, match=r"--activate 2.*--activate 1"):
        await run_rebuild(config)
    # A tail that failed after the switch marks the active generation failed: finishing must accept that too.
    await live.db[COLLECTION].update_one({"_id": 2}, {"$set": {"state": "failed"}})
    await live.db[COLLECTION].delete_one(stuck)  # the cause, fixed
    written = await one_more_order(live)  # committed while neither generation is fully fed from PostgreSQL

    target, other = (2, 1) if then == "finish" else (1, 2)
    switched = await activate(config, target)
    assert (switched.generation, switched.previous_generation) == (target, other)
    assert (await generation_doc(live, target))["state"] == ACTIVE
    assert (await generation_doc(live, other))["state"] == RETIRED
    database = switched.database
    await eventually(lambda: reflected(live, database), what=f"generation {target} to reflect every event")
    assert await live.db.client[database]["orders"].find_one({"_id": written}) is not None
    audit = await live.verify()
    assert audit.clean, audit.findings
    with pytest.raises(CutoverFailed, match="already active"):
        await activate(config, target)


async def test_the_tail_resumes_a_stream_a_projector_parked_at_a_gap_in_the_new_generation(live: System) -> None:
    """During a switch the projectors write the new generation beside the tail that feeds it from PostgreSQL. One
    that moved early can get an order's third event while the generation has only its first (it applied the
    second to the old generation; the tail has not brought it yet), and park the order at that gap. The tail's
    events come from PostgreSQL: they resume the stream instead of failing the cutover with "waits behind a parked
    event" (found by the chaos soak, seed 84512234: the cutover failed after the switch, marked the active
    generation failed, and left the order parked for an event no delivery would bring, until an operator's retry)."""
    orders = order_handler(live.store)
    customer = await registered_customer(live.store, "Gap")
    order_id = str(uuid.uuid4())
    await orders.handle(cmd.CreateOrder(order_id, customer, "EUR", ADDRESS), ctx())
    await orders.handle(cmd.AddOrderItem(order_id, "SKU-G", "Gear", 1, 700), ctx())
    await orders.handle(cmd.AddOrderItem(order_id, "SKU-H", "Hook", 2, 300), ctx())
    first, _, third = await live.store.load_stream(order_id)
    database = live.db.client[f"{live.config.mongo_database}_tail"]
    builder = Builder(
        database, PROJECTIONS, EventReader(live.pool, 10), Generations(live.db, registry_versions()), 9, batch_size=50
    )
    await builder.prepare()
    projections = {p.stream_type: p for p in PROJECTIONS}
    await builder.pipeline.apply(decode_recorded([first], projections, decode_event))
    early = await builder.pipeline.apply(decode_recorded([third], projections, decode_event))  # parks at once
    assert (early.parks[order_id].kind, early.parks[order_id].version) == (GAP, 2)

    await builder.run(Cursor(), 0, RebuildProgress(False), concurrent_writers=True)

    doc = await database["orders"].find_one({"_id": order_id})
    assert doc is not None and doc["version"] == 3
    assert [(line["sku"], line["quantity"]) for line in doc["lines"]] == [("SKU-G", 1), ("SKU-H", 2)]
    assert await builder.pipeline.parks.get(order_id) is None
    checkpoint = await database["checkpoints"].find_one({"_id": order_id})
    assert checkpoint is not None and checkpoint["version"] == 3


async def test_the_tail_retries_the_streams_whose_customer_statistics_the_projectors_kept_overtaking(
    live: System,
) -> None:
    """The tail writes a customer's order statistics by compare-and-set, like the projectors beside it. When their
    writes keep overtaking it (`STATS_ATTEMPTS`), the tail's batch parks the customer's orders at once (no
    redelivery would retry them); during a switch it resumes them from PostgreSQL and applies the batch again
    instead of failing (found by the chaos soak, seed 84512234, right after the gap above was mended), all of them
    in one batch: a resume writes the statistics by recompute (a read of every order of the customer), and one
    stream at a time a switch under load spent minutes on four busy customers' orders (seed 57827110: 85 streams,
    about 1.6 s each). Here other writers bump the customer's counter until a park shows, then stop."""
    orders = order_handler(live.store)
    customer = await registered_customer(live.store, "Busy")
    database = live.db.client[f"{live.config.mongo_database}_busy"]
    builder = Builder(
        database, PROJECTIONS, EventReader(live.pool, 10), Generations(live.db, registry_versions()), 9, batch_size=50
    )
    await builder.prepare()
    cursor, position, _, _ = await builder.run(Cursor(), 0, RebuildProgress(False))  # the customer is there
    order_ids = [str(uuid.uuid4()) for _ in range(3)]
    for order_id in order_ids:
        await orders.handle(cmd.CreateOrder(order_id, customer, "EUR", ADDRESS), ctx())
        await orders.handle(cmd.AddOrderItem(order_id, "SKU-B", "Bell", 3, 400), ctx())
        await orders.handle(cmd.PlaceOrder(order_id), ctx())

    parked_once = asyncio.Event()

    async def overtake() -> None:  # another writer's compare-and-set landing between each read and write
        while not parked_once.is_set():
            await database["customers"].update_one({"_id": customer}, {"$inc": {"order_stats_seq": 1}})
            if await database["checkpoints"].find_one({"_id": {"$in": order_ids}, "parked.kind": "write_failed"}):
                parked_once.set()

    resumed_together: list[set[str]] = []
    apply = builder.pipeline.apply

    async def recording_apply(decoded: Any, **kwargs: Any) -> Any:
        if kwargs.get("resuming"):
            resumed_together.append(set(kwargs["resuming"]))
        return await apply(decoded, **kwargs)

    builder.pipeline.apply = recording_apply  # type: ignore[method-assign]
    writers = [asyncio.create_task(overtake()) for _ in range(3)]
    try:
        await builder.run(cursor, position, RebuildProgress(False), concurrent_writers=True)
    finally:
        parked_once.set()
        await asyncio.gather(*writers)

    assert resumed_together and all(batch == set(order_ids) for batch in resumed_together), resumed_together
    for order_id in order_ids:
        doc = await database["orders"].find_one({"_id": order_id})
        assert doc is not None and (doc["version"], doc["status"]) == (3, "PLACED")
        assert await builder.pipeline.parks.get(order_id) is None
        checkpoint = await database["checkpoints"].find_one({"_id": order_id})
        assert checkpoint is not None and checkpoint["version"] == 3
    stats = await database["customers"].find_one({"_id": customer})
    assert stats is not None and stats["order_stats"]["placed_orders"] == 3, stats


def _async(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return check()

    return probe


def _far_future() -> Any:
    import datetime as dt

    return dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)


async def test_if_needed_rebuilds_only_when_the_projection_versions_changed(live: System) -> None:
    """The deployment Job: nothing to do while the active generation was built with this release's projections;
    a changed projection (version bumped) is rebuilt from PostgreSQL, its collection not compared (it is meant to
    differ), and the services switch to it; a pre-generations read model counts as built with the old versions."""
    config = rebuild_config(live, if_needed=True, cutover=True, drop_retired_after_hours=0.0)
    active = await live.db[COLLECTION].find_one({"_id": ACTIVE_ID})
    assert active is not None and active["versions"] == registry_versions()  # recorded by the projector at start
    nothing = await run_rebuild(config)
    assert nothing.up_to_date and nothing.cutover is None
    assert await live.db[COLLECTION].count_documents({"_id": {"$type": "number"}}) == 0

    bumped = tuple(dataclasses.replace(p, version=p.version + 1) if p.name == "orders" else p for p in PROJECTIONS)
    result = await run_rebuild(config, projections=bumped)
    assert result.cutover is not None and result.cutover.generation == 2
    assert result.skipped_collections == ("orders",)
    assert result.documents_compared > 0 and result.equal
    active = await live.db[COLLECTION].find_one({"_id": ACTIVE_ID})
    assert active is not None and active["versions"]["orders"] == PROJECTIONS[0].version + 1
    # drop_retired_after_hours=0: the retired generation 1 (the base database) is emptied but for the control data
    assert result.dropped == [1]
    # (the projector's heartbeat may write its partition leases there at any moment: they are control data too)
    assert set(await live.db.list_collection_names()) <= CONTROL_COLLECTIONS
    assert COLLECTION in await live.db.list_collection_names()


async def test_deploying_the_new_sales_report_backfills_it_from_postgresql(
    live: System, query_server: RunningServer
) -> None:
    """Upgrading: the base database holds a read model from the release before the sales report and before
    generations (no report documents, no generation record). The new projector records it as built with the
    previous release's versions, so the deployment Job (`--if-needed --cutover`) rebuilds it from PostgreSQL and
    the report covers the orders placed before the projection existed; `cqrs verify` then checks it clean."""
    await live.stop_projector()
    await live.db.drop_collection("sales_daily")
    await live.db[COLLECTION].delete_many({})
    await live.start_projector()
    active = await eventually(
        lambda: live.db[COLLECTION].find_one({"_id": ACTIVE_ID}), what="the projector to record the generation"
    )
    assert active["versions"] == dict(LEGACY_VERSIONS)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    request = query_service_pb2.GetSalesReportRequest(from_date=today, to_date=today, currency="EUR", top_n=3)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{query_server.port}") as channel:
        stub: Stub = qgrpc.OrderQueryServiceStub(channel)
        before = await stub.GetSalesReport(request, timeout=10)
        assert list(before.days) == []  # the history predates the projection

        result = await run_rebuild(rebuild_config(live, if_needed=True, cutover=True))
        assert result.cutover is not None and not result.up_to_date
        assert set(result.skipped_collections) == {"orders", "sales_daily"}  # changed in this release
        assert result.equal and result.documents_compared > 0  # customers, compared as before

        # Each of the 8 customers placed 2 orders (250 and 1,250 EUR); its cancelled orders were drafts.
        await asyncio.sleep(3 * POLL_SECONDS)  # the query service follows within one poll
        after = await stub.GetSalesReport(request, timeout=10)
    (day,) = after.days
    assert (day.date, day.placed_orders, day.cancelled_orders, day.placed_revenue_minor) == (today, 16, 0, 12_000)
    assert day.average_order_value_minor == 750
    (eur,) = after.currencies
    assert [(s.sku, s.net_quantity) for s in eur.top_by_quantity] == [("SKU-1", 16), ("SKU-0", 16)]
    audit = await live.verify()
    assert audit.clean, audit.findings


async def test_a_watch_stream_open_across_the_switch_goes_on_with_the_new_generation(
    live: System, query_server: RunningServer
) -> None:
    """WatchOrder streams do not end at a cutover: the feed reopens on the new generation and a change written
    after the switch (to the new generation only) reaches the open stream."""
    orders = order_handler(live.store)
    customer = await registered_customer(live.store, "Watcher")
    order_id = str(uuid.uuid4())
    created = await orders.handle(cmd.CreateOrder(order_id, customer, "EUR", ADDRESS), ctx())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{query_server.port}") as channel:
        stub: Stub = qgrpc.OrderQueryServiceStub(channel)
        token = ConsistencyToken(created.stream_type, order_id, created.version, created.position).encode()
        stream = stub.WatchOrder(query_service_pb2.WatchOrderRequest(order_id=order_id, consistency_token=token))
        first = await asyncio.wait_for(stream.read(), timeout=10)
        assert isinstance(first, query_service_pb2.WatchOrderResponse), first
        assert first.order.version == 1

        result = await run_rebuild(rebuild_config(live, cutover=True))
        assert result.cutover is not None
        await asyncio.sleep(3 * POLL_SECONDS)  # the query service has moved
        await orders.handle(cmd.AddOrderItem(order_id, "SKU-W", "Whistle", 1, 100), ctx())
        second = await asyncio.wait_for(stream.read(), timeout=10)
        assert isinstance(second, query_service_pb2.WatchOrderResponse), second
        assert second.order.version == 2 and [line.sku for line in second.order.lines] == ["SKU-W"]
        assert await live.db["orders"].find_one({"_id": order_id, "version": 2}) is None  # not in the old one
        stream.cancel()


async def test_a_rollback_that_gave_up_leaves_its_generation_undropped_by_the_retired_sweep(live: System) -> None:
    """A switch back to a retired generation that gives up after the services moved leaves that generation marked
    `retired` while it is the one they read: the deployment Job's `--drop-retired-after` must not drop it."""
    first = await run_rebuild(rebuild_config(live, cutover=True))
    assert first.cutover is not None and first.generation == 2
    stuck = {"_id": f"{WRITER_PREFIX}stuck"}  # a projector that does not move back in time
    await live.db[COLLECTION].update_one(
        stuck,
        {"$set": {"generation": 2, "database": f"{live.config.mongo_database}_g2", "seen_at": _far_future()}},
        upsert=True,
    )
    with pytest.raises(CutoverFailed):
        await activate(rebuild_config(live, switch_timeout_seconds=2.0), 1)
    await live.db[COLLECTION].delete_one(stuck)
    assert (await live.db[COLLECTION].find_one({"_id": ACTIVE_ID}) or {}).get("generation") == 1
    assert (await generation_doc(live, 1))["state"] == RETIRED
    orders = await live.db["orders"].count_documents({})

    job = await run_rebuild(rebuild_config(live, if_needed=True, cutover=True, drop_retired_after_hours=0.0))

    assert 1 not in job.dropped, "the retired sweep dropped the generation the services read"
    assert await live.db["orders"].count_documents({}) == orders > 0


async def test_a_dropped_generation_cannot_be_built_again_under_its_number(live: System) -> None:
    built = await run_rebuild(rebuild_config(live))
    assert built.generation == 2 and built.equal
    await drop_generation(rebuild_config(live), 2)
    with pytest.raises(GenerationError, match="generation 2 was dropped: build a new one"):
        await run_rebuild(rebuild_config(live, generation=2))
