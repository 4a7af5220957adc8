"""Keyset pagination for ListOrders and ListCustomers: page sizes and the opaque page tokens (pure code, no I/O).

Orders are listed newest first by `(created_at desc, _id desc)`. A page token names the last order of
the previous page by exactly that key, so the next page starts strictly after it: no `skip`, constant cost
per page, and orders inserted between two calls neither shift nor repeat the remaining pages.

Token format: urlsafe base64 (no padding) of the compact JSON
`{"v":1,"t":<created_at ms>,"i":"<_id>","f":"<hash>"}`, where `f` fingerprints the filters the token was
issued for. It is opaque to clients and may change with `v`.

Customers are listed by `(name asc, _id asc)`; their token is `{"v":1,"n":"<name>","i":"<_id>","f":"<hash>"}`
with a fingerprint over the kind of listing and its filters, so neither kind of token is accepted by the other
listing.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from core.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500

_TOKEN_VERSION = 1
# Longer than any token we issue (orders: about 120 characters; customers: up to about 1,200 for a name of 200
# four-byte characters); rejects junk before decoding it.
_MAX_TOKEN_LENGTH = 4096
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_ONE_MS = dt.timedelta(milliseconds=1)


@dataclass(frozen=True, slots=True)
class ListFilter:
    """The filters of one ListOrders call; `status` is the read model's status string, None for "all"."""

    customer_id: str = ""
    status: str | None = None

    def fingerprint(self) -> str:
        """A short stable hash of the filters, so a token cannot be replayed against other filters."""
        canonical = json.dumps([self.customer_id, self.status or ""], separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class Cursor:
    """Sort key of the last order on a page: `created_at` in epoch ms (MongoDB's precision) and `_id`."""

    created_at_ms: int
    order_id: str

    @property
    def created_at(self) -> dt.datetime:
        """The key as an aware UTC datetime; exact, since BSON dates are whole milliseconds."""
        return _EPOCH + dt.timedelta(milliseconds=self.created_at_ms)

    @classmethod
    def after(cls, created_at: dt.datetime, order_id: str) -> Cursor:
        """The cursor for an order's sort key; a naive datetime is taken as UTC (PyMongo's default)."""
        if created_at.tzinfo is None:
            created_at = created_at.replace(tzinfo=dt.UTC)
        return cls(created_at_ms=(created_at - _EPOCH) // _ONE_MS, order_id=order_id)


def effective_page_size(requested: int) -> int:
    """AIP-158: 0 means the default, anything above the maximum is clamped, negative is an error."""
    if requested < 0:
        raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode_page_token(cursor: Cursor, filters: ListFilter) -> str:
    """The opaque token that continues a listing with `filters` after `cursor`."""
    return _encode(
        {
            "v": _TOKEN_VERSION,
            "t": cursor.created_at_ms,
            "i": cursor.order_id,
            "f": filters.fingerprint(),
        }
    )


def _encode(payload: dict[str, Any]) -> str:
    raw = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_page_token(token: str, filters: ListFilter) -> Cursor:
    """The cursor inside `token`; InvalidArgument on `page_token` if garbled or issued for other filters."""
    payload = _parse(token)
    if payload.get("f") != filters.fingerprint():
        raise _bad_token("was issued for different filters; repeat the request with the same filters")
    return _cursor_from(payload)


@dataclass(frozen=True, slots=True)
class CustomerFilter:
    """The filters of one ListCustomers call: a name prefix (as given) and a normalised email, "" for none."""

    name_prefix: str = ""
    email: str = ""

    def fingerprint(self) -> str:
        canonical = json.dumps(["customers", self.name_prefix, self.email], separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class CustomerCursor:
    """Sort key of the last customer on a page."""

    name: str
    customer_id: str


def encode_customer_page_token(cursor: CustomerCursor, filters: CustomerFilter) -> str:
    """The opaque token that continues a customer listing with `filters` after `cursor`."""
    return _encode({"v": _TOKEN_VERSION, "n": cursor.name, "i": cursor.customer_id, "f": filters.fingerprint()})


def decode_customer_page_token(token: str, filters: CustomerFilter) -> CustomerCursor:
    """The cursor inside `token`; InvalidArgument on `page_token` if garbled or issued for other filters."""
    payload = _parse(token)
    if payload.get("f") != filters.fingerprint():
        raise _bad_token("was issued for different filters; repeat the request with the same filters")
    name = payload.get("n")
    customer_id = payload.get("i")
    if not isinstance(name, str) or not isinstance(customer_id, str):
        raise _bad_token("is not a token this service issued")
    return CustomerCursor(name=name, customer_id=customer_id)


def _parse(token: str) -> dict[str, Any]:
    if len(token) > _MAX_TOKEN_LENGTH:
        raise _bad_token("is not a token this service issued")
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        payload = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _bad_token("is not a token this service issued") from exc
    if not isinstance(payload, dict) or payload.get("v") != _TOKEN_VERSION:
        raise _bad_token("is not a token this service issued")
    return payload


def _cursor_from(payload: dict[str, Any]) -> Cursor:
    created_at_ms = payload.get("t")
    order_id = payload.get("i")
    # bool is an int subclass: reject it explicitly so `true` is not read as 1 ms.
    if not isinstance(created_at_ms, int) or isinstance(created_at_ms, bool) or not isinstance(order_id, str):
        raise _bad_token("is not a token this service issued")
    cursor = Cursor(created_at_ms=created_at_ms, order_id=order_id)
    try:
        cursor.created_at  # noqa: B018 - validates that the time is representable
    except OverflowError as exc:
        raise _bad_token("is not a token this service issued") from exc
    return cursor


def _bad_token(description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation("page_token", description)])
