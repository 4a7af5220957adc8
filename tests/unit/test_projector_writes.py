"""The projector's grouped sales facts (pure part) and the cost bench's pure helpers."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bench.projector_cost import Run, _fields_apart, interleaved, order, ratios, top_delta
from command_service.event_store import AppendRequest, RequestRecord
from core.envelope import EventMetadata, RecordedEvent
from core.events import Event
from core.order_events import OrderCreated, OrderItemAdded, OrderPlaced
from core.projections.orders import ORDERS
from core.projections.sales import COUNTED_FIELD, fact_updates, shard_of
from core.values import Address
from projector.sales_views import merge_fact_updates

T0 = datetime(2025, 3, 4, 5, 6, 7, 250000, tzinfo=UTC)
ADDRESS = Address("Ada Lovelace", "1 Analytical St", "", "London", "N1 1AA", "GB")
ORDER_ID = "order-1"


def recorded(event: Event, version: int, stream_id: str = ORDER_ID) -> RecordedEvent:
    return RecordedEvent(
        event_id=uuid.uuid4(), stream_type="order", stream_id=stream_id, version=version,
        event_type=event.event_type, schema_version=event.schema_version, payload=event.to_payload(),
        metadata=EventMetadata("r", "c", "c"), position=version, recorded_at=T0 + timedelta(seconds=version),
    )  # fmt: skip


def fold(events: list[Event], stream_id: str = ORDER_ID) -> list[dict[str, Any]]:
    """The order document after each event."""
    docs: list[dict[str, Any]] = []
    doc: dict[str, Any] | None = None
    for version, event in enumerate(events, start=1):
        doc = ORDERS.project(doc, recorded(event, version, stream_id), event)
        docs.append(doc)
    return docs


def events(order_id: str = ORDER_ID) -> list[Event]:
    return [OrderCreated(order_id, "c-1", "EUR", ADDRESS), OrderItemAdded("SKU-1", "Anvil", 2, 1250), OrderPlaced()]


def test_facts_of_one_shard_merge_into_one_update() -> None:
    first, second = "order-a", next(f"order-{n}" for n in range(1000) if shard_of(f"order-{n}") == shard_of("order-a"))
    facts = [(oid, *fact) for oid in (first, second) for fact in fact_updates(oid, fold(events(oid), oid)[-1])]
    merged = merge_fact_updates(facts)
    assert merged["$push"] == {COUNTED_FIELD: {"$each": [f"{first}:placed", f"{second}:placed"]}}
    assert merged["$inc"]["placed_orders"] == 2 and merged["$inc"]["placed_revenue_minor"] == 2 * 2500
    assert all(value == 2 * facts[0][3]["$inc"][path] for path, value in merged["$inc"].items())
    assert merged["$set"] == facts[0][3]["$set"]


def test_the_bench_interleaves_streams_in_version_order_and_alternates_variants() -> None:
    meta = EventMetadata("b", "b", "b")

    def append(stream_id: str, count: int) -> AppendRequest:
        placed: tuple[Event, ...] = tuple(OrderPlaced() for _ in range(count))
        return AppendRequest("order", stream_id, 0, placed, meta, RequestRecord(stream_id, "Bench", stream_id), 0)

    mixed = interleaved([append("a", 3), append("b", 1), append("c", 2)])
    assert [(a.stream_id, a.expected_version) for a in mixed] == [
        ("a", 0), ("b", 0), ("c", 0), ("a", 1), ("c", 1), ("a", 2),
    ]  # fmt: skip
    assert len({a.request.request_id for a in mixed}) == len(mixed)
    assert order(3) == [(0, "baseline"), (0, "new"), (1, "new"), (1, "baseline"), (2, "baseline"), (2, "new")]


def test_the_bench_figures() -> None:
    run = Run("new", events=1000, seconds=2.0, batches=10, requests=50, cpu_s={"projector": 0.5, "mongo": None})
    figures = run.figures()
    assert figures["projector CPU ms/event"] == 0.5 and figures["MongoDB-wire CPU ms/event"] is None
    assert figures["Mongo requests/batch"] == 5 and figures["events/s"] == 500
    assert ratios({"a": 1.0, "b": None, "c": 2.0}, {"a": 2.0, "b": 1.0, "c": 0.0}) == {"a": 0.5, "b": None, "c": None}
    before = {"db.orders": {"update": {"time": 10, "count": 1}, "total": {"time": 10, "count": 1}}}
    after = {
        "db.orders": {"update": {"time": 40, "count": 4}, "total": {"time": 40, "count": 4}},
        "db.checkpoints": {"update": {"time": 5, "count": 1}},
        "other.orders": {"update": {"time": 99, "count": 9}},
    }
    assert top_delta(before, after, "db") == {"orders update": (30, 3), "checkpoints update": (5, 1)}


def test_the_cost_bench_says_in_which_fields_two_read_models_differ() -> None:
    apart = _fields_apart({"_id": "c-1", "a": 1, "b": 2}, {"_id": "c-1", "a": 1, "b": 3, "d": 4})
    assert apart == "c-1: b 2 / 3; d None / 4"
