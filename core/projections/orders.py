"""The `orders` read model: one document per order, as the query service reads it.

Document shape::

    {_id, order_id, customer_id, status: "DRAFT"|"PLACED"|"CANCELLED", currency,
     lines: [{sku, name, quantity, unit_price_minor, line_total_minor}], total_minor,
     shipping_address: {recipient, line1, line2, city, postal_code, country}, cancel_reason,
     created_at, updated_at, placed_at, cancelled_at, version, position, deleted,
     customer_name, customer_email, customer_version,
     history: [{event_id, event_type, schema_version, version, position, recorded_at, payload,
                correlation_id, request_id, causation_id, subject}]}

`history` is the order's change log: every applied event, as recorded, with the metadata that says who and why.
It lives in the order's own document, written by the same version-guarded write, so it can never disagree with
the order, survives the deletion (tombstone) and is checked and rebuilt with the rest (`cqrs verify`). The query
service folds it with this module's handlers to answer "what did the order look like then"
(`core.projections.order_history`); readers of the current order leave the field out.

`customer_name`/`customer_email` are a copy of the customer's read model at `customer_version` (0, with empty
strings, while the customer is unknown). The order handlers only initialise them; the runner keeps them current
(`projector.customer_views`), guarded by `customer_version`, and the order writes never overwrite them.

Totals are always derived from the lines, never accumulated, so a handler cannot make them drift. Handlers raise
ValueError when an event cannot apply to the document (e.g. an item event for an order with no document): the
projector parks the order's stream at that event (its later events wait, in order, until an operator retries or
skips it with `cqrs dead-letters`), because a read model that silently diverges from the event store is worse
than one that visibly stalls.
"""

from __future__ import annotations

from typing import Any, TypeVar

from core.envelope import RecordedEvent
from core.events import Event
from core.order_events import (
    ORDER_STREAM_TYPE,
    OrderCancelled,
    OrderCreated,
    OrderDeleted,
    OrderItemAdded,
    OrderItemQuantityChanged,
    OrderItemRemoved,
    OrderPlaced,
    OrderShippingAddressChanged,
)
from core.projections import Document, Handler, Projection
from core.read_model import ORDER_HISTORY_FIELD, ORDER_INDEXES, ORDERS_COLLECTION, OrderStatus
from core.values import OrderLine

# The names and indexes are the read-model contract's (core/read_model.py), shared with the query service.
STATUS_DRAFT = OrderStatus.DRAFT
STATUS_PLACED = OrderStatus.PLACED
STATUS_CANCELLED = OrderStatus.CANCELLED
COLLECTION = ORDERS_COLLECTION
INDEXES = ORDER_INDEXES

# Kept current by the customer fan-out, not by order events.
CUSTOMER_FIELDS = frozenset({"customer_name", "customer_email", "customer_version"})
# The change log (see the module docstring).
HISTORY_FIELD = ORDER_HISTORY_FIELD

E = TypeVar("E", bound=Event)


def _as(event: Event, kind: type[E]) -> E:
    if not isinstance(event, kind):
        raise ValueError(f"expected {kind.__name__}, got {type(event).__name__}")
    return event


def _existing(doc: Document | None, recorded: RecordedEvent) -> Document:
    if doc is None:
        raise ValueError(f"{recorded.event_type} v{recorded.version} for order {recorded.stream_id} with no document")
    if doc.get("deleted"):
        raise ValueError(f"{recorded.event_type} v{recorded.version}: order {recorded.stream_id} was deleted")
    return doc


def _line(sku: str, name: str, quantity: int, unit_price_minor: int) -> dict[str, Any]:
    return {
        "sku": sku,
        "name": name,
        "quantity": quantity,
        "unit_price_minor": unit_price_minor,
        "line_total_minor": OrderLine(sku, name, quantity, unit_price_minor).line_total_minor,
    }


def _copy(doc: Document, **changes: Any) -> Document:
    """A copy of `doc` sharing no mutable part with it, with `changes` applied."""
    new_doc = {**doc, "lines": _copy_lines(doc), "shipping_address": dict(doc.get("shipping_address") or {})}
    new_doc.update(changes)
    return new_doc


def _with_lines(doc: Document, lines: list[dict[str, Any]]) -> Document:
    """A copy of `doc` with new lines and the total derived from them."""
    return _copy(doc, lines=lines, total_minor=sum(int(line["line_total_minor"]) for line in lines))


def _copy_lines(doc: Document) -> list[dict[str, Any]]:
    return [dict(line) for line in doc.get("lines", [])]


def _find_line(lines: list[dict[str, Any]], sku: str, recorded: RecordedEvent) -> int:
    for index, line in enumerate(lines):
        if line["sku"] == sku:
            return index
    raise ValueError(f"{recorded.event_type} v{recorded.version}: order {recorded.stream_id} has no line {sku!r}")


def on_order_created(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    e = _as(event, OrderCreated)
    if doc is not None:
        raise ValueError(f"OrderCreated for order {recorded.stream_id} which already has a document")
    if e.order_id != recorded.stream_id:
        raise ValueError(f"OrderCreated.order_id {e.order_id!r} differs from stream id {recorded.stream_id!r}")
    return {
        "_id": e.order_id,
        "order_id": e.order_id,
        "customer_id": e.customer_id,
        "status": STATUS_DRAFT,
        "currency": e.currency,
        "lines": [],
        "total_minor": 0,
        "shipping_address": e.shipping_address.to_dict(),
        "cancel_reason": "",
        "created_at": recorded.recorded_at,
        "updated_at": recorded.recorded_at,
        "placed_at": None,
        "cancelled_at": None,
        "version": recorded.version,
        "position": recorded.position,
        "deleted": False,
        "customer_name": "",
        "customer_email": "",
        "customer_version": 0,
    }


def on_order_item_added(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    """Appends a line; a second line for a SKU cannot apply (the write side never emits one, see its `evolve`)."""
    e = _as(event, OrderItemAdded)
    current = _existing(doc, recorded)
    lines = _copy_lines(current)
    if any(line["sku"] == e.sku for line in lines):
        raise ValueError(f"OrderItemAdded v{recorded.version}: order {recorded.stream_id} already has {e.sku!r}")
    lines.append(_line(e.sku, e.name, e.quantity, e.unit_price_minor))
    return _with_lines(current, lines)


def on_order_item_removed(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    e = _as(event, OrderItemRemoved)
    current = _existing(doc, recorded)
    lines = _copy_lines(current)
    del lines[_find_line(lines, e.sku, recorded)]
    return _with_lines(current, lines)


def on_order_item_quantity_changed(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    e = _as(event, OrderItemQuantityChanged)
    current = _existing(doc, recorded)
    if e.quantity < 1:
        raise ValueError(f"OrderItemQuantityChanged v{recorded.version}: quantity {e.quantity} < 1")
    lines = _copy_lines(current)
    index = _find_line(lines, e.sku, recorded)
    old = lines[index]
    lines[index] = _line(e.sku, str(old["name"]), e.quantity, int(old["unit_price_minor"]))
    return _with_lines(current, lines)


def on_order_shipping_address_changed(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    e = _as(event, OrderShippingAddressChanged)
    current = _existing(doc, recorded)
    return _copy(current, shipping_address=e.shipping_address.to_dict())


def on_order_placed(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    _as(event, OrderPlaced)
    current = _existing(doc, recorded)
    return _copy(current, status=STATUS_PLACED, placed_at=recorded.recorded_at)


def on_order_cancelled(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    e = _as(event, OrderCancelled)
    current = _existing(doc, recorded)
    # When, not only whether: the sales report counts a cancellation on its own day (`core.projections.sales`).
    return _copy(current, status=STATUS_CANCELLED, cancel_reason=e.reason, cancelled_at=recorded.recorded_at)


def on_order_deleted(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    """Keeps a tombstone: the version stays on the document so late redeliveries are still recognised."""
    _as(event, OrderDeleted)
    current = _existing(doc, recorded)
    return _copy(current, deleted=True)


def json_copy(value: Any) -> Any:
    """A copy of a JSON value (dicts, lists, scalars) sharing no mutable part with it: what `copy.deepcopy` does
    for a payload decoded from JSON, several times faster (no memo, no dispatch on arbitrary types)."""
    if isinstance(value, dict):
        return {key: json_copy(item) for key, item in value.items()}
    if isinstance(value, list):
        return [json_copy(item) for item in value]
    return value


def history_entry(recorded: RecordedEvent) -> Document:
    """One event of the change log: everything needed to show it and to fold it again."""
    metadata = recorded.metadata
    return {
        "event_id": str(recorded.event_id),
        "event_type": recorded.event_type,
        "schema_version": recorded.schema_version,
        "version": recorded.version,
        "position": recorded.position,
        "recorded_at": recorded.recorded_at,
        "payload": json_copy(recorded.payload),
        "correlation_id": metadata.correlation_id,
        "request_id": metadata.request_id,
        "causation_id": metadata.causation_id,
        "subject": metadata.subject,
    }


def _logged(handler: Handler) -> Handler:
    """`handler`, whose new document also appends the event to the change log (a new list: inputs stay as they
    were)."""

    def apply(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
        new_doc = handler(doc, recorded, event)
        new_doc[HISTORY_FIELD] = [*(doc or {}).get(HISTORY_FIELD, ()), history_entry(recorded)]
        return new_doc

    apply.__name__ = apply.__qualname__ = handler.__name__
    apply.__doc__ = handler.__doc__
    return apply


HANDLERS: dict[str, Handler] = {
    OrderCreated.event_type: on_order_created,
    OrderItemAdded.event_type: on_order_item_added,
    OrderItemRemoved.event_type: on_order_item_removed,
    OrderItemQuantityChanged.event_type: on_order_item_quantity_changed,
    OrderShippingAddressChanged.event_type: on_order_shipping_address_changed,
    OrderPlaced.event_type: on_order_placed,
    OrderCancelled.event_type: on_order_cancelled,
    OrderDeleted.event_type: on_order_deleted,
}

ORDERS = Projection(
    name="orders",
    stream_type=ORDER_STREAM_TYPE,
    collection=COLLECTION,
    handlers={event_type: _logged(handler) for event_type, handler in HANDLERS.items()},
    indexes=INDEXES,
    foreign_fields=CUSTOMER_FIELDS,
    version=2,  # 2: each order keeps its change log (`history`) and when it was cancelled (`cancelled_at`)
)


def project(doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
    """Applies one order event to the order's document (or None) and returns the new document."""
    return ORDERS.project(doc, recorded, event)
