"""The customer projection's handlers, the pure parts of the cross-aggregate views, and the write operations."""

from __future__ import annotations

import copy
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.aio.msg import Msg
from pymongo import UpdateOne

from core.customer_events import CustomerDeactivated, CustomerEmailChanged, CustomerRegistered, CustomerRenamed
from core.envelope import EventMetadata, RecordedEvent
from core.events import Event
from core.order_events import OrderCreated, OrderItemAdded, OrderPlaced
from core.projections import Document
from core.projections.customers import CUSTOMERS, HANDLERS, empty_order_stats, project
from core.projections.orders import ORDERS
from core.values import Address
from projector.checkpoints import Checkpoint
from projector.customer_views import CustomerFields
from projector.mongo_writer import Change, WriteOutcome, write_operation
from projector.order_stats import order_stats_from_groups, order_stats_pipeline
from projector.planning import (
    Delivery,
    FoldResult,
    Poison,
    ProjectionBatch,
    checkpoints_of,
    decode_messages,
    doc_checkpoints,
    fold,
    hold_from_failures,
    prefill_customer_fields,
)
from projector.registry import CUSTOMER_ORDER_STATS, ORDER_CUSTOMER_FIELDS, VIEWS
from projector.view_planning import lagging_views, plan_views, view_steps

CUSTOMER_ID = "5d0c3a52-8f0e-4d0f-a2a1-3c8d6f0e9b21"
T0 = datetime(2025, 3, 4, 5, 6, 7, 250000, tzinfo=UTC)
ADDRESS = Address("Ada Lovelace", "1 Analytical St", "", "London", "N1 1AA", "GB")
STATS = {
    "draft_orders": 1,
    "placed_orders": 2,
    "cancelled_orders": 0,
    "placed_totals": [{"currency": "EUR", "total_minor": 1500}],
}


def recorded(
    event: Event, version: int, *, stream_id: str = CUSTOMER_ID, stream_type: str = "customer"
) -> RecordedEvent:
    return RecordedEvent(
        event_id=uuid.uuid4(),
        stream_type=stream_type,
        stream_id=stream_id,
        version=version,
        event_type=event.event_type,
        schema_version=event.schema_version,
        payload=event.to_payload(),
        metadata=EventMetadata("req", "corr", "cause"),
        position=200 + version,
        recorded_at=T0 + timedelta(seconds=version),
    )


def registered() -> CustomerRegistered:
    return CustomerRegistered(customer_id=CUSTOMER_ID, name="Ada Lovelace", email="ada@example.org")


def apply_all(events: list[Event], doc: Document | None = None, first_version: int = 1) -> Document:
    for offset, event in enumerate(events):
        doc = project(doc, recorded(event, first_version + offset), event)
    assert doc is not None
    return doc


def test_the_customer_table_handles_exactly_the_customer_events() -> None:
    assert set(HANDLERS) == {"CustomerRegistered", "CustomerRenamed", "CustomerEmailChanged", "CustomerDeactivated"}
    assert CUSTOMERS.stream_type == "customer"
    assert CUSTOMERS.collection == "customers"


def test_registration_starts_an_active_customer_with_empty_order_stats() -> None:
    doc = project(None, recorded(registered(), 1), registered())
    assert doc == {
        "_id": CUSTOMER_ID,
        "customer_id": CUSTOMER_ID,
        "name": "Ada Lovelace",
        "email": "ada@example.org",
        "status": "ACTIVE",
        "registered_at": T0 + timedelta(seconds=1),
        "updated_at": T0 + timedelta(seconds=1),
        "version": 1,
        "position": 201,
        "order_stats": {"draft_orders": 0, "placed_orders": 0, "cancelled_orders": 0, "placed_totals": []},
        "order_stats_version": 0,
    }


def test_registration_onto_a_statistics_only_document_keeps_the_statistics() -> None:
    stats_only = {"_id": CUSTOMER_ID, "order_stats": copy.deepcopy(STATS), "order_stats_version": 7}
    snapshot = copy.deepcopy(stats_only)
    doc = project(stats_only, recorded(registered(), 1), registered())
    assert stats_only == snapshot
    assert (doc["order_stats"], doc["order_stats_version"]) == (STATS, 7)
    assert (doc["name"], doc["version"], doc["status"]) == ("Ada Lovelace", 1, "ACTIVE")


def test_registering_twice_or_under_another_id_cannot_apply() -> None:
    doc = apply_all([registered()])
    with pytest.raises(ValueError, match="already registered"):
        project(doc, recorded(registered(), 2), registered())
    with pytest.raises(ValueError, match="differs from stream id"):
        project(None, recorded(registered(), 1, stream_id="other"), registered())


def test_rename_email_change_and_deactivation_update_the_document() -> None:
    doc = apply_all(
        [registered(), CustomerRenamed("Ada King"), CustomerEmailChanged("ada@king.example"), CustomerDeactivated()]
    )
    assert (doc["name"], doc["email"], doc["status"]) == ("Ada King", "ada@king.example", "DEACTIVATED")
    assert (doc["version"], doc["position"]) == (4, 204)
    assert doc["registered_at"] == T0 + timedelta(seconds=1)
    assert doc["updated_at"] == T0 + timedelta(seconds=4)


@pytest.mark.parametrize("event", [CustomerRenamed("X"), CustomerEmailChanged("x@example.org"), CustomerDeactivated()])
def test_changes_need_a_registered_customer(event: Event) -> None:
    with pytest.raises(ValueError, match="no document"):
        project(None, recorded(event, 1), event)
    stats_only = {"_id": CUSTOMER_ID, "order_stats": copy.deepcopy(STATS)}
    with pytest.raises(ValueError, match="no document"):
        project(stats_only, recorded(event, 1), event)


@pytest.mark.parametrize("event", [CustomerRenamed("X"), CustomerEmailChanged("x@example.org"), CustomerDeactivated()])
def test_handlers_do_not_mutate_their_input(event: Event) -> None:
    doc = apply_all([registered()])
    doc["order_stats"] = copy.deepcopy(STATS)
    snapshot = copy.deepcopy(doc)
    new_doc = project(doc, recorded(event, 2), event)
    assert doc == snapshot
    assert new_doc["order_stats"] == STATS
    assert new_doc["order_stats"] is not doc["order_stats"]
    assert new_doc["order_stats"]["placed_totals"] is not doc["order_stats"]["placed_totals"]


def test_a_handler_given_the_wrong_event_class_refuses_it() -> None:
    doc = apply_all([registered()])
    event = CustomerDeactivated()
    mislabelled = RecordedEvent(**{**_fields(recorded(event, 2)), "event_type": "CustomerRenamed"})
    with pytest.raises(ValueError, match="expected CustomerRenamed"):
        project(doc, mislabelled, event)


def _fields(event: RecordedEvent) -> dict[str, Any]:
    return {name: getattr(event, name) for name in RecordedEvent.__dataclass_fields__}


# ---- fold and write operations ----------------------------------------------------------------------------------


def delivery(event: Event, version: int, *, stream_id: str = CUSTOMER_ID, stream_type: str = "customer") -> Delivery:
    rec = recorded(event, version, stream_id=stream_id, stream_type=stream_type)
    msg = Msg(_client=None, subject=f"cqrs.events.{stream_type}.{stream_id}", data=rec.to_json())  # type: ignore[arg-type]
    return Delivery(msg, rec, event)


def test_fold_treats_a_statistics_only_document_as_version_0() -> None:
    stats_only = {"_id": CUSTOMER_ID, "order_stats": copy.deepcopy(STATS), "order_stats_version": 3}
    batch = [delivery(CustomerRenamed("Ada King"), 2), delivery(registered(), 1)]
    result = fold(CUSTOMERS, {CUSTOMER_ID: batch}, {CUSTOMER_ID: stats_only})
    assert [(c.expected_version, c.new_doc["version"], c.new_doc["name"]) for c in result.changes] == [
        (0, 2, "Ada King")
    ]


def test_customer_writes_never_set_the_order_statistics() -> None:
    doc = apply_all([registered()])
    create = write_operation(CUSTOMERS, Change(CUSTOMER_ID, 0, doc))
    own = {k: v for k, v in doc.items() if k not in {"_id", "order_stats", "order_stats_version"}}
    assert create == UpdateOne(
        {"_id": CUSTOMER_ID, "version": {"$exists": False}},
        {"$set": own, "$setOnInsert": {"order_stats": empty_order_stats(), "order_stats_version": 0}},
        upsert=True,
    )
    renamed = project(doc, recorded(CustomerRenamed("B"), 2), CustomerRenamed("B"))
    update = write_operation(CUSTOMERS, Change(CUSTOMER_ID, 1, renamed))
    assert update == UpdateOne(
        {"_id": CUSTOMER_ID, "version": 1},
        {"$set": {k: v for k, v in renamed.items() if k not in {"_id", "order_stats", "order_stats_version"}}},
        upsert=True,
    )


def test_order_updates_never_set_the_customer_fields_but_creation_does() -> None:
    order_id = "order-1"
    created = OrderCreated(order_id, CUSTOMER_ID, "EUR", ADDRESS)
    new_order = ORDERS.project(None, recorded(created, 1, stream_id=order_id, stream_type="order"), created)
    prefill_customer_fields([Change(order_id, None, new_order)], {CUSTOMER_ID: CustomerFields("Ada", "a@x.org", 4)})
    assert (new_order["customer_name"], new_order["customer_email"], new_order["customer_version"]) == (
        "Ada",
        "a@x.org",
        4,
    )
    op = write_operation(ORDERS, Change(order_id, None, new_order))
    assert isinstance(op._doc, dict)  # an update document, not a pipeline
    assert op._doc["$setOnInsert"] == {"customer_name": "Ada", "customer_email": "a@x.org", "customer_version": 4}
    placed = ORDERS.project(new_order, recorded(OrderPlaced(), 2, stream_id=order_id), OrderPlaced())
    op = write_operation(ORDERS, Change(order_id, 1, placed))
    assert op._filter == {"_id": order_id, "version": 1}
    assert isinstance(op._doc, dict) and set(op._doc) == {"$set"}
    assert not {"customer_name", "customer_email", "customer_version", "_id"} & set(op._doc["$set"])


def test_prefill_leaves_unknown_customers_and_existing_orders_alone() -> None:
    doc = {"customer_id": "unknown", "customer_name": "", "customer_version": 0}
    existing = {"customer_id": CUSTOMER_ID, "customer_name": "Old", "customer_version": 1}
    prefill_customer_fields(
        [Change("o1", None, doc), Change("o2", 3, existing)], {CUSTOMER_ID: CustomerFields("New", "n@x.org", 2)}
    )
    assert (doc["customer_name"], existing["customer_name"]) == ("", "Old")


# ---- order statistics and checkpoints ---------------------------------------------------------------------------


def row(customer: str, status: str, currency: str, deleted: bool, orders: int, total: int, versions: int) -> Document:
    return {
        "_id": {"customer_id": customer, "status": status, "currency": currency, "deleted": deleted},
        "orders": orders,
        "total_minor": total,
        "versions": versions,
    }


def test_order_stats_count_live_orders_and_total_placed_ones_per_currency() -> None:
    rows = [
        row("c1", "DRAFT", "EUR", False, 2, 300, 4),
        row("c1", "PLACED", "USD", False, 1, 700, 3),
        row("c1", "PLACED", "EUR", False, 2, 1100, 6),
        row("c1", "PLACED", "EUR", True, 1, 9999, 4),  # deleted: only its versions count
        row("c1", "CANCELLED", "EUR", False, 1, 50, 4),
        row("c2", "DRAFT", "GBP", False, 1, 0, 1),
    ]
    stats = order_stats_from_groups(["c1", "c2", "c3"], rows)
    assert stats["c1"].stats == {
        "draft_orders": 2,
        "placed_orders": 3,
        "cancelled_orders": 1,
        "placed_totals": [{"currency": "EUR", "total_minor": 1100}, {"currency": "USD", "total_minor": 700}],
    }
    assert stats["c1"].source_version == 4 + 3 + 6 + 4 + 4
    assert stats["c2"].stats == {"draft_orders": 1, "placed_orders": 0, "cancelled_orders": 0, "placed_totals": []}
    assert (stats["c3"].stats, stats["c3"].source_version) == (empty_order_stats(), 0)


def test_order_stats_pipeline_is_one_match_and_one_group() -> None:
    pipeline = order_stats_pipeline(["c1", "c2"])
    assert [next(iter(stage)) for stage in pipeline] == ["$match", "$group"]
    assert pipeline[0] == {"$match": {"customer_id": {"$in": ["c1", "c2"]}}}


def test_checkpoints_take_the_latest_applied_or_duplicate_version_per_stream() -> None:
    customers = ProjectionBatch(CUSTOMERS)
    customers.result = FoldResult(
        applied={CUSTOMER_ID: [delivery(CustomerRenamed("A"), 3), delivery(CustomerRenamed("B"), 4)]},
        duplicates=[delivery(registered(), 1), delivery(CustomerRenamed("Z"), 2, stream_id="other")],
        deferred=[delivery(CustomerRenamed("C"), 6, stream_id="gappy")],
    )
    assert checkpoints_of([customers]) == {
        CUSTOMER_ID: Checkpoint("customer", 4, 204),
        "other": Checkpoint("customer", 2, 202),
    }
    customers.outcome.conflicts.add(CUSTOMER_ID)  # not written: only what was already there counts
    assert checkpoints_of([customers]) == {
        CUSTOMER_ID: Checkpoint("customer", 1, 201),
        "other": Checkpoint("customer", 2, 202),
    }


# ---- batch planning: decoding, holding behind failures, derived views of lagging streams ------------------------


def message(rec: RecordedEvent | None, *, data: bytes | None = None, subject: str = "") -> Msg:
    body = rec.to_json() if rec is not None else (data or b"")
    headers = rec.headers() if rec is not None else None
    subject = subject or (f"cqrs.events.{rec.stream_type}.{rec.stream_id}" if rec is not None else "cqrs.events.x")
    return Msg(_client=None, subject=subject, data=body, headers=headers)  # type: ignore[arg-type]


PROJECTIONS = {"order": ORDERS, "customer": CUSTOMERS}


def test_decoding_tells_poison_from_events_too_new_and_from_streams_nobody_follows() -> None:
    good = recorded(CustomerRenamed("B"), 2)
    too_new = replace(recorded(CustomerRenamed("C"), 3), schema_version=9)
    unknown_type = replace(recorded(CustomerRenamed("D"), 4, stream_id="c2"), event_type="CustomerTeleported")
    malformed = replace(recorded(CustomerRenamed("E"), 1, stream_id="c3"), payload={"nom": "E"})
    foreign = replace(recorded(CustomerRenamed("F"), 1, stream_id="w1"), stream_type="warehouse")
    msgs = [message(r) for r in (good, too_new, unknown_type, malformed, foreign)]
    msgs.append(message(None, data=b"\xff", subject=f"cqrs.events.order.{CUSTOMER_ID}-o"))
    msgs.append(message(None, data=b"\xff", subject="cqrs.events.nowhere"))
    batch = decode_messages(msgs, PROJECTIONS, "cqrs.events")
    assert [d.recorded.version for d in batch.groups["customer"][CUSTOMER_ID]] == [2]
    kinds = [(f.kind, f.stream_id, f.version) for f in batch.failures]
    assert kinds == [
        ("needs_upgrade", CUSTOMER_ID, 3),
        ("needs_upgrade", "c2", 4),
        ("poison", "c3", 1),
        ("poison", f"{CUSTOMER_ID}-o", None),  # unreadable: the stream from the subject, no version
        ("poison", None, None),  # names no stream: a dead letter of its own
    ]
    assert [m.subject for m in batch.foreign] == ["cqrs.events.warehouse.w1"]


def test_a_failure_holds_its_stream_from_its_version_on_and_an_unreadable_one_holds_it_all() -> None:
    events = [recorded(CustomerRenamed(f"N{v}"), v) for v in (1, 2, 3, 4)]
    other = [recorded(CustomerRenamed("X"), v, stream_id="c9") for v in (5, 6)]
    batch = decode_messages([message(r) for r in events + other], PROJECTIONS, "cqrs.events")
    batch.failures.append(Poison(None, "bad", "poison", CUSTOMER_ID, "customer", 3))
    batch.failures.append(Poison(None, "unreadable", "poison", "c9", "customer", None))
    held = hold_from_failures(batch)
    assert [d.recorded.version for d in batch.groups["customer"][CUSTOMER_ID]] == [1, 2]
    assert [d.recorded.version for d in held[CUSTOMER_ID]] == [3, 4]
    assert "c9" not in batch.groups["customer"] and [d.recorded.version for d in held["c9"]] == [5, 6]


STATS_VIEW, FIELDS_VIEW = CUSTOMER_ORDER_STATS.name, ORDER_CUSTOMER_FIELDS.name


def test_a_stream_ahead_of_its_checkpoint_gets_its_derived_views_in_full() -> None:
    order_id = "order-7"
    created = OrderCreated(order_id, CUSTOMER_ID, "EUR", ADDRESS)
    doc = ORDERS.project(None, recorded(created, 1, stream_id=order_id, stream_type="order"), created)
    doc["customer_version"] = 3
    placed = OrderPlaced()  # a statistics event; the batch brings only a duplicate of it
    orders = ProjectionBatch(ORDERS)
    orders.docs = {order_id: doc}
    orders.result = FoldResult(duplicates=[delivery(placed, 1, stream_id=order_id, stream_type="order")])
    # In step with its checkpoint: the checkpoint says the views count it already; nothing to write, nothing depends.
    batches = {"order": orders}
    plan = plan_views(batches, VIEWS, lagging={}, touched=set())
    assert (plan.keys[STATS_VIEW], plan.keys[FIELDS_VIEW], plan.depends) == (set(), set(), {})
    # Written by this batch: the statistics (a trigger event) but no fan-out (the order's customer did not change).
    orders.result = FoldResult(applied={order_id: [delivery(placed, 2, stream_id=order_id, stream_type="order")]})
    plan = plan_views(batches, VIEWS, lagging={}, touched=set())
    assert (plan.keys[STATS_VIEW], plan.keys[FIELDS_VIEW]) == ({CUSTOMER_ID}, set())
    orders.result = FoldResult(duplicates=[delivery(placed, 1, stream_id=order_id, stream_type="order")])
    # Ahead of its checkpoint (an earlier batch wrote it and stopped before its views): everything, from scratch.
    behind = {view.name: {order_id} for view in VIEWS}
    plan = plan_views(batches, VIEWS, lagging=behind, touched=set())
    assert (plan.keys[STATS_VIEW], plan.keys[FIELDS_VIEW]) == ({CUSTOMER_ID}, {CUSTOMER_ID})
    assert plan.carried[FIELDS_VIEW] == {CUSTOMER_ID: 0}
    assert plan.depends == {order_id: {(STATS_VIEW, CUSTOMER_ID), (FIELDS_VIEW, CUSTOMER_ID)}}
    # A stream being resumed without events of its own is planned as well.
    orders.result = FoldResult()
    plan = plan_views(batches, VIEWS, lagging=behind, touched={order_id})
    assert plan.keys[STATS_VIEW] == {CUSTOMER_ID}
    assert doc_checkpoints([orders], {order_id}) == {order_id: Checkpoint("order", 1, 201)}


SALES_VIEW = "sales_report"


def _order_at(version_events: list[Event], order_id: str = "order-8") -> Document:
    """An order document folded from these events (versions 1, 2, ...), with its change log."""
    doc: Document | None = None
    for version, event in enumerate(version_events, start=1):
        doc = ORDERS.project(doc, recorded(event, version, stream_id=order_id, stream_type="order"), event)
    assert doc is not None
    return doc


def test_a_stream_is_behind_only_on_the_views_that_follow_an_event_above_its_checkpoint() -> None:
    order_id = "order-8"
    created = OrderCreated(order_id, CUSTOMER_ID, "EUR", ADDRESS)
    doc = _order_at([created, OrderItemAdded("sku-1", "Tea", 2, 350)], order_id)
    orders = ProjectionBatch(ORDERS, docs={order_id: doc})
    views = [ORDER_CUSTOMER_FIELDS, CUSTOMER_ORDER_STATS, *[v for v in VIEWS if v.name == SALES_VIEW]]
    # Ahead by an added item only: no view shows it (a draft's lines), so none is behind.
    assert lagging_views({"order": orders}, {order_id: 1}, views) == {FIELDS_VIEW: set(), STATS_VIEW: set(),
                                                                       SALES_VIEW: set()}  # fmt: skip
    # Ahead by its creation too: the fan-out and the statistics follow it, the sales report does not.
    assert lagging_views({"order": orders}, {}, views) == {FIELDS_VIEW: {order_id}, STATS_VIEW: {order_id},
                                                           SALES_VIEW: set()}  # fmt: skip
    # At its checkpoint: behind on nothing.
    assert lagging_views({"order": orders}, {order_id: 2}, views)[STATS_VIEW] == set()
    # A change log that does not show every version above the checkpoint says nothing: behind on every view.
    gappy = {**doc, "history": doc["history"][:1]}
    assert lagging_views({"order": ProjectionBatch(ORDERS, docs={order_id: gappy})}, {order_id: 1}, views) == {
        FIELDS_VIEW: {order_id}, STATS_VIEW: {order_id}, SALES_VIEW: {order_id}}  # fmt: skip
    no_log = {k: v for k, v in doc.items() if k != "history"}
    assert lagging_views({"order": ProjectionBatch(ORDERS, docs={order_id: no_log})}, {order_id: 1}, views)[
        STATS_VIEW] == {order_id}  # fmt: skip


def test_a_stream_ahead_of_its_checkpoint_by_events_the_statistics_ignore_is_stepped_not_recomputed() -> None:
    order_id = "order-8"
    created = OrderCreated(order_id, CUSTOMER_ID, "EUR", ADDRESS)
    events: list[Event] = [created, OrderItemAdded("sku-1", "Tea", 2, 350)]
    doc = _order_at(events, order_id)  # v2, its checkpoint at v1: the item's batch stopped before its checkpoint
    placed = OrderPlaced()
    after = ORDERS.project(copy.deepcopy(doc), recorded(placed, 3, stream_id=order_id, stream_type="order"), placed)
    orders = ProjectionBatch(ORDERS, docs={order_id: doc})
    orders.result = FoldResult(
        applied={order_id: [delivery(placed, 3, stream_id=order_id, stream_type="order")]},
        changes=[Change(order_id, 2, after)],
    )
    orders.outcome = WriteOutcome()
    batches = {"order": orders}
    checkpoints = {order_id: 1}
    lagging = lagging_views(batches, checkpoints, VIEWS)
    plan = plan_views(batches, VIEWS, lagging, set())
    assert plan.keys[STATS_VIEW] == {CUSTOMER_ID}
    steps = view_steps(plan, STATS_VIEW, [orders], checkpoints, set(), lagging[STATS_VIEW])
    assert steps == {CUSTOMER_ID: [(doc, after)]}  # an increment from v2 to v3: the statistics count it as at v1
    # Ahead by an event the statistics follow (its creation, with no checkpoint at all): recomputed, no step.
    lagging = lagging_views(batches, {}, VIEWS)
    plan = plan_views(batches, VIEWS, lagging, set())
    assert view_steps(plan, STATS_VIEW, [orders], {}, set(), lagging[STATS_VIEW]) == {}
