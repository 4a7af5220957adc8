"""The order projection's handlers are pure: given a document (or None) and an event, they return a new one."""

from __future__ import annotations

import copy
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.aio.msg import Msg

from core.envelope import EventMetadata, RecordedEvent
from core.events import Event, known_event_types
from core.order_events import (
    OrderCancelled,
    OrderCreated,
    OrderDeleted,
    OrderItemAdded,
    OrderItemQuantityChanged,
    OrderItemRemoved,
    OrderPlaced,
    OrderShippingAddressChanged,
)
from core.projections import Document, UnhandledEvent
from core.projections.customers import HANDLERS as CUSTOMER_HANDLERS
from core.projections.orders import HANDLERS, ORDERS, project
from core.values import Address
from projector.planning import Delivery, fold
from projector.runner import DEFAULT_PROJECTIONS

ORDER_ID = "0b6f1f3e-2a39-4c33-9c6c-0e6a1b1d2f11"
T0 = datetime(2025, 1, 2, 3, 4, 5, 123000, tzinfo=UTC)
ADDRESS = Address("Ada Lovelace", "1 Analytical St", "", "London", "N1 1AA", "GB")
NEW_ADDRESS = Address("Ada Lovelace", "2 Engine Rd", "Flat 3", "Bath", "BA1 1AA", "GB")


def recorded(event: Event, version: int, *, position: int | None = None, stream_id: str = ORDER_ID) -> RecordedEvent:
    return RecordedEvent(
        event_id=uuid.uuid4(),
        stream_type="order",
        stream_id=stream_id,
        version=version,
        event_type=event.event_type,
        schema_version=event.schema_version,
        payload=event.to_payload(),
        metadata=EventMetadata("req", "corr", "cause"),
        position=position if position is not None else 100 + version,
        recorded_at=T0 + timedelta(seconds=version),
    )


def apply_all(events: list[Event], doc: Document | None = None, first_version: int = 1) -> Document:
    for offset, event in enumerate(events):
        doc = project(doc, recorded(event, first_version + offset), event)
    assert doc is not None
    return doc


def created() -> OrderCreated:
    return OrderCreated(order_id=ORDER_ID, customer_id="cust-1", currency="EUR", shipping_address=ADDRESS)


def draft_with_two_lines() -> Document:
    return apply_all(
        [
            created(),
            OrderItemAdded(sku="A", name="Apple", quantity=3, unit_price_minor=120),
            OrderItemAdded(sku="B", name="Bread", quantity=1, unit_price_minor=250),
        ]
    )


def test_every_known_event_type_has_a_handler_in_the_projection_of_its_stream_type() -> None:
    assert set(HANDLERS) | set(CUSTOMER_HANDLERS) == known_event_types()
    assert not set(HANDLERS) & set(CUSTOMER_HANDLERS)
    assert {p.stream_type for p in DEFAULT_PROJECTIONS} == {"order", "customer"}


def test_order_created_starts_an_empty_draft() -> None:
    first = recorded(created(), 1, position=7)
    doc = project(None, first, created())
    assert doc.pop("history") == [
        {
            "event_id": str(first.event_id),
            "event_type": "OrderCreated",
            "schema_version": first.schema_version,
            "version": 1,
            "position": 7,
            "recorded_at": T0 + timedelta(seconds=1),
            "payload": first.payload,
            "correlation_id": "corr",
            "request_id": "req",
            "causation_id": "cause",
            "subject": "",
        }
    ]
    assert doc == {
        "_id": ORDER_ID,
        "order_id": ORDER_ID,
        "customer_id": "cust-1",
        "status": "DRAFT",
        "currency": "EUR",
        "lines": [],
        "total_minor": 0,
        "shipping_address": ADDRESS.to_dict(),
        "cancel_reason": "",
        "created_at": T0 + timedelta(seconds=1),
        "updated_at": T0 + timedelta(seconds=1),
        "placed_at": None,
        "cancelled_at": None,
        "version": 1,
        "position": 7,
        "deleted": False,
        "customer_name": "",
        "customer_email": "",
        "customer_version": 0,
    }


def test_order_created_onto_an_existing_document_cannot_apply() -> None:
    doc = apply_all([created()])
    with pytest.raises(ValueError, match="already has a document"):
        project(doc, recorded(created(), 2), created())


def test_order_created_for_another_stream_cannot_apply() -> None:
    with pytest.raises(ValueError, match="differs from stream id"):
        project(None, recorded(created(), 1, stream_id="other"), created())


def test_item_added_appends_a_line_and_derives_totals() -> None:
    doc = draft_with_two_lines()
    assert doc["lines"] == [
        {"sku": "A", "name": "Apple", "quantity": 3, "unit_price_minor": 120, "line_total_minor": 360},
        {"sku": "B", "name": "Bread", "quantity": 1, "unit_price_minor": 250, "line_total_minor": 250},
    ]
    assert doc["total_minor"] == 610
    assert doc["version"] == 3
    assert doc["position"] == 103
    assert doc["updated_at"] == T0 + timedelta(seconds=3)
    assert doc["created_at"] == T0 + timedelta(seconds=1)


def test_item_added_for_a_sku_already_on_the_order_cannot_apply() -> None:
    # The write side's evolve refuses it too: the read model must not invent a merge rule.
    with pytest.raises(ValueError, match="already has 'A'"):
        apply_all([OrderItemAdded(sku="A", name="Apple", quantity=2, unit_price_minor=100)], draft_with_two_lines(), 4)


def test_no_event_applies_to_a_deleted_order() -> None:
    deleted = apply_all([OrderDeleted()], draft_with_two_lines(), first_version=4)
    with pytest.raises(ValueError, match="was deleted"):
        apply_all([OrderPlaced()], deleted, first_version=5)


def test_item_removed_drops_the_line_and_the_total() -> None:
    doc = apply_all([OrderItemRemoved(sku="A")], draft_with_two_lines(), first_version=4)
    assert [line["sku"] for line in doc["lines"]] == ["B"]
    assert doc["total_minor"] == 250


def test_item_removed_for_an_unknown_sku_cannot_apply() -> None:
    with pytest.raises(ValueError, match="has no line 'Z'"):
        apply_all([OrderItemRemoved(sku="Z")], draft_with_two_lines(), first_version=4)


def test_item_quantity_changed_recomputes_line_and_order_totals() -> None:
    doc = apply_all([OrderItemQuantityChanged(sku="B", quantity=4)], draft_with_two_lines(), first_version=4)
    assert doc["lines"][1] == {
        "sku": "B",
        "name": "Bread",
        "quantity": 4,
        "unit_price_minor": 250,
        "line_total_minor": 1000,
    }
    assert doc["total_minor"] == 1360


@pytest.mark.parametrize(
    "event", [OrderItemQuantityChanged(sku="Z", quantity=1), OrderItemQuantityChanged(sku="A", quantity=0)]
)
def test_item_quantity_changed_that_does_not_fit_cannot_apply(event: Event) -> None:
    with pytest.raises(ValueError):
        apply_all([event], draft_with_two_lines(), first_version=4)


def test_shipping_address_changed_replaces_the_address() -> None:
    doc = apply_all(
        [OrderShippingAddressChanged(shipping_address=NEW_ADDRESS)], draft_with_two_lines(), first_version=4
    )
    assert doc["shipping_address"] == NEW_ADDRESS.to_dict()
    assert doc["total_minor"] == 610


def test_order_placed_sets_status_and_placed_at() -> None:
    doc = apply_all([OrderPlaced()], draft_with_two_lines(), first_version=4)
    assert doc["status"] == "PLACED"
    assert doc["placed_at"] == T0 + timedelta(seconds=4)
    assert doc["updated_at"] == T0 + timedelta(seconds=4)


def test_order_cancelled_sets_status_reason_and_cancelled_at() -> None:
    doc = apply_all([OrderPlaced(), OrderCancelled(reason="changed my mind")], draft_with_two_lines(), first_version=4)
    assert doc["status"] == "CANCELLED"
    assert doc["cancel_reason"] == "changed my mind"
    assert doc["placed_at"] == T0 + timedelta(seconds=4)
    assert doc["cancelled_at"] == T0 + timedelta(seconds=5)
    assert doc["version"] == 5


def test_order_deleted_keeps_a_tombstone_with_its_version() -> None:
    before = draft_with_two_lines()
    doc = apply_all([OrderDeleted()], before, first_version=4)
    assert doc["deleted"] is True
    assert doc["version"] == 4
    bookkeeping = {"deleted", "version", "position", "updated_at", "history"}
    assert {k: v for k, v in doc.items() if k not in bookkeeping} == {
        k: v for k, v in before.items() if k not in bookkeeping
    }
    # the deletion is the last entry of the change log, which the tombstone keeps
    assert [e["event_type"] for e in doc["history"]] == [
        "OrderCreated",
        "OrderItemAdded",
        "OrderItemAdded",
        "OrderDeleted",
    ]


@pytest.mark.parametrize(
    "event",
    [
        OrderItemAdded(sku="A", name="Apple", quantity=1, unit_price_minor=1),
        OrderItemRemoved(sku="A"),
        OrderItemQuantityChanged(sku="A", quantity=2),
        OrderShippingAddressChanged(shipping_address=NEW_ADDRESS),
        OrderPlaced(),
        OrderCancelled(reason="x"),
        OrderDeleted(),
    ],
)
def test_events_other_than_created_need_a_document(event: Event) -> None:
    with pytest.raises(ValueError, match="no document"):
        project(None, recorded(event, 1), event)


@pytest.mark.parametrize(
    "event",
    [
        OrderItemAdded(sku="C", name="Cheese", quantity=2, unit_price_minor=300),
        OrderItemRemoved(sku="A"),
        OrderItemQuantityChanged(sku="A", quantity=9),
        OrderShippingAddressChanged(shipping_address=NEW_ADDRESS),
        OrderPlaced(),
        OrderCancelled(reason="x"),
        OrderDeleted(),
    ],
)
def test_handlers_do_not_mutate_their_input(event: Event) -> None:
    doc = draft_with_two_lines()
    snapshot = copy.deepcopy(doc)
    new_doc = project(doc, recorded(event, 4), event)
    assert doc == snapshot
    assert new_doc is not doc
    assert new_doc["lines"] is not doc["lines"]
    assert new_doc["shipping_address"] is not doc["shipping_address"]


def test_a_handler_given_the_wrong_event_class_refuses_it() -> None:
    doc = draft_with_two_lines()
    event = OrderPlaced()
    mislabelled = RecordedEvent(**{**_fields(recorded(event, 4)), "event_type": "OrderCancelled"})
    with pytest.raises(ValueError, match="expected OrderCancelled"):
        project(doc, mislabelled, event)


def test_an_event_type_without_handler_is_unhandled() -> None:
    event = OrderPlaced()
    unknown = RecordedEvent(**{**_fields(recorded(event, 4)), "event_type": "OrderTeleported"})
    with pytest.raises(UnhandledEvent):
        ORDERS.project(draft_with_two_lines(), unknown, event)


def _fields(event: RecordedEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in RecordedEvent.__dataclass_fields__}


# ---- the runner's fold: version guard over a batch, no I/O ------------------------------------------------------


def deliveries(*pairs: tuple[Event, int]) -> list[Delivery]:
    out = []
    for event, version in pairs:
        rec = recorded(event, version)
        out.append(Delivery(Msg(_client=None, subject=f"cqrs.events.order.{ORDER_ID}", data=rec.to_json()), rec, event))  # type: ignore[arg-type]
    return out


def versions(items: list[Delivery]) -> list[int]:
    return [d.recorded.version for d in items]


def test_fold_applies_consecutive_versions_in_version_order() -> None:
    batch = deliveries(
        (OrderItemAdded("B", "Bread", 1, 250), 3), (created(), 1), (OrderItemAdded("A", "Apple", 1, 100), 2)
    )
    result = fold(ORDERS, {ORDER_ID: batch}, {})
    assert [(c.doc_id, c.expected_version, c.new_doc["version"]) for c in result.changes] == [(ORDER_ID, None, 3)]
    assert versions(result.applied[ORDER_ID]) == [1, 2, 3]
    assert (result.duplicates, result.deferred, result.poison) == ([], [], [])


def test_fold_acks_versions_already_applied_as_duplicates() -> None:
    doc = draft_with_two_lines()  # at version 3
    batch = deliveries((created(), 1), (OrderItemAdded("B", "Bread", 1, 250), 3), (OrderPlaced(), 4))
    result = fold(ORDERS, {ORDER_ID: batch}, {ORDER_ID: doc})
    assert versions(result.duplicates) == [1, 3]
    assert [(c.expected_version, c.new_doc["status"]) for c in result.changes] == [(3, "PLACED")]


def test_fold_defers_a_gap_and_everything_after_it() -> None:
    doc = apply_all([created()])  # at version 1
    batch = deliveries((OrderPlaced(), 3), (OrderCancelled("x"), 4))
    result = fold(ORDERS, {ORDER_ID: batch}, {ORDER_ID: doc})
    assert result.changes == []
    assert versions(result.deferred) == [3, 4]
    assert result.gaps == 1


def test_fold_parks_an_event_that_cannot_apply_and_holds_back_the_rest() -> None:
    batch = deliveries((created(), 1), (OrderItemRemoved("missing"), 2), (OrderPlaced(), 3))
    result = fold(ORDERS, {ORDER_ID: batch}, {})
    assert [c.new_doc["version"] for c in result.changes] == [1]
    assert len(result.poison) == 1 and "has no line 'missing'" in result.poison[0].reason
    poison = result.poison[0]
    assert (poison.kind, poison.stream_id, poison.stream_type, poison.version) == ("poison", ORDER_ID, "order", 2)
    assert versions(result.held) == [3]
    assert result.deferred == []
