"""core.events (registry, payload codec, upcasting) and core.envelope (wire body and headers) round trips."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

import core.events as core_events
from core.envelope import (
    HEADER_CORRELATION_ID,
    HEADER_EVENT_TYPE,
    HEADER_MSG_ID,
    HEADER_POSITION,
    HEADER_RECORDED_AT,
    HEADER_STREAM_ID,
    HEADER_VERSION,
    EventMetadata,
    RecordedEvent,
)
from core.events import (
    Event,
    MalformedEvent,
    Payload,
    UnknownEventType,
    decode_event,
    known_event_types,
    register,
    upcaster,
)
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
from core.values import Address

HOME = Address(
    recipient="Zoë Ñúñez", line1="Königstraße 1", line2="", city="München", postal_code="80331", country="DE"
)
ORDER_EVENTS: list[Event] = [
    OrderCreated(
        order_id="5d0c2a8e-3b7f-4e19-a6c4-9f1e2d3c4b5a", customer_id="cust-42", currency="EUR", shipping_address=HOME
    ),
    OrderItemAdded(sku="SKU-1", name="Kaffeebohnen \u2013 Äthiopien", quantity=2, unit_price_minor=100_000_000_000),
    OrderItemRemoved(sku="SKU-1"),
    OrderItemQuantityChanged(sku="SKU-1", quantity=10_000),
    OrderShippingAddressChanged(shipping_address=HOME),
    OrderPlaced(),
    OrderCancelled(reason="changed my mind"),
    OrderDeleted(),
]


# --- test-local event types ----------------------------------------------------------------------------------
# Registered only inside `local_events` (on a copy of the registry), so other tests that enumerate
# `known_event_types()` never see them.


@dataclass(frozen=True, slots=True)
class ParcelWeighed(Event):
    """v1 {"parcel", "kg"} -> v2 renamed parcel to parcel_id -> v3 grams instead of kilograms, plus a carrier."""

    parcel_id: str
    grams: int
    carrier: str = "unknown"


def _parcel_v1_to_v2(payload: Payload) -> Payload:
    return {"parcel_id": payload["parcel"], "kg": payload["kg"]}


def _parcel_v2_to_v3(payload: Payload) -> Payload:
    return {"parcel_id": payload["parcel_id"], "grams": payload["kg"] * 1000}


@dataclass(frozen=True, slots=True)
class LabelPrinted(Event):
    """Version 2 without an upcaster from version 1: old payloads cannot be read."""

    label: str


@pytest.fixture
def local_events(monkeypatch: pytest.MonkeyPatch) -> None:
    # core.events has no public "unregister"; patching its tables with copies undoes everything after the test.
    monkeypatch.setattr(core_events, "_REGISTRY", dict(core_events._REGISTRY))
    monkeypatch.setattr(core_events, "_UPCASTERS", dict(core_events._UPCASTERS))
    register("UnitTestParcelWeighed", schema_version=3)(ParcelWeighed)
    upcaster("UnitTestParcelWeighed", from_version=1)(_parcel_v1_to_v2)
    upcaster("UnitTestParcelWeighed", from_version=2)(_parcel_v2_to_v3)
    register("UnitTestLabelPrinted", schema_version=2)(LabelPrinted)


USES_LOCAL_EVENTS = pytest.mark.usefixtures("local_events")


# --- registry and payload codec ---------------------------------------------------------------------------------


def test_every_order_event_is_registered_under_its_permanent_name() -> None:
    assert {
        "OrderCreated",
        "OrderItemAdded",
        "OrderItemRemoved",
        "OrderItemQuantityChanged",
        "OrderShippingAddressChanged",
        "OrderPlaced",
        "OrderCancelled",
        "OrderDeleted",
    } <= known_event_types()
    assert all(type(event).event_type == type(event).__name__ for event in ORDER_EVENTS)
    assert all(type(event).schema_version == 1 for event in ORDER_EVENTS)


@pytest.mark.parametrize("event", ORDER_EVENTS, ids=lambda e: type(e).__name__)
def test_order_events_round_trip_through_a_json_payload(event: Event) -> None:
    stored = json.loads(json.dumps(event.to_payload()))
    assert decode_event(type(event).event_type, type(event).schema_version, stored) == event


def test_payload_is_plain_json_data() -> None:
    created = ORDER_EVENTS[0]
    assert created.to_payload() == {
        "order_id": created.order_id,  # type: ignore[attr-defined]
        "customer_id": "cust-42",
        "currency": "EUR",
        "shipping_address": HOME.to_dict(),
    }
    assert OrderPlaced().to_payload() == {}


def test_address_without_line2_decodes_as_empty_line2() -> None:
    payload = OrderShippingAddressChanged(shipping_address=HOME).to_payload()
    del payload["shipping_address"]["line2"]
    assert decode_event("OrderShippingAddressChanged", 1, payload) == OrderShippingAddressChanged(HOME)


def test_unknown_payload_fields_are_ignored() -> None:
    # A tolerant reader: an older build can still read an event a newer build enriched.
    assert decode_event("OrderItemRemoved", 1, {"sku": "SKU-1", "note": "x"}) == OrderItemRemoved(sku="SKU-1")


@USES_LOCAL_EVENTS
def test_version_1_payload_is_upcast_through_every_step() -> None:
    payload = {"parcel": "P-1", "kg": 2}
    assert decode_event("UnitTestParcelWeighed", 1, payload) == ParcelWeighed("P-1", 2000)
    assert payload == {"parcel": "P-1", "kg": 2}


@USES_LOCAL_EVENTS
def test_version_2_payload_is_upcast_once() -> None:
    assert decode_event("UnitTestParcelWeighed", 2, {"parcel_id": "P-1", "kg": 3}) == ParcelWeighed("P-1", 3000)


@USES_LOCAL_EVENTS
def test_current_version_payload_is_decoded_as_it_is() -> None:
    payload = {"parcel_id": "P-1", "grams": 250, "carrier": "DHL"}
    assert decode_event("UnitTestParcelWeighed", 3, payload) == ParcelWeighed("P-1", 250, "DHL")
    assert ParcelWeighed("P-1", 250, "DHL").to_payload() == payload


@USES_LOCAL_EVENTS
def test_missing_field_with_a_default_takes_the_default() -> None:
    assert decode_event("UnitTestParcelWeighed", 3, {"parcel_id": "P", "grams": 1}).carrier == "unknown"  # type: ignore[attr-defined]


def test_unknown_event_type() -> None:
    with pytest.raises(UnknownEventType, match="unknown event type 'OrderTeleported'"):
        decode_event("OrderTeleported", 1, {})


@USES_LOCAL_EVENTS
def test_schema_version_newer_than_this_build_is_unknown() -> None:
    with pytest.raises(UnknownEventType, match="schema version 4 is newer than this build knows \\(3\\)"):
        decode_event("UnitTestParcelWeighed", 4, {"parcel_id": "P", "grams": 1})


@USES_LOCAL_EVENTS
def test_missing_upcaster_is_reported() -> None:
    with pytest.raises(UnknownEventType, match="no upcaster for UnitTestLabelPrinted from schema version 1"):
        decode_event("UnitTestLabelPrinted", 1, {"label": "x"})
    assert decode_event("UnitTestLabelPrinted", 2, {"label": "x"}) == LabelPrinted("x")


def test_local_event_types_do_not_leak_out_of_the_fixture() -> None:
    assert not {"UnitTestParcelWeighed", "UnitTestLabelPrinted"} & known_event_types()
    with pytest.raises(UnknownEventType):
        decode_event("UnitTestParcelWeighed", 3, {"parcel_id": "P", "grams": 1})


def test_decode_errors_are_value_errors() -> None:
    # Consumers catch ValueError to park a poison message instead of crashing.
    assert issubclass(UnknownEventType, ValueError)
    assert issubclass(MalformedEvent, ValueError)


@USES_LOCAL_EVENTS
def test_a_type_name_cannot_be_registered_twice() -> None:
    with pytest.raises(ValueError, match="'OrderPlaced' registered twice"):

        @register("OrderPlaced")
        @dataclass(frozen=True)
        class _Impostor(Event):
            pass

    assert decode_event("OrderPlaced", 1, {}) == OrderPlaced()


@pytest.mark.parametrize(
    ("event_type", "payload", "expected"),
    [
        ("OrderItemRemoved", {}, "payload lacks field 'sku'"),
        ("OrderItemAdded", {"sku": "S", "name": "n", "quantity": 1}, "lacks field 'unit_price_minor'"),
        ("OrderItemAdded", {"sku": "S", "name": "n", "quantity": "1", "unit_price_minor": 1}, "quantity: expected int"),
        ("OrderItemAdded", {"sku": "S", "name": "n", "quantity": 1.0, "unit_price_minor": 1}, "expected int"),
        ("OrderItemRemoved", {"sku": 7}, "sku: expected str"),
        ("OrderItemRemoved", {"sku": None}, "sku: expected str"),
        ("OrderShippingAddressChanged", {"shipping_address": "Königstraße 1"}, "OrderShippingAddressChanged"),
        ("OrderShippingAddressChanged", {"shipping_address": None}, "OrderShippingAddressChanged"),
        ("OrderShippingAddressChanged", {"shipping_address": {"recipient": "x"}}, "'line1'"),
        ("OrderItemRemoved", None, "OrderItemRemoved"),
    ],
)
def test_malformed_payloads(event_type: str, payload: Any, expected: str) -> None:
    with pytest.raises(MalformedEvent, match=expected):
        decode_event(event_type, 1, payload)


def test_bool_is_not_an_int_in_a_payload() -> None:
    with pytest.raises(MalformedEvent):
        decode_event("OrderItemAdded", 1, {"sku": "S", "name": "n", "quantity": True, "unit_price_minor": 1})


@USES_LOCAL_EVENTS
def test_upcaster_failure_on_a_malformed_old_payload_is_a_malformed_event() -> None:
    with pytest.raises(MalformedEvent):
        decode_event("UnitTestParcelWeighed", 1, {"kg": 2})


# --- envelope ---------------------------------------------------------------------------------------------------


def recorded(**changes: Any) -> RecordedEvent:
    fields: dict[str, Any] = {
        "event_id": uuid.UUID("9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d"),
        "stream_type": ORDER_STREAM_TYPE,
        "stream_id": "5d0c2a8e-3b7f-4e19-a6c4-9f1e2d3c4b5a",
        "version": 2,
        "event_type": "OrderItemAdded",
        "schema_version": 1,
        "payload": ORDER_EVENTS[1].to_payload(),
        "metadata": EventMetadata(request_id="req-1", correlation_id="corr-1", causation_id="cause-1"),
        "position": 41,
        "recorded_at": datetime(2026, 3, 4, 5, 6, 7, 891011, tzinfo=UTC),
    }
    fields.update(changes)
    return RecordedEvent(**fields)


def body(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(recorded().to_json())
    data.update(changes)
    return data


def test_envelope_round_trips_through_json() -> None:
    event = recorded()
    assert RecordedEvent.from_json(event.to_json()) == event


def test_envelope_keeps_a_non_utc_offset_and_non_ascii_text() -> None:
    event = recorded(
        recorded_at=datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone(timedelta(hours=5, minutes=30))),
        payload=OrderCancelled(reason="Lieferung zu spät ✉").to_payload(),
        event_type="OrderCancelled",
    )
    wire = event.to_json()
    assert "spät ✉".encode() in wire  # UTF-8 on the wire, not \u escapes
    decoded = RecordedEvent.from_json(wire)
    assert decoded == event
    assert decoded.recorded_at.utcoffset() == timedelta(hours=5, minutes=30)


def test_envelope_payload_decodes_to_the_domain_event() -> None:
    decoded = RecordedEvent.from_json(recorded().to_json())
    assert decode_event(decoded.event_type, decoded.schema_version, decoded.payload) == ORDER_EVENTS[1]


def test_headers_repeat_the_routing_facts() -> None:
    event = recorded()
    assert event.headers() == {
        HEADER_MSG_ID: "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
        HEADER_EVENT_TYPE: "OrderItemAdded",
        HEADER_STREAM_ID: "5d0c2a8e-3b7f-4e19-a6c4-9f1e2d3c4b5a",
        HEADER_VERSION: "2",
        HEADER_POSITION: "41",
        HEADER_RECORDED_AT: "2026-03-04T05:06:07.891011+00:00",
        HEADER_CORRELATION_ID: "corr-1",
    }


def test_metadata_round_trip_and_missing_keys() -> None:
    metadata = EventMetadata(request_id="r", correlation_id="c", causation_id="x")
    assert EventMetadata.from_dict(metadata.to_dict()) == metadata
    assert EventMetadata.from_dict({}) == EventMetadata(request_id="", correlation_id="", causation_id="")


REQUIRED_KEYS = [
    "event_id",
    "stream_type",
    "stream_id",
    "version",
    "event_type",
    "schema_version",
    "payload",
    "metadata",
    "position",
    "recorded_at",
]


@pytest.mark.parametrize("key", REQUIRED_KEYS)
def test_envelope_missing_a_key_is_malformed(key: str) -> None:
    data = body()
    del data[key]
    with pytest.raises(ValueError, match="malformed event envelope"):
        RecordedEvent.from_json(json.dumps(data).encode())


@pytest.mark.parametrize(
    "raw",
    [b"", b"{", b"not json", b"\xff\xfe\x00", b"[]", b"null", b'"text"', b"42"],
    ids=["empty", "truncated", "text", "bad-utf8", "array", "null", "string", "number"],
)
def test_envelope_that_is_not_a_json_object_is_malformed(raw: bytes) -> None:
    with pytest.raises(ValueError, match="malformed event envelope"):
        RecordedEvent.from_json(raw)


@pytest.mark.parametrize(
    "changes",
    [
        {"version": "2"},
        {"version": True},
        {"version": 2.0},
        {"version": 0},
        {"position": "41"},
        {"position": 0},
        {"schema_version": None},
        {"stream_id": 5},
        {"event_type": None},
        {"payload": []},
        {"metadata": "req-1"},
        {"recorded_at": 1_700_000_000},
    ],
    ids=lambda c: f"{next(iter(c))}={next(iter(c.values()))!r}",
)
def test_envelope_with_a_wrong_type_or_range_is_malformed(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="malformed event envelope"):
        RecordedEvent.from_json(json.dumps(body(**changes)).encode())


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"recorded_at": "2026-03-04T05:06:07"}, "no time zone"),
        ({"recorded_at": "yesterday"}, "isoformat"),
        ({"event_id": "not-a-uuid"}, "UUID"),
    ],
)
def test_envelope_with_a_bad_value_is_a_value_error(changes: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        RecordedEvent.from_json(json.dumps(body(**changes)).encode())


def test_envelope_with_a_numeric_event_id_is_malformed() -> None:
    with pytest.raises(ValueError, match="malformed event envelope"):
        RecordedEvent.from_json(json.dumps(body(event_id=123)).encode())
