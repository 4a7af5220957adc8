"""The sales report's pure parts: which facts an order contributes and on which day, the rows and their fold, the
trigger set, the planner's keys, the GetSalesReport request checks and response, and verify's expected report.

`order_events` builds an order's events with chosen recorded times; the integration tests use it too.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import typing
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cqrs.orders.v1 import consistency_pb2
from cqrs.orders.v1 import query_service_pb2 as pb

from core import events as core_events
from core.envelope import EventMetadata, RecordedEvent
from core.errors import InvalidArgument
from core.events import Event, decode_event
from core.order_events import (
    OrderCancelled,
    OrderCreated,
    OrderDeleted,
    OrderItemAdded,
    OrderPlaced,
)
from core.projections import Document
from core.projections.orders import ORDERS
from core.projections.sales import (
    CANCELLED,
    COUNTED_FIELD,
    PLACED,
    REPORT_VERSION_FIELD,
    SHARDS,
    SalesKey,
    SalesRowGroups,
    average_minor,
    fact_updates,
    fact_versions,
    facts_of,
    keys_of_order,
    order_of_tag,
    order_rows,
    parse_key,
    rows_from_orders,
    sales_documents,
    shard_of,
    shard_rows,
)
from core.values import Address
from cqrs_client.client import _iso_date
from cqrsctl.verify.expected import SalesAccumulator, fold_stream
from cqrsctl.verify.model import ExpectedDoc
from cqrsctl.verify.repair import replace_guard
from projector.planning import Delivery, FoldResult, ProjectionBatch
from projector.registry import PROJECTIONS, SALES_REPORT, VIEWS, registry_problems
from projector.view_planning import plan_views
from query_service.api.sales import MAX_TOP_N, parse_sales_report_request, response_of
from query_service.sales_report import SalesQuery, SalesReport, days_filter, top_skus_pipeline
from tests.unit.test_projection_registry import DRAFT_ONLY_EVENTS

ADDRESS = Address("Ada Lovelace", "1 Analytical St", "", "London", "N1 1AA", "GB")
D1 = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)
D2 = datetime(2026, 3, 2, 23, 59, 59, 999000, tzinfo=UTC)  # the last millisecond of the day
D3 = datetime(2026, 3, 3, 0, 0, tzinfo=UTC)  # the first instant of the next
_positions = itertools.count(1)

Line = tuple[str, int, int]  # sku, quantity, unit price (minor units)


def order_events(
    currency: str,
    lines: Sequence[Line],
    *,
    placed_at: datetime | None = None,
    cancelled_at: datetime | None = None,
    deleted_at: datetime | None = None,
    order_id: str | None = None,
    customer_id: str = "cust-sales",
) -> list[RecordedEvent]:
    """One order's events, recorded at the given times (created and lines an hour before the first of them)."""
    order_id = order_id or str(uuid.uuid4())
    first = min(t for t in (placed_at, cancelled_at, deleted_at, D1) if t is not None) - timedelta(hours=1)
    steps: list[tuple[Event, datetime]] = [(OrderCreated(order_id, customer_id, currency, ADDRESS), first)]
    steps += [(OrderItemAdded(sku, f"name of {sku}", qty, price), first) for sku, qty, price in lines]
    if placed_at is not None:
        steps.append((OrderPlaced(), placed_at))
    if cancelled_at is not None:
        steps.append((OrderCancelled("changed my mind"), cancelled_at))
    if deleted_at is not None:
        steps.append((OrderDeleted(), deleted_at))
    return [
        RecordedEvent(
            event_id=uuid.uuid4(), stream_type="order", stream_id=order_id, version=version,
            event_type=event.event_type, schema_version=event.schema_version, payload=event.to_payload(),
            metadata=EventMetadata("req", "corr", "cause"), position=next(_positions), recorded_at=at,
        )
        for version, (event, at) in enumerate(steps, start=1)
    ]  # fmt: skip


def order_doc(events: Sequence[RecordedEvent]) -> Document:
    """The order document the projector leaves after these events (the projection's own fold)."""
    doc = fold_stream(ORDERS, events).doc
    assert doc is not None
    return doc


def sample_orders() -> list[Document]:
    """EUR: A placed on D1 and cancelled on D2; B placed on D1; C placed on D2 and deleted; a cancelled draft.
    USD: D placed on D2 (its last millisecond) and cancelled on D3 (its first instant)."""
    return [
        order_doc(order_events("EUR", [("ANVIL", 2, 1250), ("ROPE", 1, 300)], placed_at=D1, cancelled_at=D2)),
        order_doc(order_events("EUR", [("ANVIL", 1, 1250)], placed_at=D1)),
        order_doc(order_events("EUR", [("ROPE", 4, 300)], placed_at=D2, deleted_at=D3)),
        order_doc(order_events("EUR", [("KITE", 9, 999)], cancelled_at=D2)),
        order_doc(order_events("USD", [("BELL", 3, 99)], placed_at=D2, cancelled_at=D3)),
    ]


# ---- what counts, and when --------------------------------------------------------------------------------------


def test_a_placement_counts_on_its_day_and_a_cancellation_on_its_own() -> None:
    placed_and_cancelled, placed, deleted, draft, usd = sample_orders()
    assert facts_of(placed_and_cancelled) == [(PLACED, "2026-03-01"), (CANCELLED, "2026-03-02")]
    assert keys_of_order(placed_and_cancelled) == ("2026-03-01/EUR", "2026-03-02/EUR")
    assert keys_of_order(placed) == ("2026-03-01/EUR",)
    assert keys_of_order(deleted) == ("2026-03-02/EUR",)  # deleting does not undo the sale
    assert facts_of(draft) == [] and keys_of_order(draft) == ()  # a cancelled draft sold nothing
    assert facts_of(usd) == [(PLACED, "2026-03-02"), (CANCELLED, "2026-03-03")]  # by the UTC day, to the ms


def test_the_day_is_the_utc_date_whatever_the_time_zone_of_the_instant() -> None:
    doc = order_doc(order_events("EUR", [("X", 1, 1)], placed_at=D1))
    doc["placed_at"] = datetime(2026, 3, 2, 1, 0, tzinfo=timezone(timedelta(hours=3)))  # 2026-03-01 22:00 UTC
    assert keys_of_order(doc) == ("2026-03-01/EUR",)


def test_report_documents_of_the_sample() -> None:
    reports = sales_documents(rows_from_orders(sample_orders()))
    assert sorted(reports) == ["2026-03-01/EUR", "2026-03-02/EUR", "2026-03-02/USD", "2026-03-03/USD"]
    d1, d2 = reports["2026-03-01/EUR"], reports["2026-03-02/EUR"]
    assert d1 == {
        "_id": "2026-03-01/EUR", "day": "2026-03-01", "currency": "EUR",
        "placed_orders": 2, "cancelled_orders": 0,
        "placed_revenue_minor": 2 * 1250 + 300 + 1250, "cancelled_revenue_minor": 0, "net_revenue_minor": 4050,
        "average_order_value_minor": 2025,
        "skus": [
            {"sku": "ANVIL", "placed_quantity": 3, "cancelled_quantity": 0, "net_quantity": 3,
             "placed_revenue_minor": 3750, "cancelled_revenue_minor": 0, "net_revenue_minor": 3750},
            {"sku": "ROPE", "placed_quantity": 1, "cancelled_quantity": 0, "net_quantity": 1,
             "placed_revenue_minor": 300, "cancelled_revenue_minor": 0, "net_revenue_minor": 300},
        ],
        REPORT_VERSION_FIELD: 2,
    }  # fmt: skip
    # D2: C placed (1,200; deleted since, still counted), A cancelled (its 2,800 and its quantities come off).
    assert (d2["placed_orders"], d2["cancelled_orders"]) == (1, 1)
    assert (d2["placed_revenue_minor"], d2["cancelled_revenue_minor"], d2["net_revenue_minor"]) == (1200, 2800, -1600)
    assert d2["average_order_value_minor"] == 1200
    assert [(s["sku"], s["net_quantity"], s["net_revenue_minor"]) for s in d2["skus"]] == [
        ("ANVIL", -2, -2500),
        ("ROPE", 3, 900),
    ]
    assert d2[REPORT_VERSION_FIELD] == 2
    assert (reports["2026-03-02/USD"]["net_revenue_minor"], reports["2026-03-03/USD"]["net_revenue_minor"]) == (
        297,
        -297,
    )


def test_a_cancellation_is_symmetric_with_its_placement() -> None:
    """Over a range holding both days, a cancelled order adds up to nothing, in money and in quantities."""
    (placed_and_cancelled,) = [
        order_doc(order_events("EUR", [("A", 2, 50), ("B", 1, 7)], placed_at=D1, cancelled_at=D3))
    ]
    reports = sales_documents(order_rows(placed_and_cancelled)).values()
    assert sum(r["net_revenue_minor"] for r in reports) == 0
    net: dict[str, list[int]] = {}
    for report in reports:
        for sku in report["skus"]:
            sums = net.setdefault(sku["sku"], [0, 0])
            sums[0] += sku["net_quantity"]
            sums[1] += sku["net_revenue_minor"]
    assert net == {"A": [0, 0], "B": [0, 0]}


def test_the_fold_does_not_depend_on_the_order_or_grouping_of_rows() -> None:
    orders = sample_orders()
    ungrouped = [row for order in orders for row in order_rows(order)]
    grouped = rows_from_orders(orders)
    expected = sales_documents(grouped)
    for seed in range(5):
        shuffled = list(ungrouped)
        random.Random(seed).shuffle(shuffled)
        assert sales_documents(shuffled) == expected
    assert len(grouped) < len(ungrouped)  # the `$group` shape really sums


def test_rows_restricted_to_keys_are_those_keys_rows() -> None:
    keys = [SalesKey("2026-03-02", "EUR")]
    rows = rows_from_orders(sample_orders(), keys)
    assert {(r["_id"]["day"], r["_id"]["currency"]) for r in rows} == {("2026-03-02", "EUR")}
    assert sales_documents(rows) == {
        k: v for k, v in sales_documents(rows_from_orders(sample_orders())).items() if k == keys[0].id
    }


def test_an_unknown_kind_of_row_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown kind"):
        sales_documents([{"_id": {"day": "2026-03-01", "currency": "EUR", "kind": "returned", "sku": None},
                          "orders": 1, "quantity": 0, "revenue_minor": 5}])  # fmt: skip


@pytest.mark.parametrize(
    ("total", "count", "average"), [(0, 0, 0), (10, 0, 0), (10, 4, 3), (10, 3, 3), (5, 2, 3), (7, 2, 4), (9, 1, 9)]
)
def test_average_order_value_rounds_half_up_in_integers(total: int, count: int, average: int) -> None:
    assert average_minor(total, count) == average


def test_keys_parse_back_and_window_their_day() -> None:
    key = SalesKey("2026-03-02", "EUR")
    assert parse_key(key.id) == key
    assert key.window() == (datetime(2026, 3, 2, tzinfo=UTC), datetime(2026, 3, 3, tzinfo=UTC))
    for bad in ("", "2026-03-02", "2026-03-02/", "2026-13-02/EUR", "20260302/EUR", "ghost"):
        assert parse_key(bad) is None, bad


# ---- the view in the registry: triggers, keys, planning ---------------------------------------------------------


ORDER_ID = "5a1e5a1e-0000-4000-8000-000000000001"


def report_contribution(doc: Document | None) -> list[str]:
    """What the report reads of an order: its rows (currency, days, kinds, lines, totals), comparable."""
    return sorted(repr(sorted(row.items())) for row in order_rows(doc)) if doc is not None else []


def every_order_document() -> Iterator[Document | None]:
    """The order in every state an event can meet it in: none yet, draft, placed, cancelled after placing."""
    yield None
    events = order_events("EUR", [("SKU-A", 1, 100)], placed_at=D1, cancelled_at=D2, order_id=ORDER_ID)
    for count in (2, 3, 4):
        yield fold_stream(ORDERS, events[:count]).doc


def sample_event(cls: type[Event]) -> Event:
    """An instance of an order event type, fields filled by type (and a few by name, so that it can apply)."""
    hints = typing.get_type_hints(cls)
    by_name: dict[str, Any] = {"order_id": ORDER_ID, "currency": "EUR", "sku": "SKU-A"}
    return cls(**{
        f.name: by_name.get(f.name, {str: "x", int: 2, Address: ADDRESS}.get(hints[f.name]))
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    })  # fmt: skip


def report_trigger_problems(triggers: frozenset[str]) -> list[str]:
    """Every order event that changes what the report reads of an order it applies to must be in `triggers`."""
    problems: set[str] = set()
    for event_type in ORDERS.handlers:
        event = sample_event(core_events._REGISTRY[event_type])
        for doc in every_order_document():
            if event_type in DRAFT_ONLY_EVENTS and doc is not None and doc["status"] != "DRAFT":
                continue  # the domain emits it only for drafts (see the statistics' guard)
            version = int(doc["version"]) + 1 if doc else 1
            rec = RecordedEvent(
                event_id=uuid.uuid4(), stream_type="order", stream_id=ORDER_ID, version=version,
                event_type=event_type, schema_version=event.schema_version, payload=event.to_payload(),
                metadata=EventMetadata("req", "corr", "cause"), position=100 + version, recorded_at=D3,
            )  # fmt: skip
            try:
                new = ORDERS.project(doc, rec, event)
            except ValueError:
                continue  # cannot happen to an order in that state
            if report_contribution(new) != report_contribution(doc) and event_type not in triggers:
                problems.add(f"{event_type} changes the sales report but does not trigger it")
    return sorted(problems)


def test_every_order_event_that_changes_the_report_triggers_it() -> None:
    triggers = SALES_REPORT.triggers[ORDERS.stream_type]
    assert report_trigger_problems(triggers) == []
    # The check is not vacuous: without the cancellation it names it.
    assert report_trigger_problems(triggers - {OrderCancelled.event_type}) == [
        "OrderCancelled changes the sales report but does not trigger it"
    ]


def test_the_report_is_registered_and_the_registry_stays_consistent() -> None:
    assert SALES_REPORT in VIEWS and SALES_REPORT.version == 1
    assert registry_problems() == []
    # A report must own its collection: one that names a projection's collection is flagged.
    clash = dataclasses.replace(SALES_REPORT, collection=ORDERS.collection)
    assert registry_problems(PROJECTIONS, (clash,)) == [
        f"view {SALES_REPORT.name} owns 'orders', which projection orders writes"
    ]


def _delivery(rec: RecordedEvent) -> Delivery:
    return Delivery(None, rec, decode_event(rec.event_type, rec.schema_version, rec.payload))


def test_the_planner_counts_the_facts_of_every_order_that_placed_or_cancelled() -> None:
    events = order_events("EUR", [("A", 1, 5)], placed_at=D1, cancelled_at=D2)
    order_id = events[0].stream_id
    doc = order_doc(events)
    batch = ProjectionBatch(ORDERS, docs={order_id: doc})
    name = SALES_REPORT.name

    batch.result = FoldResult(applied={order_id: [_delivery(events[-1])]})  # the cancellation
    plan = plan_views({"order": batch}, VIEWS, {}, set())
    assert plan.keys[name] == {order_id}  # its writer counts the order's facts and rolls up both days
    assert {(v, k) for v, k in plan.depends[order_id] if v == name} == {(name, order_id)}
    assert keys_of_order(doc) == ("2026-03-01/EUR", "2026-03-02/EUR")

    batch.result = FoldResult(applied={order_id: [_delivery(events[1])]})  # a line: no report event
    assert plan_views({"order": batch}, VIEWS, {}, set()).keys[name] == set()
    # Ahead of its checkpoint by a report event (an earlier batch stopped before its views): counted, whatever the
    # batch brings.
    assert plan_views({"order": batch}, VIEWS, {name: {order_id}}, set()).keys[name] == {order_id}


def test_each_fact_is_one_guarded_update_of_one_shard_and_the_shards_fold_into_the_report() -> None:
    events = order_events("EUR", [("A.1", 2, 5), ("$B", 1, 7)], placed_at=D1, cancelled_at=D2)
    order_id = events[0].stream_id
    doc = order_doc(events)
    updates = fact_updates(order_id, doc)
    assert [(shard, tag) for shard, tag, _ in updates] == [
        (f"2026-03-01/EUR/{shard_of(order_id):02d}", f"{order_id}:placed"),
        (f"2026-03-02/EUR/{shard_of(order_id):02d}", f"{order_id}:cancelled"),
    ]
    placed = updates[0][2]
    assert placed["$push"] == {COUNTED_FIELD: f"{order_id}:placed"}
    assert all("." not in path.split(".", 1)[1].rsplit(".", 1)[0] for path in placed["$inc"] if "skus." in path)
    # Applying the updates to empty shards (as MongoDB would) and folding them gives verify's report.
    shards: dict[str, dict[str, Any]] = {}
    for shard, _, update in updates:
        target = shards.setdefault(shard, {})
        for path, value in {**update["$set"], **update["$inc"]}.items():
            *parents, leaf = path.split(".")
            node = target
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = node.get(leaf, 0) + value if path in update["$inc"] else value
    folded = sales_documents([row for shard in shards.values() for row in shard_rows(shard)])
    assert folded == sales_documents(rows_from_orders([doc]))
    assert 0 <= shard_of(order_id) < SHARDS and shard_of(order_id) == shard_of(str(order_id))


def test_a_batch_counts_only_the_facts_of_events_above_the_checkpoint_it_read() -> None:
    """Facts at or below an order's checkpoint were counted before it got there: counting them again would need
    their tags forever (`projector.sales_tags` forgets them)."""
    events = order_events("EUR", [("ANVIL", 1, 500)], placed_at=D1, cancelled_at=D2)
    order_id, doc = events[0].stream_id, order_doc(events)
    placed_v, cancelled_v = (e.version for e in events if e.event_type in ("OrderPlaced", "OrderCancelled"))
    assert fact_versions(doc) == {PLACED: placed_v, CANCELLED: cancelled_v}

    def tags(above: int) -> list[str]:
        return [tag.rpartition(":")[2] for _, tag, _ in fact_updates(order_id, doc, above)]

    assert tags(0) == tags(placed_v - 1) == [PLACED, CANCELLED]
    assert tags(placed_v) == tags(cancelled_v - 1) == [CANCELLED]
    assert tags(cancelled_v) == tags(cancelled_v + 5) == []
    # A document without its change log cannot date its facts: they are all counted, each guarded by its tag.
    assert [t for _, t, _ in fact_updates(order_id, {**doc, "history": []}, cancelled_v)] == [
        f"{order_id}:{PLACED}",
        f"{order_id}:{CANCELLED}",
    ]
    assert order_of_tag(f"{order_id}:{PLACED}") == order_id


# ---- GetSalesReport: request checks and response ---------------------------------------------------------------


def _violations(request: pb.GetSalesReportRequest) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as raised:
        parse_sales_report_request(request)
    return {v.field: v.description for v in raised.value.violations}


def test_a_valid_request_is_parsed_with_defaults() -> None:
    query = parse_sales_report_request(pb.GetSalesReportRequest(from_date="2024-01-01", to_date="2024-12-31"))
    assert query == SalesQuery("2024-01-01", "2024-12-31", "", 10)  # 366 days (a leap year): allowed
    assert parse_sales_report_request(pb.GetSalesReportRequest(from_date="2025-01-01", to_date="2026-01-01"))
    query = parse_sales_report_request(
        pb.GetSalesReportRequest(from_date="2026-03-01", to_date="2026-03-01", currency="USD", top_n=MAX_TOP_N)
    )
    assert query == SalesQuery("2026-03-01", "2026-03-01", "USD", 100)


@pytest.mark.parametrize(
    ("fields", "field", "description"),
    [
        ({"to_date": "2026-03-01"}, "from_date", "is required: a UTC date as YYYY-MM-DD, e.g. 2026-01-31"),
        ({"from_date": "2026-03-01"}, "to_date", "is required: a UTC date as YYYY-MM-DD, e.g. 2026-01-31"),
        ({"from_date": "20260301", "to_date": "2026-03-01"}, "from_date",
         "must be a calendar date as YYYY-MM-DD, e.g. 2026-01-31"),
        ({"from_date": "2026-02-30", "to_date": "2026-03-01"}, "from_date",
         "must be a calendar date as YYYY-MM-DD, e.g. 2026-01-31"),
        ({"from_date": "2026-03-01", "to_date": "2026-03-01T00:00"}, "to_date",
         "must be a calendar date as YYYY-MM-DD, e.g. 2026-01-31"),
        ({"from_date": "2026-03-02", "to_date": "2026-03-01"}, "to_date", "must not be before from_date (2026-03-02)"),
        ({"from_date": "2025-01-01", "to_date": "2026-01-02"}, "to_date",
         "the range covers 367 days; at most 366 are allowed"),
        ({"from_date": "2026-03-01", "to_date": "2026-03-01", "currency": "eur"}, "currency",
         "must be an ISO 4217 code of three upper-case letters, e.g. EUR (or empty)"),
        ({"from_date": "2026-03-01", "to_date": "2026-03-01", "top_n": -1}, "top_n",
         "must be between 0 and 100 (0: the default, 10)"),
        ({"from_date": "2026-03-01", "to_date": "2026-03-01", "top_n": 101}, "top_n",
         "must be between 0 and 100 (0: the default, 10)"),
    ],
)  # fmt: skip
def test_bad_input_names_the_field(fields: dict[str, Any], field: str, description: str) -> None:
    assert _violations(pb.GetSalesReportRequest(**fields)) == {field: description}


def test_every_bad_field_is_reported_at_once() -> None:
    request = pb.GetSalesReportRequest(from_date="yesterday", to_date="", currency="EURO", top_n=1000)
    assert set(_violations(request)) == {"from_date", "to_date", "currency", "top_n"}


def test_the_response_has_day_rows_and_per_currency_totals_and_top_lists() -> None:
    reports = sales_documents(rows_from_orders(sample_orders()))
    days = [{k: v for k, v in doc.items() if k != "skus"} for _, doc in sorted(reports.items())]
    top = [{"sku": "ROPE", "net_quantity": 4, "net_revenue_minor": 1200, "placed_quantity": 5, "cancelled_quantity": 1}]
    consistency = consistency_pb2.ReadConsistency(stale=False)
    response = response_of(
        SalesReport(days=days, top_by_quantity={"EUR": top}, top_by_revenue={"EUR": top}), consistency
    )
    assert [(d.date, d.currency, d.net_revenue_minor) for d in response.days] == [
        ("2026-03-01", "EUR", 4050), ("2026-03-02", "EUR", -1600),
        ("2026-03-02", "USD", 297), ("2026-03-03", "USD", -297),
    ]  # fmt: skip
    eur, usd = response.currencies
    assert (eur.currency, eur.placed_orders, eur.cancelled_orders) == ("EUR", 3, 1)
    assert (eur.placed_revenue_minor, eur.cancelled_revenue_minor, eur.net_revenue_minor) == (5250, 2800, 2450)
    assert eur.average_order_value_minor == 1750
    assert [s.sku for s in eur.top_by_quantity] == ["ROPE"] and eur.top_by_quantity[0].cancelled_quantity == 1
    assert (usd.currency, usd.net_revenue_minor, list(usd.top_by_revenue)) == ("USD", 0, [])


def test_the_reader_filters_by_range_and_currency_and_ranks_with_stable_ties() -> None:
    query = SalesQuery("2026-03-01", "2026-03-31", "EUR", 5)
    assert days_filter(query) == {"day": {"$gte": "2026-03-01", "$lte": "2026-03-31"}, "currency": "EUR"}
    assert "currency" not in days_filter(dataclasses.replace(query, currency=""))
    top = top_skus_pipeline(query)[-1]["$group"]
    assert top["by_quantity"]["$topN"]["n"] == 5
    assert list(top["by_quantity"]["$topN"]["sortBy"]) == ["net_quantity", "net_revenue_minor", "_id.sku"]
    assert list(top["by_revenue"]["$topN"]["sortBy"]) == ["net_revenue_minor", "net_quantity", "_id.sku"]


def test_the_client_sends_dates_as_iso_days_and_refuses_datetimes() -> None:
    assert _iso_date(D1.date()) == "2026-03-01" and _iso_date("2026-03-01") == "2026-03-01"
    with pytest.raises(TypeError):
        _iso_date(D1)


# ---- verify: the expected report, and the repair's guard -------------------------------------------------------


def test_verify_expects_the_report_the_projector_folds_from_the_same_orders() -> None:
    streams = [
        order_events("EUR", [("A", 2, 10)], placed_at=D1, cancelled_at=D2),
        order_events("EUR", [("B", 1, 99)], placed_at=D2),
    ]
    accumulator = SalesAccumulator()
    for events in streams:
        accumulator.add(fold_stream(ORDERS, events))
    expected = accumulator.expected()
    projected = sales_documents(rows_from_orders(order_doc(events) for events in streams))
    assert {k: e.doc for k, e in expected.items()} == projected
    assert all(e.version is None and e.guard_field == REPORT_VERSION_FIELD for e in expected.values())


def test_a_repair_never_replaces_a_report_that_summarises_more_facts() -> None:
    expected = ExpectedDoc({"_id": "2026-03-01/EUR", REPORT_VERSION_FIELD: 3}, None, guard_field=REPORT_VERSION_FIELD)
    assert replace_guard("2026-03-01/EUR", expected) == {
        "_id": "2026-03-01/EUR",
        "$or": [{REPORT_VERSION_FIELD: {"$lte": 3}}, {REPORT_VERSION_FIELD: {"$exists": False}}],
    }
    assert replace_guard("o-1", ExpectedDoc({"_id": "o-1"}, 4))["$or"][0] == {"version": {"$lte": 4}}


def test_row_groups_sum_like_the_pipeline_group() -> None:
    groups = SalesRowGroups()
    doc = order_doc(order_events("EUR", [("A", 2, 10)], placed_at=D1))
    groups.add(order_rows(doc))
    groups.add(order_rows(doc))
    (order_row,) = [r for r in groups.rows() if r["_id"]["sku"] is None]
    assert (order_row["orders"], order_row["revenue_minor"]) == (2, 40)
    assert groups.keys() == [SalesKey("2026-03-01", "EUR")]
