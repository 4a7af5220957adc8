"""Read-model documents -> protobuf messages (and the status enums)."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

from cqrs.orders.v1 import customer_pb2, order_pb2, query_service_pb2
from google.protobuf import timestamp_pb2

from core.read_model import ORDER_STATUS_COUNTERS, CustomerStatus, OrderStatus

# Every status of the read-model contract maps to a proto value (tests/unit/test_read_model_contract.py).
# The proto value is named after the status (`ORDER_STATUS_<STATUS>`): a status missing from the proto fails at import.
ORDER_STATUS_TO_PROTO: dict[str, order_pb2.OrderStatus.ValueType] = {
    status: order_pb2.OrderStatus.Value(f"ORDER_STATUS_{status.value}") for status in OrderStatus
}
_STATUS_FROM_PROTO: dict[int, str] = {value: str(name) for name, value in ORDER_STATUS_TO_PROTO.items()}
CUSTOMER_STATUS_TO_PROTO: dict[str, customer_pb2.CustomerStatus.ValueType] = {
    CustomerStatus.ACTIVE: customer_pb2.CUSTOMER_STATUS_ACTIVE,
    CustomerStatus.DEACTIVATED: customer_pb2.CUSTOMER_STATUS_DEACTIVATED,
}


def status_to_proto(status: str | None) -> order_pb2.OrderStatus.ValueType:
    """The enum for a read-model status string; an unknown string becomes ORDER_STATUS_UNSPECIFIED."""
    return ORDER_STATUS_TO_PROTO.get(status or "", order_pb2.ORDER_STATUS_UNSPECIFIED)


def status_from_proto(status: int) -> str | None:
    """The read-model status string for an enum value; None for UNSPECIFIED ("any status").

    Raises ValueError for a number this server does not know (e.g. from a newer client).
    """
    if status == order_pb2.ORDER_STATUS_UNSPECIFIED:
        return None
    try:
        return _STATUS_FROM_PROTO[status]
    except KeyError:
        raise ValueError(f"unknown order status {status}") from None


def order_from_document(doc: Mapping[str, Any]) -> order_pb2.Order:
    """The `Order` view of a read-model document; missing optional parts stay unset."""
    order = order_pb2.Order(
        order_id=str(doc.get("order_id") or doc["_id"]),
        customer_id=str(doc.get("customer_id", "")),
        status=status_to_proto(doc.get("status")),
        currency=str(doc.get("currency", "")),
        lines=[_line(line) for line in doc.get("lines") or []],
        total_minor=int(doc.get("total_minor", 0)),
        cancel_reason=str(doc.get("cancel_reason") or ""),
        version=int(doc.get("version", 0)),
        position=int(doc.get("position", 0)),
        customer_name=str(doc.get("customer_name") or ""),
        customer_email=str(doc.get("customer_email") or ""),
        customer_version=int(doc.get("customer_version") or 0),
    )
    address = doc.get("shipping_address")
    if address:
        order.shipping_address.CopyFrom(_address(address))
    for field in ("created_at", "updated_at", "placed_at"):
        value = doc.get(field)
        if isinstance(value, dt.datetime):
            getattr(order, field).CopyFrom(timestamp(value))
    return order


def history_event_from_entry(entry: Mapping[str, Any]) -> query_service_pb2.OrderHistoryEvent:
    """One entry of an order's change log (`core/projections/orders.py`); the payload as a JSON object."""
    event = query_service_pb2.OrderHistoryEvent(
        event_id=str(entry.get("event_id", "")),
        event_type=str(entry.get("event_type", "")),
        schema_version=int(entry.get("schema_version", 0)),
        version=int(entry.get("version", 0)),
        position=int(entry.get("position", 0)),
        correlation_id=str(entry.get("correlation_id") or ""),
        request_id=str(entry.get("request_id") or ""),
        causation_id=str(entry.get("causation_id") or ""),
        subject=str(entry.get("subject") or ""),
        payload_json=json.dumps(entry.get("payload") or {}, separators=(",", ":"), ensure_ascii=False),
    )
    recorded_at = entry.get("recorded_at")
    if isinstance(recorded_at, dt.datetime):
        event.recorded_at.CopyFrom(timestamp(recorded_at))
    return event


def timestamp(value: dt.datetime) -> timestamp_pb2.Timestamp:
    """A protobuf Timestamp; a naive datetime is taken as UTC (that is what BSON dates are)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    result = timestamp_pb2.Timestamp()
    result.FromDatetime(value)
    return result


def _line(line: Mapping[str, Any]) -> order_pb2.OrderLine:
    return order_pb2.OrderLine(
        sku=str(line.get("sku", "")),
        name=str(line.get("name", "")),
        quantity=int(line.get("quantity", 0)),
        unit_price_minor=int(line.get("unit_price_minor", 0)),
        line_total_minor=int(line.get("line_total_minor", 0)),
    )


def _address(address: Mapping[str, Any]) -> order_pb2.Address:
    return order_pb2.Address(
        recipient=str(address.get("recipient", "")),
        line1=str(address.get("line1", "")),
        line2=str(address.get("line2") or ""),
        city=str(address.get("city", "")),
        postal_code=str(address.get("postal_code", "")),
        country=str(address.get("country", "")),
    )


def customer_from_document(doc: Mapping[str, Any]) -> customer_pb2.Customer:
    """The `Customer` view of a read-model document; missing statistics are zeros."""
    customer = customer_pb2.Customer(
        customer_id=str(doc.get("customer_id") or doc["_id"]),
        name=str(doc.get("name") or ""),
        email=str(doc.get("email") or ""),
        status=CUSTOMER_STATUS_TO_PROTO.get(str(doc.get("status") or ""), customer_pb2.CUSTOMER_STATUS_UNSPECIFIED),
        order_stats=_order_stats(doc.get("order_stats") or {}),
        version=int(doc.get("version", 0)),
        position=int(doc.get("position", 0)),
    )
    for field in ("registered_at", "updated_at"):
        value = doc.get(field)
        if isinstance(value, dt.datetime):
            getattr(customer, field).CopyFrom(timestamp(value))
    return customer


def _order_stats(stats: Mapping[str, Any]) -> customer_pb2.CustomerOrderStats:
    totals = sorted(
        (
            customer_pb2.CurrencyTotal(currency=str(t.get("currency", "")), total_minor=int(t.get("total_minor", 0)))
            for t in stats.get("placed_totals") or []
        ),
        key=lambda total: total.currency,
    )
    return customer_pb2.CustomerOrderStats(
        **{counter: int(stats.get(counter, 0)) for counter in ORDER_STATUS_COUNTERS.values()},
        placed_totals=totals,
    )
