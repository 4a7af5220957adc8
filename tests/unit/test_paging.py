"""The ListOrders page-token codec, page sizes and keyset query (pure code, no server)."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest

from core.errors import InvalidArgument
from query_service.paging import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    Cursor,
    ListFilter,
    decode_page_token,
    effective_page_size,
    encode_page_token,
    fit_page,
    page_budget,
)
from query_service.read_model import listing_query

ALL = ListFilter()
CURSOR = Cursor(created_at_ms=1_740_830_400_123, order_id="0b9f7c7e-3f7e-4c1e-9a55-3c0d7f1f2a10")


def _fields(error: InvalidArgument) -> list[str]:
    return [violation.field for violation in error.violations]


def _token(payload: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "filters", [ALL, ListFilter(customer_id="alice"), ListFilter(status="PLACED"), ListFilter("bob", "DRAFT")]
)
def test_a_token_round_trips_with_the_same_filters(filters: ListFilter) -> None:
    token = encode_page_token(CURSOR, filters)

    assert decode_page_token(token, filters) == CURSOR


def test_a_token_is_url_safe_compact_and_unpadded() -> None:
    token = encode_page_token(Cursor(0, "ü/+?" * 10), ALL)

    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert len(encode_page_token(CURSOR, ListFilter("a" * 36, "CANCELLED"))) < 200


@pytest.mark.parametrize(
    ("issued_for", "used_with"),
    [
        (ALL, ListFilter(customer_id="alice")),
        (ListFilter(customer_id="alice"), ALL),
        (ListFilter(status="PLACED"), ListFilter(status="DRAFT")),
        (ListFilter("alice", "PLACED"), ListFilter("alice", None)),
        # The fingerprint is of the pair, so a value cannot move from one filter to the other.
        (ListFilter(customer_id="DRAFT"), ListFilter(status="DRAFT")),
    ],
)
def test_a_token_used_with_other_filters_is_rejected(issued_for: ListFilter, used_with: ListFilter) -> None:
    token = encode_page_token(CURSOR, issued_for)

    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(token, used_with)

    assert _fields(caught.value) == ["page_token"]
    assert "different filters" in caught.value.violations[0].description


@pytest.mark.parametrize(
    "garbled",
    [
        "x",
        "not base64!",
        "====",
        "A" * 2000,
        base64.urlsafe_b64encode(b"\xff\xfe not utf-8").decode(),
        _token("just a string"),
        _token([1, 2]),
        _token({"v": 2, "t": 1, "i": "a", "f": ALL.fingerprint()}),
        _token({"v": 1, "t": "1", "i": "a", "f": ALL.fingerprint()}),
        _token({"v": 1, "t": True, "i": "a", "f": ALL.fingerprint()}),
        _token({"v": 1, "t": 1.5, "i": "a", "f": ALL.fingerprint()}),
        _token({"v": 1, "t": 1, "i": 7, "f": ALL.fingerprint()}),
        _token({"v": 1, "t": 1, "f": ALL.fingerprint()}),
        _token({"v": 1, "t": 10**20, "i": "a", "f": ALL.fingerprint()}),
    ],
)
def test_a_garbled_token_is_invalid_argument_on_page_token(garbled: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(garbled, ALL)

    assert _fields(caught.value) == ["page_token"]


def test_a_truncated_token_is_rejected() -> None:
    token = encode_page_token(CURSOR, ALL)

    with pytest.raises(InvalidArgument):
        decode_page_token(token[: len(token) // 2], ALL)


def test_the_cursor_keeps_milliseconds_exactly() -> None:
    created_at = dt.datetime(2025, 3, 1, 12, 0, 0, 123000, tzinfo=dt.UTC)

    cursor = Cursor.after(created_at, "id")

    assert cursor.created_at_ms == 1_740_830_400_123
    assert cursor.created_at == created_at
    assert Cursor.after(created_at.replace(tzinfo=None), "id") == cursor  # naive means UTC
    assert Cursor.after(dt.datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=dt.UTC), "x").created_at_ms == -1


@pytest.mark.parametrize(
    ("requested", "effective"),
    [(0, DEFAULT_PAGE_SIZE), (1, 1), (50, 50), (500, 500), (501, MAX_PAGE_SIZE), (2**31 - 1, MAX_PAGE_SIZE)],
)
def test_page_size_defaults_and_clamps(requested: int, effective: int) -> None:
    assert effective_page_size(requested) == effective
    assert (DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE) == (50, 500)


def test_a_negative_page_size_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument) as caught:
        effective_page_size(-1)

    assert _fields(caught.value) == ["page_size"]


def test_the_first_page_query_filters_live_orders_only() -> None:
    assert listing_query(ALL, None) == {"deleted": False}
    assert listing_query(ListFilter("alice", "PLACED"), None) == {
        "deleted": False,
        "customer_id": "alice",
        "status": "PLACED",
    }


def test_a_later_page_query_starts_strictly_after_the_cursor() -> None:
    query = listing_query(ListFilter(customer_id="alice"), CURSOR)

    assert query == {
        "deleted": False,
        "customer_id": "alice",
        "created_at": {"$lte": CURSOR.created_at},
        "$or": [{"created_at": {"$lt": CURSOR.created_at}}, {"_id": {"$lt": CURSOR.order_id}}],
    }


# ------------------------------------------------------------------------------------------ crafted tokens


_ID = "0b9f7c7e-3f7e-4c1e-9a55-3c0d7f1f2a10"


@pytest.mark.parametrize(
    "payload",
    [
        {"v": 1, "t": 1, "i": "not-an-id", "f": ALL.fingerprint()},
        {"v": 1, "t": 1, "i": "\ud800", "f": ALL.fingerprint()},
        {"v": True, "t": 1, "i": _ID, "f": ALL.fingerprint()},
        {"v": 1.0, "t": 1, "i": _ID, "f": ALL.fingerprint()},
        {"v": 1, "t": 1.5, "i": _ID, "f": ALL.fingerprint()},
        {"v": 1, "t": 10**200, "i": _ID, "f": ALL.fingerprint()},
        {"v": 1, "t": 1, "i": _ID, "f": ALL.fingerprint(), "extra": 1},
    ],
)
def test_a_token_with_wrong_types_or_values_is_rejected(payload: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        decode_page_token(_token(payload), ALL)

    assert _fields(caught.value) == ["page_token"]


def test_a_deeply_nested_token_is_rejected_not_a_crash() -> None:
    deep = base64.urlsafe_b64encode(b"[" * 3000).decode().rstrip("=")

    with pytest.raises(InvalidArgument):
        decode_page_token(deep, ALL)


# ---------------------------------------------------------------------------------------- pages by size


def test_a_page_ends_at_its_size_or_at_the_byte_budget_whichever_comes_first() -> None:
    assert fit_page([10] * 10, page_size=4, budget=1_000) == 4
    assert fit_page([100] * 10, page_size=10, budget=3 * 102) == 3  # each item: 1 tag + 1 length byte + 100
    assert fit_page([100] * 10, page_size=10, budget=3 * 102 - 1) == 2
    assert fit_page([], page_size=10, budget=1_000) == 0


def test_a_page_always_holds_at_least_one_item() -> None:
    assert fit_page([5_000, 1], page_size=10, budget=1_000) == 1


def test_the_budget_leaves_room_for_the_rest_of_the_response_and_never_exceeds_4_mib() -> None:
    assert page_budget(4 * 1024 * 1024) < 4 * 1024 * 1024
    assert page_budget(64 * 1024 * 1024) == page_budget(4 * 1024 * 1024)
    assert 0 < page_budget(16 * 1024) <= 16 * 1024
