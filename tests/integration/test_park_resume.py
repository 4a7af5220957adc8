"""Resuming parked streams from their held copies, against the real MongoDB-wire server: a stream parked because
its next event is too new for this build is not resumed before that event's own copy is held (the park and the
copies are written concurrently), so the resume loop never mistakes the moment between the two for a gap; and a
backlog of parks (what a crash leaves: many streams waiting for a redelivered event) resumes in shared batches,
each stream as it would alone."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from core.dependency_metrics import dependency_metrics
from core.envelope import EventMetadata, RecordedEvent
from core.events import Event, decode_event
from core.order_events import OrderCreated, OrderItemAdded, OrderItemQuantityChanged, OrderItemRemoved
from core.values import Address
from projector.parking import HeldEvent, Park
from projector.pipeline import Pipeline
from projector.planning import GAP, NEEDS_UPGRADE, POISON, WRITE_FAILED, decode_recorded
from projector.repair import Repairer
from tests.integration.test_sales_report import BY_TYPE
from tests.support import StartedCommands

Doc = dict[str, Any]
ADDRESS = Address("Ada", "1 Main St", "", "London", "N1", "GB")


def recorded(order_id: str, version: int, event: Event) -> RecordedEvent:
    return RecordedEvent(
        event_id=uuid.uuid4(), stream_type="order", stream_id=order_id, version=version,
        event_type=event.event_type, schema_version=event.schema_version, payload=event.to_payload(),
        metadata=EventMetadata("r", "r", "r"), position=version, recorded_at=datetime.now(UTC).replace(microsecond=0),
    )  # fmt: skip


@pytest.fixture
def commands() -> StartedCommands:
    return StartedCommands()


@pytest.fixture
async def db(mongo_url: str, unique_name: str, commands: StartedCommands) -> AsyncIterator[AsyncDatabase[Doc]]:
    """The test's read-model database, through a client whose commands `commands` records."""
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True, event_listeners=[commands])
    try:
        yield client[unique_name]
    finally:
        await client.drop_database(unique_name)
        await client.close()


@pytest.fixture
async def pipeline(db: AsyncDatabase[Doc]) -> Pipeline:
    pipeline = Pipeline(
        db, BY_TYPE, dependency_metrics(CollectorRegistry()), stream_name="", park_after=1, max_backoff=1.0
    )
    await pipeline.ensure_indexes()
    return pipeline


async def test_a_needs_upgrade_park_waits_for_its_own_copy_before_resuming(pipeline: Pipeline) -> None:
    order_id = str(uuid.uuid4())
    await pipeline.apply(decode_recorded([recorded(order_id, 1, OrderCreated(order_id, "c", "EUR", ADDRESS))], BY_TYPE))
    park = Park(order_id, "order", NEEDS_UPGRADE, "schema 2 is too new", 2, "OrderItemAdded", 2)
    await pipeline.parks.park([park])
    later = recorded(order_id, 3, OrderItemQuantityChanged("SKU-0", 2))
    await pipeline.parks.hold([HeldEvent(order_id, 3, later.to_json())])  # v2's copy is not written yet

    assert await Repairer(pipeline, decode_event).resume_held(park) is None
    still = await pipeline.parks.get(order_id)
    assert still is not None and (still.kind, still.version, still.park_id) == (NEEDS_UPGRADE, 2, park.park_id)


async def gap_park(pipeline: Pipeline, order_id: str, *held: RecordedEvent) -> Park:
    """The stream parked at a gap before its first event, with these copies held (as the projector leaves it once
    the missing event has come and been held behind the park)."""
    park = Park(order_id, "order", GAP, "waiting for version 1", 1)
    await pipeline.parks.park([park])
    await pipeline.parks.hold([HeldEvent(order_id, e.version, e.to_json()) for e in held])
    return park


async def test_a_backlog_of_parks_resumes_in_shared_batches_each_stream_as_alone(
    pipeline: Pipeline, db: AsyncDatabase[Doc], commands: StartedCommands
) -> None:
    ids = [str(uuid.uuid4()) for _ in range(40)]
    parks = []
    for order_id in ids:
        created = recorded(order_id, 1, OrderCreated(order_id, "c", "EUR", ADDRESS))
        parks.append(await gap_park(pipeline, order_id, created, recorded(order_id, 2, OrderItemAdded("S", "s", 2, 5))))
    missing, poisoned = str(uuid.uuid4()), str(uuid.uuid4())
    # Still waiting: only its second event is held.
    parks.append(await gap_park(pipeline, missing, recorded(missing, 2, OrderItemAdded("S", "s", 1, 5))))
    # Its missing event came, but the one after it cannot apply: it stays parked, at that event now.
    parks.append(
        await gap_park(
            pipeline,
            poisoned,
            recorded(poisoned, 1, OrderCreated(poisoned, "c", "EUR", ADDRESS)),
            recorded(poisoned, 2, OrderItemRemoved("no-such-line")),
        )
    )
    commands.commands.clear()

    results = await Repairer(pipeline, decode_event).resume_held_many(parks)

    by_stream = {r.stream_id: r for r in results}
    assert {sid for sid, r in by_stream.items() if r.resumed} == set(ids), results
    assert missing not in by_stream  # nothing to try yet
    assert not by_stream[poisoned].resumed and "no line" in by_stream[poisoned].detail
    # One stream at a time cost a whole batch's round trips each (about 10); together, the batch's plus an unpark.
    assert len(commands.commands) <= len(ids) + 20, [name for name, _ in commands.commands]

    docs = {d["_id"]: d async for d in db["orders"].find({"_id": {"$in": ids}})}
    assert {d["version"] for d in docs.values()} == {2} and len(docs) == len(ids)
    assert all(d["lines"][0]["quantity"] == 2 for d in docs.values())
    checkpoints = {c["_id"]: c async for c in db["checkpoints"].find({"_id": {"$in": ids}})}
    assert all(c["version"] == 2 and "parked" not in c for c in checkpoints.values()) and len(checkpoints) == len(ids)
    assert await db["parked_events"].count_documents({"stream_id": {"$in": ids}}) == 0
    still = await pipeline.parks.get(missing)
    assert still is not None and (still.kind, still.version) == (GAP, 1)
    assert len(await pipeline.parks.held(missing)) == 1
    now = await pipeline.parks.get(poisoned)
    assert now is not None and (now.kind, now.version) == (POISON, 2)
    assert [h.version for h in await pipeline.parks.held(poisoned)] == [1, 2]


async def test_a_copy_held_during_a_resumption_whose_write_is_refused_stays_held_and_is_applied_later(
    pipeline: Pipeline, db: AsyncDatabase[Doc]
) -> None:
    """A live batch held (and acknowledged) a later copy while the park was being resumed: the resumption applies it
    after its unpark. When MongoDB refuses that write, the stream is parked again holding the copy, which must
    survive the resumption's clean-up and be applied once MongoDB takes it."""
    order_id = str(uuid.uuid4())
    await pipeline.apply(decode_recorded([recorded(order_id, 1, OrderCreated(order_id, "c", "EUR", ADDRESS))], BY_TYPE))
    park = Park(order_id, "order", GAP, "waiting for version 2", 2)
    await pipeline.parks.park([park])
    await pipeline.parks.hold([HeldEvent(order_id, 2, recorded(order_id, 2, OrderItemAdded("A", "a", 1, 5)).to_json())])
    third = recorded(order_id, 3, OrderItemAdded("B", "b", 1, 7))
    await db.command("collMod", "orders", validator={"version": {"$lt": 3}})  # refuses version 3
    apply = pipeline.apply

    async def apply_then_hold_the_third(*args: Any, **kwargs: Any) -> Any:
        out = await apply(*args, **kwargs)
        if all(h.version != 3 for h in await pipeline.parks.held(order_id)):  # as a live batch did, before the unpark
            await pipeline.parks.hold([HeldEvent(order_id, 3, third.to_json())])
        return out

    pipeline.apply = apply_then_hold_the_third  # type: ignore[method-assign]
    try:
        await Repairer(pipeline, decode_event).resume_held(park)
    finally:
        pipeline.apply = apply  # type: ignore[method-assign]
    again = await pipeline.parks.get(order_id)
    assert again is not None and (again.kind, again.version) == (WRITE_FAILED, 3), again
    assert [h.version for h in await pipeline.parks.held(order_id)] == [3], "the refused event's copy was deleted"

    await db.command("collMod", "orders", validator={})  # MongoDB fixed
    assert await Repairer(pipeline, decode_event).resume_held(again) is not None
    doc = await db["orders"].find_one({"_id": order_id})
    assert doc is not None and doc["version"] == 3 and await pipeline.parks.get(order_id) is None
