"""The sales report's grouped facts against the real MongoDB-wire server: the facts of one shard are counted by
one update; when some of them were counted already, each of the others is counted once, and none twice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from core.projections.sales import COUNTED_FIELD, SHARDS_COLLECTION, shard_of
from projector.sales_views import SalesViews
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
