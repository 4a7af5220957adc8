"""ListCustomers page tokens, email normalisation and the keyset query (pure code, no server)."""

from __future__ import annotations

import re

import pytest

from core.errors import InvalidArgument
from query_service.customer_read_model import customer_listing_query, normalize_email
from query_service.paging import (
    Cursor,
    CustomerCursor,
    CustomerFilter,
    ListFilter,
    decode_customer_page_token,
    decode_page_token,
    encode_customer_page_token,
    encode_page_token,
)

CURSOR = CustomerCursor(name='Zoë "Z" O\'Brien (Ltd.)', customer_id="0b9f7c7e-3f7e-4c1e-9a55-3c0d7f1f2a10")


@pytest.mark.parametrize(
    "filters", [CustomerFilter(), CustomerFilter(name_prefix="Zo"), CustomerFilter(email="z@example.com")]
)
def test_a_customer_token_round_trips_with_the_same_filters(filters: CustomerFilter) -> None:
    assert decode_customer_page_token(encode_customer_page_token(CURSOR, filters), filters) == CURSOR


def test_a_customer_token_is_refused_for_other_filters_and_by_the_order_listing() -> None:
    token = encode_customer_page_token(CURSOR, CustomerFilter(name_prefix="Zo"))

    for decode in (
        lambda: decode_customer_page_token(token, CustomerFilter(name_prefix="Z")),
        lambda: decode_customer_page_token(token, CustomerFilter()),
        lambda: decode_page_token(token, ListFilter()),
    ):
        with pytest.raises(InvalidArgument) as caught:
            decode()
        assert [v.field for v in caught.value.violations] == ["page_token"]


def test_an_order_token_is_refused_by_the_customer_listing() -> None:
    token = encode_page_token(Cursor(created_at_ms=1, order_id="x"), ListFilter())

    with pytest.raises(InvalidArgument):
        decode_customer_page_token(token, CustomerFilter())


def test_a_token_for_the_longest_name_fits() -> None:
    cursor = CustomerCursor(name="\U0001f600" * 200, customer_id="0b9f7c7e-3f7e-4c1e-9a55-3c0d7f1f2a10")

    token = encode_customer_page_token(cursor, CustomerFilter())

    assert decode_customer_page_token(token, CustomerFilter()) == cursor


def test_emails_are_normalised_like_the_command_side() -> None:
    assert normalize_email("  Ada@Example.COM\n") == "ada@example.com"
    assert normalize_email("") == ""


def test_the_listing_query_only_lists_customers_and_escapes_the_prefix() -> None:
    query = customer_listing_query(CustomerFilter(name_prefix="A.B (x)*"), None)

    assert query == {"version": {"$exists": True}, "name": {"$regex": "^" + re.escape("A.B (x)*")}}
    assert re.match(query["name"]["$regex"], "A.B (x)* Ltd") and not re.match(query["name"]["$regex"], "AxB (x)")


def test_the_listing_query_continues_strictly_after_the_cursor() -> None:
    query = customer_listing_query(CustomerFilter(email="a@b.co"), CustomerCursor("Bob", "id-7"))

    assert query == {
        "version": {"$exists": True},
        "email": "a@b.co",
        "name": {"$gte": "Bob"},
        "$or": [{"name": {"$gt": "Bob"}}, {"_id": {"$gt": "id-7"}}],
    }
