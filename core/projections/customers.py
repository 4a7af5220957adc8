"""The `customers` read model: one document per customer, as the query service reads it.

Document shape::

    {_id: customer_id, customer_id, name, email, status: "ACTIVE"|"DEACTIVATED", registered_at, updated_at,
     version, position,
     order_stats: {draft_orders, placed_orders, cancelled_orders, placed_totals: [{currency, total_minor}]},
     order_stats_version, order_stats_seq, order_stats_increments: {since, until}}

Two writers share the document. The customer events (this module) own every field but `order_stats` and its
bookkeeping (`order_stats_version`, `order_stats_seq`, `order_stats_increments`), which the projector keeps from
the `orders` collection (`projector.order_stats`).
Orders may reach the read model before their customer does: then a document holding only the order statistics
exists, without `version`; the fold treats it as version 0 and the registration keeps the statistics.
Readers must treat a document without `version` as "no such customer (yet)".
"""

from __future__ import annotations

from typing import Any, TypeVar

from core.customer_events import (
    CUSTOMER_STREAM_TYPE,
    CustomerDeactivated,
    CustomerEmailChanged,
    CustomerRegistered,
    CustomerRenamed,
)
from core.envelope import RecordedEvent
from core.events import Event
from core.projections import Document, Handler, Projection
from core.read_model import CUSTOMER_INDEXES, CUSTOMERS_COLLECTION, ORDER_STATUS_COUNTERS, CustomerStatus

# The names and indexes are the read-model contract's (core/read_model.py), shared with the query service.
STATUS_ACTIVE = CustomerStatus.ACTIVE
STATUS_DEACTIVATED = CustomerStatus.DEACTIVATED
COLLECTION = CUSTOMERS_COLLECTION
INDEXES = CUSTOMER_INDEXES

# A stamp of how far the statistics are (grows, never above the sum of the versions of the customer's orders).
STATS_VERSION_FIELD = "order_stats_version"
# The statistics' compare-and-set counter: every write of them increments it (absent until the first).
STATS_SEQ_FIELD = "order_stats_seq"
# `{since, until}`: every write of the statistics whose counter is in (since, until] was an increment; it says so
# of the latest writes only while `until` equals the counter (a recompute leaves it behind).
STATS_INCREMENTS_FIELD = "order_stats_increments"
# Written by the order statistics, never by customer events.
STATS_FIELDS = frozenset({"order_stats", STATS_VERSION_FIELD, STATS_SEQ_FIELD, STATS_INCREMENTS_FIELD})

E = TypeVar("E", bound=Event)


def empty_order_stats() -> dict[str, Any]:
    return {**dict.fromkeys(ORDER_STATUS_COUNTERS.values(), 0), "placed_totals": []}


def _as(event: Event, kind: type[E]) -> E:
    if not isinstance(event, kind):
        raise ValueError(f"expected {kind.__name__}, got {type(event).__name__}")
    return event


def _registered(doc: Document | None) -> bool:
    """True once the customer's registration is in the document (not just order statistics)."""
    return doc is not None and int(doc.get("version", 0)) >= 1


def _existing(doc: Document | None, recorded: RecordedEvent) -> Document:
    if doc is None or not _registered(doc):
        raise ValueError(
            f"{recorded.event_type} v{recorded.version} for customer {recorded.stream_id} with no document"
        )
    return doc


def _copy(doc: Document, **changes: Any) -> Document:
    """A copy of `doc` sharing no mutable part with it, with `changes` applied."""
    new_doc = {**doc}
    if "order_stats" in doc:
        stats = dict(doc["order_stats"])
        stats["placed_totals"] = [dict(total) for total in stats.get("placed_totals", [])]
        new_doc["order_stats"] = stats
    new_doc.update(changes)
    return new_doc


def on_customer_registered(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    """Starts the customer; onto a statistics-only document (orders came first) it keeps the statistics."""
    e = _as(event, CustomerRegistered)
    if _registered(doc):
        raise ValueError(f"CustomerRegistered for customer {recorded.stream_id} which is already registered")
    if e.customer_id != recorded.stream_id:
        raise ValueError(
            f"CustomerRegistered.customer_id {e.customer_id!r} differs from stream id {recorded.stream_id!r}"
        )
    base = _copy(doc) if doc is not None else {}
    base.setdefault("order_stats", empty_order_stats())
    base.setdefault(STATS_VERSION_FIELD, 0)
    return {
        **base,
        "_id": e.customer_id,
        "customer_id": e.customer_id,
        "name": e.name,
        "email": e.email,
        "status": STATUS_ACTIVE,
        "registered_at": recorded.recorded_at,
        "updated_at": recorded.recorded_at,
        "version": recorded.version,
        "position": recorded.position,
    }


def on_customer_renamed(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    e = _as(event, CustomerRenamed)
    return _copy(_existing(doc, recorded), name=e.name)


def on_customer_email_changed(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    e = _as(event, CustomerEmailChanged)
    return _copy(_existing(doc, recorded), email=e.email)


def on_customer_deactivated(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    _as(event, CustomerDeactivated)
    return _copy(_existing(doc, recorded), status=STATUS_DEACTIVATED)


HANDLERS: dict[str, Handler] = {
    CustomerRegistered.event_type: on_customer_registered,
    CustomerRenamed.event_type: on_customer_renamed,
    CustomerEmailChanged.event_type: on_customer_email_changed,
    CustomerDeactivated.event_type: on_customer_deactivated,
}

CUSTOMERS = Projection(
    name="customers",
    stream_type=CUSTOMER_STREAM_TYPE,
    collection=COLLECTION,
    handlers=HANDLERS,
    indexes=INDEXES,
    foreign_fields=STATS_FIELDS,
)


def project(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    """Applies one customer event to the customer's document (or None) and returns the new document."""
    return CUSTOMERS.project(doc, recorded, event)
