"""Reads by a list of ids go in `$in` lists of at most `IDS_PER_QUERY` ids, on the real MongoDB-wire server: the
local server's `$in` costs ids x documents found (2,048 ids read 2,000 at a time: 4.4 s; 64 at a time: 0.2 s), and
a projector catching up, a rebuild's batches and its comparison read hundreds of documents by id at once."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient

from core.dependency_metrics import dependency_metrics
from core.mongo_ids import IDS_PER_QUERY, find_by_ids, find_in
from core.read_model import CHECKPOINTS_COLLECTION, CUSTOMERS_COLLECTION, ORDERS_COLLECTION
from projector.pipeline import Pipeline
from projector.planning import decode_recorded
from tests.integration.test_sales_report import BY_TYPE, store_order
from tests.support import StartedCommands
from tests.unit.test_sales_report import D1, order_events

Doc = dict[str, Any]


def in_lists(value: Any) -> list[list[Any]]:
    """Every `$in` list anywhere in a command (filters, aggregation stages)."""
    if isinstance(value, dict):
        found = [v for k, v in value.items() if k == "$in" and isinstance(v, list)]
        return found + [lst for v in value.values() for lst in in_lists(v)]
    if isinstance(value, list):
        return [lst for v in value for lst in in_lists(v)]
    return []


async def test_every_id_is_read_in_short_lists_and_only_once(
    logged: tuple[AsyncMongoClient[Doc], StartedCommands], unique_name: str
) -> None:
    client, log = logged
    collection = client[unique_name]["things"]
    await collection.insert_many([{"_id": f"t{n:03d}", "kind": n % 2, "owner": f"o{n % 50}"} for n in range(150)])
    wanted = [f"t{n:03d}" for n in range(200)] + ["t007", "t007"]  # 50 absent, one asked three times
    log.commands.clear()

    found = await find_by_ids(collection, wanted, {"kind": 1})
    assert sorted(found) == [f"t{n:03d}" for n in range(150)]
    assert found["t007"] == {"_id": "t007", "kind": 1}
    lists = [lst for name, command in log.commands if name == "find" for lst in in_lists(command)]
    assert sorted(i for lst in lists for i in lst) == [f"t{n:03d}" for n in range(200)]
    assert len(lists) == -(-200 // IDS_PER_QUERY) and max(map(len, lists)) == IDS_PER_QUERY

    odd = await find_by_ids(collection, wanted, query={"kind": 1})
    assert sorted(odd) == [f"t{n:03d}" for n in range(1, 150, 2)]
    owners = [f"o{n}" for n in range(100)]
    by_owner = [doc async for doc in find_in(collection, owners, field="owner")]
    assert len(by_owner) == 150 and len({doc["_id"] for doc in by_owner}) == 150
    assert await find_by_ids(collection, []) == {}


async def test_a_batch_of_many_streams_reads_their_documents_in_short_lists(
    logged: tuple[AsyncMongoClient[Doc], StartedCommands], unique_name: str
) -> None:
    """A projector catching up (batches of 200 messages) or a rebuild (2,000 events) loads a batch's documents,
    checkpoints, customers and statistics by id: every one of those reads stays within `IDS_PER_QUERY` ids."""
    client, log = logged
    database = client[unique_name]
    orders = 3 * IDS_PER_QUERY
    streams = [
        order_events("EUR", [("ANVIL", 1, 100)], placed_at=D1, customer_id=f"customer-{n % (2 * IDS_PER_QUERY)}")
        for n in range(orders)
    ]
    pipeline = Pipeline(
        database, BY_TYPE, dependency_metrics(CollectorRegistry()), stream_name="", park_after=1, max_backoff=1.0
    )
    await pipeline.ensure_indexes()
    log.commands.clear()

    outcome = await pipeline.apply(decode_recorded(store_order(streams), BY_TYPE))

    assert not outcome.unsettled and len(outcome.applied) == sum(map(len, streams)), outcome
    assert await database[ORDERS_COLLECTION].count_documents({}) == orders
    assert await database[CHECKPOINTS_COLLECTION].count_documents({}) == orders
    reads = [(name, command) for name, command in log.commands if name in {"find", "aggregate"}]
    read_collections = {str(command[name]) for name, command in reads if in_lists(command)}
    assert {ORDERS_COLLECTION, CHECKPOINTS_COLLECTION, CUSTOMERS_COLLECTION} <= read_collections, read_collections
    longest = max((len(lst), name, command[name]) for name, command in reads for lst in in_lists(command))
    assert longest[0] <= IDS_PER_QUERY, f"a {longest[1]} of {longest[2]} with an $in of {longest[0]} ids"
