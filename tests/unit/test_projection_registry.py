"""The seams of the read-model registry (`projector/registry.py`): every place that must know an event type either
learns it from the registry or fails here.

The checks are functions over the registry, run once against the real one (must find nothing) and once against a
throwaway event type, `OrderGiftWrapped`, registered for the test only, to prove each check fails loudly when the
new event is missed and passes once its step is done.
"""

from __future__ import annotations

import dataclasses
import typing
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import pytest
from pymongo import AsyncMongoClient

from command_service.domain import order as order_aggregate
from core import events as core_events
from core.envelope import EventMetadata, RecordedEvent
from core.events import Event, decode_event, known_event_types, register
from core.order_events import ORDER_STREAM_TYPE, OrderCreated, OrderItemAdded, OrderPlaced
from core.projections import DerivedView, Document, Projection
from core.projections.orders import ORDERS
from core.read_model import OrderStatus
from core.values import Address
from projector.customer_views import CustomerViews
from projector.order_stats import OrderStatsViews
from projector.pipeline import view_writers
from projector.planning import POISON, Delivery, FoldResult, Poison, ProjectionBatch, classify
from projector.registry import CUSTOMER_ORDER_STATS, PROJECTIONS, VIEWS, registry_problems
from projector.sales_views import SalesViews
from projector.view_planning import plan_views

ORDER_ID = "3f0c5a9e-1111-4b7c-9d55-6a1f2e3d4c5b"
CUSTOMER_ID = "cust-registry"
ADDRESS = Address("Ada Lovelace", "1 Analytical St", "", "London", "N1 1AA", "GB")


def recorded(event: Event, version: int) -> RecordedEvent:
    return RecordedEvent(
        event_id=uuid.uuid4(),
        stream_type=ORDER_STREAM_TYPE,
        stream_id=ORDER_ID,
        version=version,
        event_type=event.event_type,
        schema_version=event.schema_version,
        payload=event.to_payload(),
        metadata=EventMetadata("req", "corr", "cause"),
        position=version,
        recorded_at=datetime(2026, 1, 1, tzinfo=UTC),
    )


def sample_event(cls: type[Event]) -> Event:
    """An instance of any order event type, its fields filled by type (and a few by name, so it can apply)."""
    by_name: dict[str, Any] = {"order_id": ORDER_ID, "customer_id": CUSTOMER_ID, "currency": "EUR", "sku": "SKU-A"}
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = hints[f.name]
        values[f.name] = by_name.get(f.name) or {str: "x", int: 2, bool: True, Address: ADDRESS}.get(kind)
    return cls(**values)


def order_documents() -> Iterator[Document | None]:
    """An order before it exists, as a draft with a line, placed, and cancelled."""
    events: list[Event] = [
        OrderCreated(ORDER_ID, CUSTOMER_ID, "EUR", ADDRESS),
        OrderItemAdded("SKU-A", "Anvil", 1, 100),
        OrderPlaced(),
    ]
    yield None
    doc: Document | None = None
    for version, event in enumerate(events, start=1):
        doc = ORDERS.project(doc, recorded(event, version), event)
        if version > 1:
            yield doc
    assert doc is not None
    yield {**doc, "status": OrderStatus.CANCELLED}


def stats_contribution(doc: Document | None) -> tuple[Any, ...]:
    """What of an order the customer's statistics read: its customer, status, currency, existence, and its total
    when placed (see `projector.order_stats.order_stats_pipeline`)."""
    if doc is None:
        return ()
    status = doc.get("status")
    total = doc.get("total_minor") if status == OrderStatus.PLACED else None
    return (doc.get("customer_id"), status, doc.get("currency"), bool(doc.get("deleted")), total)


# The domain emits these only while the order is a draft (`_require_draft` in command_service/domain/order.py),
# where no statistic reads lines or totals. Any other event is checked against orders in every status: a new event
# is flagged until it triggers the statistics or is listed here, a conscious step either way.
DRAFT_ONLY_EVENTS = frozenset(
    {"OrderItemAdded", "OrderItemRemoved", "OrderItemQuantityChanged", "OrderShippingAddressChanged"}
)


def order_event_problems(projection: Projection, view: DerivedView) -> list[str]:
    """Every order event its projection handles: applied to each sample order it can occur on, it leaves a status
    of the read-model contract, and if it changes what the statistics read, it is a trigger of the statistics
    view."""
    problems: list[str] = []
    for event_type in sorted(projection.handlers):
        event = sample_event(_class_of(event_type))
        for doc in order_documents():
            if event_type in DRAFT_ONLY_EVENTS and doc is not None and doc.get("status") != OrderStatus.DRAFT:
                continue
            version = int(doc["version"]) + 1 if doc else 1
            try:
                new = projection.project(doc, recorded(event, version), event)
            except ValueError:
                continue  # does not apply to this order (e.g. OrderCreated on an existing one)
            if new.get("status") not in set(OrderStatus):
                problems.append(f"{event_type} leaves status {new.get('status')!r}, not a read-model OrderStatus")
            changed = stats_contribution(new) != stats_contribution(doc)
            if changed and not view.triggered_by(projection.stream_type, event_type):
                problems.append(f"{event_type} changes the customer statistics but is not a trigger of {view.name}")
    return sorted(set(problems))


def _class_of(event_type: str) -> type[Event]:
    return core_events._REGISTRY[event_type]


def test_the_registry_is_consistent() -> None:
    assert registry_problems() == []


def test_every_order_event_that_changes_statistics_triggers_them() -> None:
    assert order_event_problems(ORDERS, CUSTOMER_ORDER_STATS) == []


def test_every_view_has_a_writer_and_the_planner_plans_each_one() -> None:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient("mongodb://127.0.0.1:9", connect=False)
    database = client["unused"]
    assert set(view_writers(CustomerViews(database), OrderStatsViews(database), SalesViews(database))) == {
        view.name for view in VIEWS
    }
    plan = plan_views({}, VIEWS, {}, set())
    assert set(plan.keys) == {view.name for view in VIEWS}


# ---- a throwaway event type, end to end through the seams ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrderGiftWrapped(Event):
    """A new fact about a placed order that moves it to a status the read model does not know yet."""

    note: str


def on_order_gift_wrapped(doc: Document | None, _recorded: RecordedEvent, _event: Event) -> Document:
    if doc is None:
        raise ValueError("OrderGiftWrapped cannot apply before OrderCreated")
    return {**doc, "status": "gift_wrapped"}


def on_order_gift_wrapped_known_status(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    return {**on_order_gift_wrapped(doc, recorded, event), "status": OrderStatus.PLACED, "gift_wrapped": True}


NO_PROJECTION = "event type OrderGiftWrapped is handled by no projection (exactly one projection must handle it)"


@pytest.fixture
def gift_wrapped_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    # core.events has no public "unregister"; patching its table with a copy undoes the registration afterwards.
    monkeypatch.setattr(core_events, "_REGISTRY", dict(core_events._REGISTRY))
    register("OrderGiftWrapped")(OrderGiftWrapped)


def with_handler(projection: Projection, handler: Any) -> Projection:
    return replace(projection, handlers={**projection.handlers, "OrderGiftWrapped": handler})


def with_trigger(view: DerivedView, event_type: str) -> DerivedView:
    triggers: Mapping[str, frozenset[str]] = {
        **view.triggers,
        ORDER_STREAM_TYPE: view.triggers[ORDER_STREAM_TYPE] | {event_type},
    }
    return replace(view, triggers=triggers)


@pytest.mark.usefixtures("gift_wrapped_registered")
def test_a_new_event_type_missed_at_any_step_fails_loudly() -> None:
    event = OrderGiftWrapped("ribbon")
    assert "OrderGiftWrapped" in known_event_types()

    # 1. No projection handles it: the registry check names it, and the projector parks its stream (never ignores).
    assert registry_problems() == [
        "event type OrderGiftWrapped is handled by no projection (exactly one projection must handle it)"
    ]
    by_type = {p.stream_type: p for p in PROJECTIONS}
    item = classify(None, recorded(event, 4), by_type, decode_event)
    assert isinstance(item, Poison) and item.kind == POISON and "no handler" in item.reason

    # 2. A handler that writes a status outside the read-model contract (the query views could not map it).
    orders = with_handler(ORDERS, on_order_gift_wrapped)
    assert registry_problems((orders, *PROJECTIONS[1:])) == []
    problems = order_event_problems(orders, CUSTOMER_ORDER_STATS)
    assert "OrderGiftWrapped leaves status 'gift_wrapped', not a read-model OrderStatus" in problems

    # 3. A contract status, but the statistics view is not told: a status change that would count nowhere.
    orders = with_handler(ORDERS, on_order_gift_wrapped_known_status)
    item = classify(None, recorded(event, 4), {ORDER_STREAM_TYPE: orders}, decode_event)
    assert isinstance(item, Delivery)
    assert order_event_problems(orders, CUSTOMER_ORDER_STATS) == [
        f"OrderGiftWrapped changes the customer statistics but is not a trigger of {CUSTOMER_ORDER_STATS.name}"
    ]
    stats = with_trigger(CUSTOMER_ORDER_STATS, "OrderGiftWrapped")
    assert order_event_problems(orders, stats) == []

    # 4. The planner learns the trigger from the view: a batch applying the event recomputes the statistics.
    doc = next(d for d in order_documents() if d and d["status"] == OrderStatus.CANCELLED)
    batch = ProjectionBatch(orders, docs={ORDER_ID: doc})
    batch.result = FoldResult(applied={ORDER_ID: [item]})
    assert plan_views({ORDER_STREAM_TYPE: batch}, (CUSTOMER_ORDER_STATS,), {}, set()).keys == {
        CUSTOMER_ORDER_STATS.name: set()
    }
    assert plan_views({ORDER_STREAM_TYPE: batch}, (stats,), {}, set()).keys == {stats.name: {CUSTOMER_ID}}
    # A view triggered by an event its projection ignores is named too (a typo in a trigger set).
    assert (
        registry_problems(PROJECTIONS, (stats,))
        == [
            f"view {stats.name} is triggered by OrderGiftWrapped, which orders ignores",
            "event type OrderGiftWrapped is handled by no projection (exactly one projection must handle it)",
        ][::-1]
    )

    # 5. The command side's aggregate refuses an event it does not know instead of skipping it.
    state = order_aggregate.evolve(None, OrderCreated(ORDER_ID, CUSTOMER_ID, "EUR", ADDRESS))
    with pytest.raises(ValueError, match="OrderGiftWrapped"):
        order_aggregate.evolve(state, event)
