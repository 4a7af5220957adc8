"""The documents the read model should hold, computed from PostgreSQL's events with the projector's own code.

Nothing here re-implements a fold: each stream goes through the projector's own `fold` with its registered
`Projection` (the table of `on_<event>` handlers), as a projector replaying the stream from scratch would. The two
views that join aggregates use `projector.customer_views` (`CustomerFields.order_fields`) and `projector.order_stats`
(`order_stats_from_groups`), and the sales report `core.projections.sales.sales_documents`, each fed with
`$group`-shaped rows built from the expected order documents instead of MongoDB's aggregation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from core.envelope import RecordedEvent
from core.events import decode_event
from core.order_events import OrderCreated
from core.projections import Projection
from core.projections.customers import CUSTOMERS, STATS_INCREMENTS_FIELD, STATS_SEQ_FIELD, STATS_VERSION_FIELD
from core.projections.orders import ORDERS
from core.projections.sales import REPORT_VERSION_FIELD, SALES_COLLECTION, SalesRowGroups, order_rows, sales_documents
from cqrsctl.verify.compare import as_stored
from cqrsctl.verify.model import Document, ExpectedDoc
from projector.customer_views import CustomerFields
from projector.order_stats import OrderStats, order_stats_from_groups
from projector.planning import Delivery, fold
from projector.registry import CUSTOMER_ORDER_STATS, PROJECTIONS, SALES_REPORT

# The one registry the projector runs (orders before customers, as in the projector's batches).
REGISTRY: tuple[Projection, ...] = PROJECTIONS
ORDER_TYPE = ORDERS.stream_type
CUSTOMER_TYPE = CUSTOMERS.stream_type
# How an order names its customer in PostgreSQL (for finding a customer's orders there).
ORDER_CUSTOMER_EVENT = OrderCreated.event_type
ORDER_CUSTOMER_FIELD = "customer_id"
# The report's collection, also the name its keys are audited under (it has no stream type), and the order events
# that make a day count (what PostgreSQL is searched for when a report day is re-checked).
REPORT = SALES_COLLECTION
# The statistics' compare-and-set counter and its run of increments count writes, which depends on batching, not
# on events: not compared.
STATS_BOOKKEEPING = frozenset({STATS_SEQ_FIELD, STATS_INCREMENTS_FIELD})
REPORT_EVENTS: frozenset[str] = SALES_REPORT.triggers[ORDERS.stream_type]


def projections_by_type() -> dict[str, Projection]:
    return {p.stream_type: p for p in REGISTRY}


@dataclass(frozen=True, slots=True)
class Folded:
    """One stream folded by its projection: the document as the projector would leave it."""

    stream_id: str
    stream_type: str
    pg_version: int  # the last version in PostgreSQL
    doc: Document | None  # after the last event that applies (None if none did)
    error: str | None = None  # why the fold stopped before `pg_version` (the projector parks the stream there)
    # How many of the stream's events change its customer's order statistics (orders only).
    stats_events: int = 0


def fold_stream(projection: Projection, events: Sequence[RecordedEvent]) -> Folded:
    """Folds the stream's events with the projector's own `fold` (version order, gaps, refusals) onto no
    document, as a projector replaying the stream from scratch would (pure)."""
    ordered = sorted(events, key=lambda e: e.version)
    if not ordered:
        raise ValueError("a stream without events cannot be folded")
    first = ordered[0]
    deliveries: list[Delivery] = []
    error: str | None = None
    for recorded in ordered:
        try:
            event = decode_event(recorded.event_type, recorded.schema_version, recorded.payload)
        except ValueError as exc:  # UnknownEventType, MalformedEvent: the projector parks the stream here
            error = f"{recorded.event_type} v{recorded.version} (position {recorded.position}): {exc}"
            break
        deliveries.append(Delivery(None, recorded, event))
    result = fold(projection, {first.stream_id: deliveries}, {})
    doc = result.changes[0].new_doc if result.changes else None
    applied = result.applied.get(first.stream_id, [])
    if result.poison:
        poison = result.poison[0]
        error = f"v{poison.recorded.version if poison.recorded else '?'}: {poison.reason}"
    elif result.deferred:
        after = applied[-1].recorded.version if applied else 0
        error = f"version gap in PostgreSQL: v{after} is followed by v{result.deferred[0].recorded.version}"
    events = [d.recorded for d in applied]
    stats_events = sum(1 for r in events if CUSTOMER_ORDER_STATS.triggered_by(r.stream_type, r.event_type))
    return Folded(first.stream_id, first.stream_type, ordered[-1].version, doc, error, stats_events)


def customer_fields(folded: Folded | None) -> CustomerFields | None:
    """What the customer's orders show of it: its registered document's name, e-mail and version."""
    if folded is None or folded.doc is None or int(folded.doc.get("version", 0)) < 1:
        return None
    doc = folded.doc
    return CustomerFields(str(doc.get("name", "")), str(doc.get("email", "")), int(doc["version"]))


def plain_expected(folded: Folded) -> ExpectedDoc | None:
    """A projection with no cross-model fields: the fold itself."""
    if folded.doc is None:
        return None
    return ExpectedDoc(as_stored(folded.doc), int(folded.doc["version"]))


def expected_order(folded: Folded, customer: CustomerFields | None) -> ExpectedDoc | None:
    """The order's fold with its customer's fields (the order handlers leave them empty until the fan-out)."""
    if folded.doc is None:
        return None
    doc = dict(folded.doc)
    if customer is not None:
        doc.update(customer.order_fields())
    return ExpectedDoc(as_stored(doc), int(doc["version"]))


def order_customer_id(folded: Folded) -> str | None:
    if folded.doc is None or not folded.doc.get("customer_id"):
        return None
    return str(folded.doc["customer_id"])


class OrderStatsAccumulator:
    """Per customer, the `$group` rows of `projector.order_stats.order_stats_pipeline`, built from expected
    order documents; memory grows with customers (a few numbers each), not with events or orders."""

    def __init__(self) -> None:
        self._groups: dict[str, dict[tuple[str, str, bool], list[int]]] = {}
        self._floor: dict[str, int] = {}

    def add(self, folded: Folded) -> None:
        """Counts one order (its document as the projector leaves it) for its customer."""
        customer_id = order_customer_id(folded)
        if customer_id is None or folded.doc is None:
            return
        doc = folded.doc
        key = (str(doc.get("status")), str(doc.get("currency")), bool(doc.get("deleted")))
        group = self._groups.setdefault(customer_id, {}).setdefault(key, [0, 0, 0])
        group[0] += 1
        group[1] += int(doc.get("total_minor", 0))
        group[2] += int(doc.get("version", 0))
        self._floor[customer_id] = self._floor.get(customer_id, 0) + folded.stats_events

    def __contains__(self, customer_id: object) -> bool:
        return customer_id in self._groups

    def customers(self) -> list[str]:
        return sorted(self._groups)

    def rows(self, customer_id: str) -> list[Mapping[str, Any]]:
        return [
            {
                "_id": {"customer_id": customer_id, "status": status, "currency": currency, "deleted": deleted},
                "orders": orders,
                "total_minor": total,
                "versions": versions,
            }
            for (status, currency, deleted), (orders, total, versions) in self._groups.get(customer_id, {}).items()
        ]

    def stats(self, customer_id: str) -> tuple[OrderStats, int]:
        """The customer's statistics (exact) and the lowest `order_stats_version` the projector can have left.

        A recompute stamps the sum of the versions of the customer's orders; an increment adds its orders' version
        steps, each of which spans at least the statistics events it applies. So the stamp counts each order for
        at least its number of statistics events (the floor), and at most its version (`source_version`).
        """
        stats = order_stats_from_groups([customer_id], self.rows(customer_id))[customer_id]
        return stats, self._floor.get(customer_id, 0)

    def pop(self, customer_id: str) -> None:
        self._groups.pop(customer_id, None)
        self._floor.pop(customer_id, None)


def expected_customer(customer_id: str, folded: Folded | None, orders: OrderStatsAccumulator) -> ExpectedDoc | None:
    """The customer's fold with the statistics of its orders; a statistics-only document when the customer has
    orders but no registration; None when it has neither."""
    has_orders = customer_id in orders
    stats, floor = orders.stats(customer_id)
    stats_fields = {"order_stats": stats.stats, STATS_VERSION_FIELD: stats.source_version}
    ranges = {STATS_VERSION_FIELD: (min(floor, stats.source_version), stats.source_version)}
    if folded is not None and folded.doc is not None and int(folded.doc.get("version", 0)) >= 1:
        doc = {**folded.doc, **stats_fields}
        return ExpectedDoc(as_stored(doc), int(doc["version"]), ranges, unchecked=STATS_BOOKKEEPING)
    if has_orders:
        return ExpectedDoc(as_stored({"_id": customer_id, **stats_fields}), None, ranges, unchecked=STATS_BOOKKEEPING)
    return None


def fold_all(events: Mapping[str, Sequence[RecordedEvent]]) -> dict[str, Folded]:
    """Folds every stream whose type has a projection; streams of other types are left out."""
    by_type = projections_by_type()
    folded: dict[str, Folded] = {}
    for stream_id, stream_events in events.items():
        if not stream_events:
            continue
        projection = by_type.get(stream_events[0].stream_type)
        if projection is not None:
            folded[stream_id] = fold_stream(projection, stream_events)
    return folded


def expected_for(folded: Folded, customers: Mapping[str, Folded], orders: OrderStatsAccumulator) -> ExpectedDoc | None:
    """The expected document of any projected stream, cross-model fields included."""
    if folded.stream_type == ORDER_TYPE:
        customer_id = order_customer_id(folded)
        return expected_order(folded, customer_fields(customers.get(customer_id)) if customer_id else None)
    if folded.stream_type == CUSTOMER_TYPE:
        return expected_customer(folded.stream_id, folded, orders)
    return plain_expected(folded)


def collection_of(stream_type: str) -> str | None:
    projection = projections_by_type().get(stream_type)
    return projection.collection if projection is not None else None


def unique(items: Iterable[str]) -> list[str]:
    return sorted(set(items))


class SalesAccumulator:
    """The sales report rows of the orders folded so far (`core.projections.sales.order_rows`, summed as the
    projector's aggregation sums them); memory grows with days x currencies x SKUs, not with orders."""

    def __init__(self) -> None:
        self._groups = SalesRowGroups()

    def add(self, folded: Folded) -> None:
        if folded.stream_type == ORDER_TYPE and folded.doc is not None:
            self._groups.add(order_rows(folded.doc))

    def expected(self) -> dict[str, ExpectedDoc]:
        """Every report document the orders make, by id, as stored (exact: it depends only on the orders)."""
        return {
            key_id: ExpectedDoc(as_stored(doc), None, guard_field=REPORT_VERSION_FIELD)
            for key_id, doc in sales_documents(self._groups.rows()).items()
        }
