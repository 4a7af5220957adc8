"""The projector's writes against the real MongoDB-wire server: the facts of one shard of the sales report are
counted by one update (when some of them were counted already, each of the others is counted once, and none
twice); every write of a batch asks for the journal, its closing checkpoints last; the dependency metrics count
the calls that reach MongoDB, and only those; a batch's calls go one at a time unless it is told to send them
together, and the read model is the same either way."""

from __future__ import annotations

import gc
import warnings
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ServerSelectionTimeoutError
from pymongo.monitoring import CommandFailedEvent, CommandListener, CommandStartedEvent, CommandSucceededEvent

from core.dependency_metrics import dependency_metrics
from core.projections.sales import COUNTED_FIELD, SALES_COLLECTION, SHARDS_COLLECTION, shard_of
from core.read_model import CHECKPOINTS_COLLECTION, CUSTOMERS_COLLECTION, ORDERS_COLLECTION
from localservers import free_port
from projector.pipeline import Pipeline
from projector.planning import decode_recorded
from projector.sales_views import SalesViews
from tests.integration.test_sales_report import BY_TYPE, sample_streams
from tests.support import StartedCommands
from tests.unit.test_projector_writes import events, fold

Doc = dict[str, Any]


@pytest.fixture
async def mongo(mongo_url: str, unique_name: str) -> AsyncIterator[AsyncMongoClient[Doc]]:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True)
    try:
        yield client
    finally:
        await client.drop_database(unique_name)
        await client.close()


async def test_facts_of_a_shard_already_partly_counted_are_each_counted_once(
    mongo: AsyncMongoClient[Doc], unique_name: str
) -> None:
    ids = [f"order-{n}" for n in range(2000) if shard_of(f"order-{n}") == shard_of("order-0")][:3]
    orders = {order_id: fold(events(order_id), order_id)[-1] for order_id in ids}
    views = SalesViews(mongo[unique_name])
    await views.count(ids[:1], docs=orders)
    once = await views.count(ids[1:2], docs=orders)
    again = await views.count(ids, docs=orders)  # the first two counted already, the third not
    assert again[next(iter(again))]["placed_orders"] == 3 == 1 + once[next(iter(once))]["placed_orders"]
    shards = [doc async for doc in mongo[unique_name][SHARDS_COLLECTION].find()]
    assert len(shards) == 1 and sorted(shards[0][COUNTED_FIELD]) == sorted(f"{i}:placed" for i in ids)
    assert await views.count(ids, docs=orders) == again  # all counted: nothing changes


def writes(log: StartedCommands) -> list[tuple[str, Doc]]:
    """The write commands logged: (collection, write concern)."""
    return [
        (str(command[name]), command.get("writeConcern", {}))
        for name, command in log.commands
        if name in {"insert", "update", "delete"}
    ]


async def test_every_write_of_a_batch_is_journaled_and_its_checkpoints_come_last(
    mongo_url: str, unique_name: str
) -> None:
    """Documents, views and checkpoints all ask for `j` with the configured `w`, and the checkpoints are the batch's
    last write. A write acknowledged without the journal is lost when MongoDB is killed, and the checkpoints after
    it may be taken by the restarted server (tests/faults/test_mongo_restart_mid_batch.py); were a batch to end
    with another write, a checkpoint could promise what was never written."""
    log = StartedCommands()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        mongo_url, tz_aware=True, w="majority", journal=True, event_listeners=[log]
    )
    try:
        database = client[unique_name]
        pipeline = Pipeline(
            database, BY_TYPE, dependency_metrics(CollectorRegistry()), stream_name="", park_after=1, max_backoff=1.0
        )
        await pipeline.ensure_indexes()
        recorded = sample_streams()
        covered: set[str] = set()
        for start in range(0, len(recorded), 4):
            log.commands.clear()
            outcome = await pipeline.apply(decode_recorded(recorded[start : start + 4], BY_TYPE))
            assert not outcome.unsettled and outcome.applied, outcome
            *before, (last_collection, last_concern) = writes(log)
            assert last_collection == CHECKPOINTS_COLLECTION and last_concern == {"w": "majority", "j": True}
            assert before, "a batch that applies events writes its documents before its checkpoints"
            for collection, concern in before:
                assert concern == {"w": "majority", "j": True}, (collection, concern)
                covered.add(collection)
        assert {ORDERS_COLLECTION, CUSTOMERS_COLLECTION, SALES_COLLECTION, SHARDS_COLLECTION} <= covered, covered
    finally:
        await client.drop_database(unique_name)
        await client.close()


async def test_the_dependency_metrics_count_only_the_calls_that_reach_mongodb(mongo_url: str, unique_name: str) -> None:
    """A batch with nothing to park, no dead letter and no customer to look up makes no such call, and the metrics
    must not count one: `cqrs_dependency_call_seconds` is what operators read MongoDB's load and latency from."""
    log = StartedCommands()
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True, event_listeners=[log])
    registry = CollectorRegistry()
    try:
        pipeline = Pipeline(
            client[unique_name], BY_TYPE, dependency_metrics(registry), stream_name="", park_after=1, max_backoff=1.0
        )
        await pipeline.ensure_indexes()
        log.commands.clear()
        recorded = sample_streams()
        for start in range(0, len(recorded), 3):
            assert not (await pipeline.apply(decode_recorded(recorded[start : start + 3], BY_TYPE))).unsettled
    finally:
        await client.drop_database(unique_name)
        await client.close()

    def counted(operation: str) -> float:
        labels = {"dependency": "mongodb", "operation": operation}
        return registry.get_sample_value("cqrs_dependency_call_seconds_count", labels) or 0

    finds = [command for name, command in log.commands if name == "find"]
    loads = [c for c in finds if c["find"] in {ORDERS_COLLECTION, CUSTOMERS_COLLECTION} and "projection" not in c]
    lookups = [c for c in finds if c["find"] == CUSTOMERS_COLLECTION and "version" in c.get("filter", {})]
    checkpoint_reads = [c for c in finds if c["find"] == CHECKPOINTS_COLLECTION]
    assert counted("park") == counted("dead_letters") == 0
    assert counted("find") == len(loads) > 0
    # New orders' customers are looked up before the writes; the fan-out looks up the customers again (its own).
    assert counted("customer_fields") + counted("order_customer_fields") == len(lookups) > counted("customer_fields")
    assert counted("checkpoints") == len(checkpoint_reads) + sum(
        1 for name, c in log.commands if name == "update" and c["update"] == CHECKPOINTS_COLLECTION
    )


def pipeline_of(
    database: AsyncDatabase[Doc], *, parallel_calls: bool, registry: CollectorRegistry | None = None
) -> Pipeline:
    return Pipeline(
        database,
        BY_TYPE,
        dependency_metrics(registry or CollectorRegistry()),
        stream_name="",
        park_after=1,
        max_backoff=1.0,
        parallel_calls=parallel_calls,
    )


class InFlight(CommandListener):
    """The most commands a client had sent and not yet seen answered, at any one time."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def started(self, event: CommandStartedEvent) -> None:
        self.now += 1
        self.most = max(self.most, self.now)

    def succeeded(self, event: CommandSucceededEvent) -> None:
        self.now -= 1

    def failed(self, event: CommandFailedEvent) -> None:
        self.now -= 1


async def test_a_batch_sends_its_mongodb_calls_one_at_a_time_unless_told_to_send_them_together(
    mongo_url: str, unique_name: str
) -> None:
    """`parallel_calls=False` (`CQRS_PROJECTOR_PARALLEL_MONGO_CALLS`, what the local stand-in server gets): never
    two calls in flight; True: a batch's loads and views go together. The same batches give the same read model."""
    models: dict[bool, dict[str, list[Doc]]] = {}
    recorded = sample_streams()
    for parallel in (False, True):
        flight = InFlight()
        client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True, event_listeners=[flight])
        database = client[f"{unique_name}_{int(parallel)}"]
        try:
            pipeline = pipeline_of(database, parallel_calls=parallel)
            await pipeline.ensure_indexes()
            flight.most = 0
            for start in range(0, len(recorded), 4):
                assert not (await pipeline.apply(decode_recorded(recorded[start : start + 4], BY_TYPE))).unsettled
            assert (flight.most > 1) if parallel else (flight.most == 1), (parallel, flight.most)
            models[parallel] = {
                name: [doc async for doc in database[name].find({}, {"updated_at": 0}).sort("_id")]
                for name in (ORDERS_COLLECTION, CUSTOMERS_COLLECTION, SALES_COLLECTION, CHECKPOINTS_COLLECTION)
            }
        finally:
            await client.drop_database(database.name)
            await client.close()
    assert models[False] == models[True] and all(models[False].values()), models


async def test_one_call_at_a_time_stops_at_the_first_failure_and_sends_nothing_after_it() -> None:
    """With MongoDB unreachable, a batch whose load makes three calls fails with the first one: the other two are
    never made (the batch waits for one timeout, not three in a row), and they are closed, not left un-awaited."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(
        f"mongodb://127.0.0.1:{free_port()}/?directConnection=true", serverSelectionTimeoutMS=300
    )
    registry = CollectorRegistry()
    pipeline = pipeline_of(client["unreachable"], parallel_calls=False, registry=registry)
    batch = decode_recorded(sample_streams()[:4], BY_TYPE)  # a new order of a new customer: three loads
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with pytest.raises(ServerSelectionTimeoutError):
                await pipeline.apply(batch)
            gc.collect()
        assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]
    finally:
        await client.close()
    calls = {
        str(sample.labels["operation"]): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == "cqrs_dependency_call_seconds_count" and sample.value
    }
    assert sum(calls.values()) == 1, f"calls made after the first failed: {calls}"
