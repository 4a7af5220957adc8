"""Resuming a parked stream from its held copies, against the real MongoDB-wire server: a stream parked because
its next event is too new for this build is not resumed before that event's own copy is held (the park and the
copies are written concurrently), so the resume loop never mistakes the moment between the two for a gap."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient

from core.dependency_metrics import dependency_metrics
from core.envelope import EventMetadata, RecordedEvent
from core.events import Event, decode_event
from core.order_events import OrderCreated, OrderItemQuantityChanged
from core.values import Address
from projector.parking import HeldEvent, Park
from projector.pipeline import Pipeline
from projector.planning import NEEDS_UPGRADE, decode_recorded
from projector.repair import Repairer
from tests.integration.test_sales_report import BY_TYPE

Doc = dict[str, Any]
ADDRESS = Address("Ada", "1 Main St", "", "London", "N1", "GB")


def recorded(order_id: str, version: int, event: Event) -> RecordedEvent:
    return RecordedEvent(
        event_id=uuid.uuid4(), stream_type="order", stream_id=order_id, version=version,
        event_type=event.event_type, schema_version=event.schema_version, payload=event.to_payload(),
        metadata=EventMetadata("r", "r", "r"), position=version, recorded_at=datetime.now(UTC).replace(microsecond=0),
    )  # fmt: skip


@pytest.fixture
async def pipeline(mongo_url: str, unique_name: str) -> AsyncIterator[Pipeline]:
    client: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True)
    try:
        pipeline = Pipeline(
            client[unique_name], BY_TYPE, dependency_metrics(CollectorRegistry()), stream_name="", park_after=1,
            max_backoff=1.0,
        )  # fmt: skip
        await pipeline.ensure_indexes()
        yield pipeline
    finally:
        await client.drop_database(unique_name)
        await client.close()


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
