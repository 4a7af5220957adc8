"""A day's sales report between the fold of its certain facts and that plus the facts in flight (pure, no I/O)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from core.projections.sales import SalesKey, rows_from_orders, sales_documents
from cqrsctl.verify import report_bounds
from cqrsctl.verify.compare import diff_documents
from cqrsctl.verify.report_bounds import ReportBounds

KEY = SalesKey("2026-12-05", "EUR")
NOON = dt.datetime(2026, 12, 5, 12, tzinfo=dt.UTC)


def order(number: int, total: int, *, sku: str = "SKU-1", cancelled: bool = False) -> dict[str, Any]:
    """An order placed at v3 (created, one line, placed), cancelled at v4 if asked."""
    history = [{"event_type": t, "version": v} for v, t in enumerate(("OrderCreated", "ItemAdded", "OrderPlaced"), 1)]
    doc: dict[str, Any] = {
        "_id": f"order-{number}", "currency": "EUR", "version": 3, "total_minor": total,
        "placed_at": NOON + dt.timedelta(minutes=number),
        "lines": [{"sku": sku, "quantity": number, "line_total_minor": total}], "history": history,
    }  # fmt: skip
    if cancelled:
        doc.update(version=4, cancelled_at=NOON + dt.timedelta(hours=1, minutes=number))
        history.append({"event_type": "OrderCancelled", "version": 4})
    return doc


def report_of(*orders: dict[str, Any]) -> dict[str, Any]:
    """The report the projector writes once it counted exactly these orders' facts."""
    return sales_documents(rows_from_orders(orders, [KEY]))[KEY.id]


def differences(orders: list[tuple[dict[str, Any], int]], report: dict[str, Any]) -> list[str]:
    """The paths of `report` outside what these orders (each with its checkpoint as read before it) allow."""
    bounds = ReportBounds(KEY)
    for doc, checkpoint in orders:
        bounds.add(doc, checkpoint)
    expected, ranges = bounds.expected(report)
    return [d.path for d in diff_documents(expected, report, ranges)]


A, B, C = order(1, 500), order(2, 100), order(3, 300)


def test_a_report_of_every_fact_its_checkpoints_cover_is_held() -> None:
    assert differences([(A, 3), (B, 3)], report_of(A, B)) == []


def test_facts_in_flight_may_be_counted_or_not_whatever_their_order() -> None:
    """Replicas at different points: the older order B's batch is in flight while the newer C was counted."""
    orders = [(A, 3), (B, 0), (C, 2)]
    for counted in [(A,), (A, B), (A, C), (A, B, C)]:
        assert differences(orders, report_of(*counted)) == [], counted


def test_a_report_that_lost_a_fact_its_checkpoint_covers_is_not_held() -> None:
    """The newest fact, which a check taking the latest facts for the ones in flight would have excused."""
    found = differences([(A, 3), (B, 3), (C, 3)], report_of(A, B))
    sku = {"skus.0.placed_quantity", "skus.0.placed_revenue_minor"}
    assert set(found) == {"placed_orders", "placed_revenue_minor", *sku}


def test_a_lost_fact_is_not_excused_by_a_larger_one_in_flight_counted_in_its_place_for_more_than_it_adds() -> None:
    # A certain, B and C in flight; a report claiming A and one of them can add at most C's 300.
    too_much = {**report_of(A, C), "placed_revenue_minor": 900, "net_revenue_minor": 900}
    too_much["average_order_value_minor"] = 450
    assert differences([(A, 3), (B, 0), (C, 0)], too_much) == ["placed_revenue_minor"]
    # Two of them counted: at least 100 + 300.
    too_little = {**report_of(A, B, C), "placed_revenue_minor": 850, "net_revenue_minor": 850}
    too_little["average_order_value_minor"] = 283
    assert differences([(A, 3), (B, 0), (C, 0)], too_little) == ["placed_revenue_minor"]


def test_a_report_counting_more_than_its_day_has_is_not_held() -> None:
    assert "placed_orders" in differences([(A, 3), (B, 0)], report_of(A, B, C))


def test_its_derived_figures_follow_from_its_own_sums() -> None:
    wrong_net = {**report_of(A, B), "net_revenue_minor": 1}
    assert differences([(A, 3), (B, 0)], wrong_net) == ["net_revenue_minor"]
    wrong_version = {**report_of(A, B), "report_version": 3}
    assert differences([(A, 3), (B, 0)], wrong_version) == ["report_version"]


def test_its_skus_are_those_of_the_certain_facts_and_only_skus_some_fact_has() -> None:
    other = order(4, 70, sku="SKU-2")
    missing_sku = report_of(A)  # `other` counted (its checkpoint covers it) but its SKU absent
    missing_sku.update(placed_orders=2, placed_revenue_minor=570, net_revenue_minor=570, report_version=2,
                       average_order_value_minor=285)  # fmt: skip
    assert differences([(A, 3), (other, 3)], missing_sku) == ["skus.1"]
    invented = report_of(A, order(5, 0, sku="SKU-9"))
    invented.update(placed_orders=1, report_version=1, average_order_value_minor=500)
    assert differences([(A, 3)], invented) == ["skus.1"]


def test_the_facts_of_an_order_ahead_of_its_checkpoint_may_each_be_counted_or_not() -> None:
    cancelled = order(6, 40, cancelled=True)
    day_of_both = {**cancelled, "cancelled_at": NOON + dt.timedelta(hours=2)}
    placed_only = report_of({**day_of_both, "cancelled_at": None})
    for report in (placed_only, report_of(day_of_both)):  # its cancellation in flight (v4, checkpoint 3)
        assert differences([(day_of_both, 3)], report) == [], report
    assert "placed_orders" in differences([(day_of_both, 3)], {**placed_only, "placed_orders": 2})
    assert differences([(day_of_both, 4)], placed_only) != []  # covered: the cancellation must be counted


def test_past_the_kept_facts_the_bounds_are_the_sums_still_sound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_bounds, "UNCERTAIN_FACTS_KEPT", 1)
    too_much = {**report_of(A, C), "placed_revenue_minor": 900, "net_revenue_minor": 900}
    too_much["average_order_value_minor"] = 450
    assert differences([(A, 3), (B, 0), (C, 0)], too_much) == []  # looser: up to every fact in flight
    assert "placed_revenue_minor" in differences([(A, 3), (B, 0), (C, 0)], {**too_much, "placed_revenue_minor": 901})
    assert "placed_revenue_minor" in differences([(A, 3), (B, 0), (C, 0)], {**report_of(B, C)})
