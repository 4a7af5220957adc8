"""The pure parts of `cqrs verify`: field diffs, the per-stream assessment (what is a finding, what may still be
in flight), the position bit set, the expected documents folded with the projector's code, the JSON report, and
how long it asks an unavailable JetStream again."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import nats.errors
import pytest
from nats.js.errors import NotFoundError, ServiceUnavailableError

from core.customer_events import CustomerRegistered, CustomerRenamed
from core.envelope import EventMetadata, RecordedEvent
from core.events import Event
from core.order_events import OrderCreated, OrderItemAdded, OrderItemQuantityChanged, OrderPlaced
from core.projections.customers import CUSTOMERS
from core.projections.orders import ORDERS
from core.values import Address
from cqrsctl.verify.compare import PositionSet, StreamState, as_stored, assess, diff_documents
from cqrsctl.verify.expected import (
    OrderStatsAccumulator,
    expected_customer,
    expected_for,
    fold_stream,
)
from cqrsctl.verify.model import ABSENT, ExpectedDoc, FieldDiff, Finding, FindingKind, VerifyResult
from cqrsctl.verify.report import render_json, render_text
from cqrsctl.verify.stream_scanner import JetStreamUnavailable, while_jetstream_elects

T0 = datetime(2026, 1, 2, 3, 4, 5, 678_901, tzinfo=UTC)
ADDRESS = Address("Ada", "1 Main St", "", "London", "N1", "GB")


def recorded(stream_type: str, stream_id: str, version: int, event: Event, position: int) -> RecordedEvent:
    return RecordedEvent(
        event_id=uuid.uuid4(), stream_type=stream_type, stream_id=stream_id, version=version,
        event_type=event.event_type, schema_version=event.schema_version, payload=event.to_payload(),
        metadata=EventMetadata("r", "c", "c"), position=position, recorded_at=T0 + timedelta(seconds=position),
    )  # fmt: skip


def order_events(order_id: str, customer_id: str, *, placed: bool, start: int = 1) -> list[RecordedEvent]:
    events: list[Event] = [
        OrderCreated(order_id, customer_id, "EUR", ADDRESS),
        OrderItemAdded("SKU-1", "Anvil", 2, 1250),
        OrderItemQuantityChanged("SKU-1", 3),
    ]
    if placed:
        events.append(OrderPlaced())
    return [recorded("order", order_id, v, e, start + v) for v, e in enumerate(events, start=1)]


# ---- field diffs --------------------------------------------------------------------------------------------


def test_equal_documents_have_no_diffs_whatever_the_key_order() -> None:
    assert diff_documents({"a": 1, "b": {"c": [1, 2]}}, {"b": {"c": [1, 2]}, "a": 1}) == []


def test_diffs_name_nested_fields_list_items_and_absent_fields() -> None:
    expected = {"a": 1, "lines": [{"q": 1}, {"q": 2}], "nested": {"x": "y"}, "gone": 1}
    actual = {"a": 2, "lines": [{"q": 1}, {"q": 5}, {"q": 9}], "nested": {"x": "y", "extra": True}}
    assert diff_documents(expected, actual) == [
        FieldDiff("a", 1, 2),
        FieldDiff("gone", 1, ABSENT),
        FieldDiff("lines.1.q", 2, 5),
        FieldDiff("lines.2", ABSENT, {"q": 9}),
        FieldDiff("nested.extra", ABSENT, True),
    ]


def test_equal_documents_with_datetimes_in_other_utc_objects_are_equal() -> None:
    from bson.tz_util import utc

    stored = as_stored({"at": T0, "n": 1})
    assert diff_documents(stored, {"n": 1, "at": T0.replace(microsecond=678_000, tzinfo=utc)}) == []
    assert diff_documents(stored, {"n": 1.0, "at": T0.replace(microsecond=678_000)}) == []
    assert diff_documents(stored, {"n": True, "at": T0.replace(microsecond=678_000)}) == [FieldDiff("n", 1, True)]


def test_a_bool_is_not_an_int_and_none_is_not_empty() -> None:
    assert diff_documents({"deleted": False, "p": None}, {"deleted": 0, "p": ""}) == [
        FieldDiff("deleted", False, 0),
        FieldDiff("p", None, ""),
    ]


def test_a_ranged_field_only_has_to_lie_within_its_bounds() -> None:
    ranges = {"order_stats_version": (8, 10)}
    assert diff_documents({"order_stats_version": 10}, {"order_stats_version": 8}, ranges) == []
    assert diff_documents({"order_stats_version": 10}, {"order_stats_version": 11}, ranges) == [
        FieldDiff("order_stats_version", "8..10", 11)
    ]
    assert diff_documents({"order_stats_version": 3}, {}, {"order_stats_version": (3, 3)}) == [
        FieldDiff("order_stats_version", 3, ABSENT)
    ]


def test_as_stored_cuts_datetimes_to_milliseconds_like_mongodb() -> None:
    stored = as_stored({"at": T0, "t": (1, 2)})
    assert stored == {"at": T0.replace(microsecond=678_000), "t": [1, 2]}
    assert diff_documents(stored, {"at": T0.replace(microsecond=678_000), "t": [1, 2]}) == []


# ---- assessing one stream -----------------------------------------------------------------------------------


def state(**overrides: Any) -> StreamState:
    values: dict[str, Any] = {
        "collection": "orders", "stream_id": "o1", "pg_version": 3,
        "expected": ExpectedDoc({"_id": "o1", "version": 3, "x": 1}, 3),
        "actual": {"_id": "o1", "version": 3, "x": 1}, "checkpoint": 3,
    }  # fmt: skip
    values.update(overrides)
    return StreamState(**values)


def kinds(findings: list[Finding]) -> list[FindingKind]:
    return [f.kind for f in findings]


def test_a_matching_document_at_its_checkpoint_is_clean() -> None:
    outcome = assess(state())
    assert (outcome.findings, outcome.pending) == ([], False)


def test_a_document_differing_at_the_same_version_is_persistent() -> None:
    outcome = assess(state(actual={"_id": "o1", "version": 3, "x": 2}))
    assert kinds(outcome.findings) == [FindingKind.DOCUMENT_DIFFERS] and not outcome.pending
    assert outcome.findings[0].diffs == (FieldDiff("x", 1, 2),)


def test_unchecked_bookkeeping_fields_are_not_compared_whatever_their_value_or_absence() -> None:
    expected = ExpectedDoc({"_id": "o1", "version": 3, "x": 1}, 3, unchecked=frozenset({"seq"}))
    for actual in ({"_id": "o1", "version": 3, "x": 1, "seq": 17}, {"_id": "o1", "version": 3, "x": 1}):
        assert assess(state(expected=expected, actual=actual)).findings == []
    checked = assess(state(actual={"_id": "o1", "version": 3, "x": 1, "seq": 17}))
    assert checked.findings[0].diffs == (FieldDiff("seq", ABSENT, 17),)
    differs = assess(state(expected=expected, actual={"_id": "o1", "version": 3, "x": 2, "seq": 17}))
    assert differs.findings[0].diffs == (FieldDiff("x", 1, 2),)


def test_a_document_behind_postgresql_is_pending() -> None:
    outcome = assess(state(actual={"_id": "o1", "version": 2, "x": 0}, checkpoint=2))
    assert kinds(outcome.findings) == [FindingKind.DOCUMENT_DIFFERS, FindingKind.CHECKPOINT_BEHIND]
    assert outcome.pending


def test_a_difference_waiting_for_a_dependency_is_pending() -> None:
    outcome = assess(state(actual={"_id": "o1", "version": 3, "x": 2}, dependencies_behind=True))
    assert kinds(outcome.findings) == [FindingKind.DOCUMENT_DIFFERS] and outcome.pending


def test_a_missing_document_is_pending_only_while_its_checkpoint_is_behind() -> None:
    assert assess(state(actual=None, checkpoint=None)).pending
    outcome = assess(state(actual=None))
    assert kinds(outcome.findings) == [FindingKind.DOCUMENT_MISSING] and not outcome.pending


def test_a_document_ahead_of_postgresql_is_persistent() -> None:
    outcome = assess(state(actual={"_id": "o1", "version": 4, "x": 1}, checkpoint=4))
    assert kinds(outcome.findings) == [FindingKind.DOCUMENT_DIFFERS, FindingKind.CHECKPOINT_AHEAD]
    assert not outcome.pending


def test_a_checkpoint_ahead_of_its_document() -> None:
    outcome = assess(state(expected=ExpectedDoc({"_id": "o1", "version": 3}, 3), actual={"_id": "o1", "version": 2},
                           checkpoint=3))  # fmt: skip
    assert kinds(outcome.findings) == [FindingKind.DOCUMENT_DIFFERS, FindingKind.CHECKPOINT_AHEAD]


def test_documents_and_checkpoints_without_events() -> None:
    outcome = assess(state(pg_version=0, expected=None, checkpoint=None))
    assert kinds(outcome.findings) == [FindingKind.ORPHAN_DOCUMENT] and not outcome.pending
    assert outcome.findings[0].stored_version == 3
    outcome = assess(state(pg_version=0, expected=None, actual=None, checkpoint=1))
    assert kinds(outcome.findings) == [FindingKind.CHECKPOINT_AHEAD]


def test_an_event_the_projections_cannot_apply_is_reported() -> None:
    outcome = assess(state(fold_error="OrderPlaced v3 cannot apply: no lines"))
    assert kinds(outcome.findings) == [FindingKind.UNPROJECTABLE_EVENT]


# ---- positions seen in the stream ---------------------------------------------------------------------------


def test_position_set_marks_and_detects_duplicates() -> None:
    seen = PositionSet()
    assert seen.add(1) and seen.add(100_000) and seen.add(9)
    assert not seen.add(9)
    assert 1 in seen and 9 in seen and 100_000 in seen
    assert 2 not in seen and 100_001 not in seen and 10**9 not in seen and -1 not in seen
    with pytest.raises(ValueError):
        seen.add(-1)
    assert list(seen) == [1, 9, 100_000]


# ---- expected documents, folded with the projector's code -------------------------------------------------


def test_fold_uses_the_projections_and_the_customer_fields() -> None:
    customer = fold_stream(
        CUSTOMERS,
        [
            recorded("customer", "c1", 1, CustomerRegistered("c1", "Ada", "ada@example.org"), 1),
            recorded("customer", "c1", 2, CustomerRenamed("Ada L."), 2),
        ],
    )
    order = fold_stream(ORDERS, order_events("o1", "c1", placed=True, start=2))
    assert (order.pg_version, order.error, order.stats_events) == (4, None, 2)  # created, placed
    expected = expected_for(order, {"c1": customer}, OrderStatsAccumulator())
    assert expected is not None and expected.version == 4
    doc = expected.doc
    assert (doc["status"], doc["total_minor"], doc["lines"][0]["quantity"]) == ("PLACED", 3750, 3)
    assert (doc["customer_name"], doc["customer_email"], doc["customer_version"]) == ("Ada L.", "ada@example.org", 2)
    assert doc["updated_at"] == as_stored({"t": T0 + timedelta(seconds=6)})["t"]


def test_fold_stops_at_an_event_that_cannot_apply() -> None:
    events = order_events("o1", "c1", placed=False)
    events[1] = recorded("order", "o1", 2, OrderPlaced(), 3)  # placing... then quantity of a missing line
    folded = fold_stream(ORDERS, events)
    assert folded.error is not None and "v3" in folded.error
    assert folded.pg_version == 3 and folded.doc is not None and folded.doc["version"] == 2


def test_customer_statistics_come_from_the_orders_with_the_stamp_as_a_range() -> None:
    stats = OrderStatsAccumulator()
    stats.add(fold_stream(ORDERS, order_events("o1", "c1", placed=True)))  # 2 statistics events (v1, v4) of 4
    stats.add(fold_stream(ORDERS, order_events("o2", "c1", placed=False)))  # 1 statistics event (v1) of 3
    customer = fold_stream(CUSTOMERS, [recorded("customer", "c1", 1, CustomerRegistered("c1", "A", "a@x"), 1)])
    expected = expected_customer("c1", customer, stats)
    assert expected is not None and expected.version == 1
    assert expected.doc["order_stats"] == {
        "draft_orders": 1, "placed_orders": 1, "cancelled_orders": 0,
        "placed_totals": [{"currency": "EUR", "total_minor": 3750}],
    }  # fmt: skip
    assert expected.ranges == {"order_stats_version": (3, 7)}
    # They count writes and runs of increments: batching decides them, not the events.
    assert expected.unchecked == {"order_stats_seq", "order_stats_increments"}
    assert expected.doc["order_stats_version"] == 7
    registered_only = fold_stream(CUSTOMERS, [recorded("customer", "c2", 1, CustomerRegistered("c2", "B", "b@x"), 2)])
    no_orders = expected_customer("c2", registered_only, stats)
    assert no_orders is not None and no_orders.ranges == {"order_stats_version": (0, 0)}


def test_a_customer_known_only_from_orders_gets_a_statistics_only_document() -> None:
    stats = OrderStatsAccumulator()
    stats.add(fold_stream(ORDERS, order_events("o1", "c9", placed=False)))
    expected = expected_customer("c9", None, stats)
    assert expected is not None and expected.version is None
    assert set(expected.doc) == {"_id", "order_stats", "order_stats_version"}
    assert expected_customer("c8", None, stats) is None


# ---- report -------------------------------------------------------------------------------------------------


def test_json_report_names_every_finding_with_its_field_diffs() -> None:
    result = VerifyResult(
        findings=[
            Finding(FindingKind.DOCUMENT_DIFFERS, "o1", "orders", "differs",
                    (FieldDiff("placed_at", T0, ABSENT), FieldDiff("x", 1, 2))),
            Finding(FindingKind.MISSING_FROM_STREAM, "o2", None, "gone"),
        ],
        events_checked=10,
        elapsed_seconds=2.0,
    )  # fmt: skip
    report = json.loads(render_json(result))
    assert report["clean"] is False and report["events_per_second"] == 5.0
    assert report["counts"] == {"document_differs": 1, "missing_from_stream": 1}
    assert report["findings"][0]["diffs"] == [
        {"path": "placed_at", "expected": T0.isoformat(), "actual": "<absent>"},
        {"path": "x", "expected": 1, "actual": 2},
    ]
    text = render_text(result)
    assert "document_differs orders o1" in text and "NOT CLEAN: 2 findings" in text
    assert "clean: " in render_text(VerifyResult())


async def test_verify_asks_jetstream_again_while_it_answers_503_and_gives_up_after_its_budget() -> None:
    """nats-py raises `ServiceUnavailableError` for a 503 and for no responders (a node whose JetStream is not back
    yet): verify asks again; past its budget it says JetStream was unavailable, and any other error is raised as it
    is (a missing stream is an answer)."""
    answers: list[BaseException | str] = [ServiceUnavailableError(), ServiceUnavailableError(), "info"]

    async def call() -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    assert await while_jetstream_elects(call, "read stream S", budget_seconds=5.0) == "info" and not answers

    async def unavailable() -> str:
        raise ServiceUnavailableError()

    started = time.monotonic()
    with pytest.raises(JetStreamUnavailable, match=r"unavailable for 0.5s \(\d+ tries\) to read stream S"):
        await while_jetstream_elects(unavailable, "read stream S", budget_seconds=0.5)
    assert time.monotonic() - started < 0.6

    async def missing() -> str:
        raise NotFoundError()

    with pytest.raises(NotFoundError):
        await while_jetstream_elects(missing, "read stream S", budget_seconds=5.0)

    timeouts: list[BaseException | str] = [nats.errors.TimeoutError(), "info"]

    async def slow() -> str:
        answer = timeouts.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    assert await while_jetstream_elects(slow, "read stream S", budget_seconds=5.0) == "info"
    timeouts[:] = [nats.errors.TimeoutError(), "messages"]
    with pytest.raises(nats.errors.TimeoutError):  # a pull's timeout means nothing more to read: not asked again
        await while_jetstream_elects(slow, "read stream S", budget_seconds=5.0, retry_timeouts=False)
