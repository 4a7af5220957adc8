"""An order's change log and as-of reads (pure): the history the orders projection keeps, folded again by the same
handlers, gives back exactly the document the projector held after each version; and the request checks of the
history and as-of RPCs."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cqrs.orders.v1 import query_service_pb2 as pb

from core.auth import _subject_handler, authenticated_subject
from core.envelope import EventMetadata, RecordedEvent
from core.errors import InvalidArgument
from core.events import Event
from core.order_events import (
    OrderCreated,
    OrderDeleted,
    OrderItemAdded,
    OrderItemQuantityChanged,
    OrderPlaced,
    OrderShippingAddressChanged,
)
from core.projections import Document
from core.projections.order_history import BeyondHistory, history_of, order_as_of, recorded_from_entry
from core.projections.orders import ORDERS
from core.values import Address
from query_service import paging, views
from query_service.api.orders import parse_get_request, parse_history_request

ORDER_ID = "6a1f2e3d-2222-4b7c-9d55-0b6f1f3e4c5b"
OTHER_ID = "6a1f2e3d-3333-4b7c-9d55-0b6f1f3e4c5b"
T0 = datetime(2026, 3, 4, 5, 6, 7, 123000, tzinfo=UTC)
ADDRESS = Address("Ada Lovelace", "1 Analytical St", "", "London", "N1 1AA", "GB")
NEW_ADDRESS = Address("Ada Lovelace", "2 Engine Rd", "Flat 3", "Bath", "BA1 1AA", "GB")
EVENTS: list[Event] = [
    OrderCreated(ORDER_ID, "cust-1", "EUR", ADDRESS),
    OrderItemAdded("SKU-A", "Anvil", 2, 1999),
    OrderItemQuantityChanged("SKU-A", 3),
    OrderShippingAddressChanged(NEW_ADDRESS),
    OrderPlaced(),
    OrderDeleted(),
]


def recorded(event: Event, version: int) -> RecordedEvent:
    return RecordedEvent(
        event_id=uuid.uuid4(),
        stream_type="order",
        stream_id=ORDER_ID,
        version=version,
        event_type=event.event_type,
        schema_version=event.schema_version,
        payload=event.to_payload(),
        metadata=EventMetadata(f"req-{version}", "corr", f"req-{version}", subject="alice" if version > 1 else ""),
        position=40 + 3 * version,
        recorded_at=T0 + timedelta(seconds=version),
    )


def snapshots() -> list[Document]:
    """The order document after each version, as the projector leaves it (index 0: version 1)."""
    docs: list[Document] = []
    doc: Document | None = None
    for version, event in enumerate(EVENTS, start=1):
        doc = ORDERS.project(doc, recorded(event, version), event)
        docs.append(doc)
    return docs


def test_the_history_logs_every_event_with_who_and_why() -> None:
    final = snapshots()[-1]
    entries = history_of(final)
    assert [e["version"] for e in entries] == list(range(1, len(EVENTS) + 1))
    assert [e["event_type"] for e in entries] == [e.event_type for e in EVENTS]
    assert [e["request_id"] for e in entries] == [f"req-{v}" for v in range(1, len(EVENTS) + 1)]
    assert {e["correlation_id"] for e in entries} == {"corr"}
    assert [e["subject"] for e in entries] == ["", *["alice"] * (len(EVENTS) - 1)]
    assert entries[1]["payload"] == EVENTS[1].to_payload()
    again = recorded_from_entry(ORDER_ID, entries[1])
    assert (again.version, again.position, again.recorded_at) == (2, 46, T0 + timedelta(seconds=2))
    assert again.metadata.subject == "alice"


def test_the_fold_as_of_each_version_is_the_document_the_projector_held_then() -> None:
    docs = snapshots()
    for version, expected in enumerate(docs, start=1):
        assert order_as_of(docs[-1], version=version) == expected
        assert order_as_of(docs[-1], at=expected["updated_at"]) == expected
        # between two events: the earlier one
        assert order_as_of(docs[-1], at=expected["updated_at"] + timedelta(milliseconds=500)) == expected


def test_as_of_a_time_before_the_order_existed_is_none() -> None:
    assert order_as_of(snapshots()[-1], at=T0) is None


def test_as_of_a_version_beyond_the_order_is_refused() -> None:
    with pytest.raises(BeyondHistory, match="is at version 6, not 7"):
        order_as_of(snapshots()[-1], version=7)


def test_exactly_one_as_of_point_is_required() -> None:
    final = snapshots()[-1]
    with pytest.raises(ValueError, match="exactly one"):
        order_as_of(final)
    with pytest.raises(ValueError, match="exactly one"):
        order_as_of(final, version=1, at=T0)


def test_as_of_shows_the_current_customer_fields() -> None:
    final = {**snapshots()[-1], "customer_name": "Ada", "customer_email": "ada@example.com", "customer_version": 3}
    earlier = order_as_of(final, version=2)
    assert earlier is not None
    assert (earlier["customer_name"], earlier["customer_email"], earlier["customer_version"]) == (
        "Ada",
        "ada@example.com",
        3,
    )
    assert earlier["version"] == 2 and earlier["total_minor"] == 2 * 1999


def test_the_history_view_keeps_integers_exact_in_the_payload_json() -> None:
    entry = history_of(snapshots()[-1])[1]
    event = views.history_event_from_entry(entry)
    assert event.payload_json == '{"sku":"SKU-A","name":"Anvil","quantity":2,"unit_price_minor":1999}'
    assert (event.version, event.position, event.request_id, event.subject) == (2, 46, "req-2", "alice")
    assert event.recorded_at.ToDatetime(tzinfo=UTC) == T0 + timedelta(seconds=2)


def test_history_page_tokens_continue_after_a_version_of_the_same_order_only() -> None:
    token = paging.encode_history_page_token(ORDER_ID, 4)
    assert paging.decode_history_page_token(token, ORDER_ID) == 4
    for bad, other in (
        (token, OTHER_ID),
        ("garbage", ORDER_ID),
        (paging.encode_history_page_token(ORDER_ID, 0), ORDER_ID),
    ):
        with pytest.raises(InvalidArgument) as raised:
            paging.decode_history_page_token(bad, other)
        assert [v.field for v in raised.value.violations] == ["page_token"]


def _fields(request: pb.GetOrderRequest | pb.GetOrderHistoryRequest) -> list[str]:
    parse = parse_get_request if isinstance(request, pb.GetOrderRequest) else parse_history_request
    with pytest.raises(InvalidArgument) as raised:
        parse(request)  # type: ignore[arg-type]
    return [v.field for v in raised.value.violations]


def test_get_order_requests_name_every_bad_as_of_field() -> None:
    both = pb.GetOrderRequest(order_id=ORDER_ID, as_of_version=2)
    both.as_of_time.FromDatetime(T0)
    assert _fields(both) == ["as_of_version", "as_of_time"]
    assert _fields(pb.GetOrderRequest(order_id="x", as_of_version=0)) == ["order_id", "as_of_version"]
    out_of_range = pb.GetOrderRequest(order_id=ORDER_ID)
    out_of_range.as_of_time.seconds = 253_402_300_800
    assert _fields(out_of_range) == ["as_of_time"]
    plain = parse_get_request(pb.GetOrderRequest(order_id=ORDER_ID.upper()))
    assert (plain.order_id, plain.as_of_version, plain.as_of_time) == (ORDER_ID, None, None)
    at = pb.GetOrderRequest(order_id=ORDER_ID)
    at.as_of_time.FromDatetime(T0)
    assert parse_get_request(at).as_of_time == T0


def test_history_requests_check_the_order_page_size_and_token() -> None:
    assert _fields(pb.GetOrderHistoryRequest(order_id="", page_size=-1)) == ["order_id", "page_size"]
    other = paging.encode_history_page_token(OTHER_ID, 2)
    assert _fields(pb.GetOrderHistoryRequest(order_id=ORDER_ID, page_token=other)) == ["page_token"]
    token = paging.encode_history_page_token(ORDER_ID, 2)
    assert parse_history_request(pb.GetOrderHistoryRequest(order_id=ORDER_ID, page_token=token)) == (ORDER_ID, 50, 2)


async def test_the_subject_of_a_validated_token_reaches_the_handler_and_no_further() -> None:
    async def behavior(request: object, context: object) -> str:
        return authenticated_subject()

    wrapped = _subject_handler(grpc.unary_unary_rpc_method_handler(behavior), "alice")
    assert wrapped.unary_unary is not None
    assert await wrapped.unary_unary(None, None) == "alice"  # type: ignore[arg-type]
    assert authenticated_subject() == ""


def test_event_metadata_records_the_subject_and_reads_old_events_without_it() -> None:
    metadata = EventMetadata("req", "corr", "req", subject="alice")
    assert EventMetadata.from_dict(metadata.to_dict()) == metadata
    assert "subject" not in EventMetadata("req", "corr", "req").to_dict()
    assert EventMetadata.from_dict({"request_id": "r", "correlation_id": "c", "causation_id": "r"}).subject == ""
