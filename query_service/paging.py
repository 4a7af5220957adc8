"""Keyset pagination for ListOrders, ListCustomers and GetOrderHistory: page sizes and opaque page tokens (pure).

Orders are listed newest first by `(created_at desc, _id desc)`. A page token names the last order of
the previous page by exactly that key, so the next page starts strictly after it: no `skip`, constant cost
per page, and orders inserted between two calls neither shift nor repeat the remaining pages.

Token format: urlsafe base64 (no padding) of the compact JSON
`{"v":1,"t":<created_at ms>,"i":"<_id>","f":"<hash>"}`, where `f` fingerprints the filters the token was
issued for. It is opaque to clients and may change with `v`.

A page holds at most `page_size` items and at most `page_budget(max_message_bytes)` encoded bytes of them
(`fit_page`): a page of big orders is cut early, and its token continues right after the last order it holds.

Customers are listed by `(name asc, _id asc)`; their token is `{"v":1,"n":"<name>","i":"<_id>","f":"<hash>"}`
with a fingerprint over the kind of listing and its filters, so neither kind of token is accepted by the other
listing.

An order's history is paged by version: its token is `{"v":1,"o":"<order_id>","a":<last version shown>}`.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeGuard

from core.errors import FieldViolation, InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
# gRPC clients refuse messages over 4 MiB unless they are configured otherwise, so pages stay below that even when
# the server itself allows larger messages.
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
# Room for the rest of a list response: its consistency report (up to 100 stream lags, ~7 KB) and the next-page
# token (~1.3 KB at most).
_RESPONSE_RESERVE_BYTES = 32 * 1024

_TOKEN_VERSION = 1
# Longer than any token we issue (orders: about 120 characters; customers: up to about 1,200 for a name of 200
# four-byte characters); rejects junk before decoding it.
_MAX_TOKEN_LENGTH = 4096
# Longer than any stored customer name (200 characters after stripping, on the command side).
_MAX_NAME_LENGTH = 1000
# Read-model ids: canonical UUIDs, as the command side generates them.
_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
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


def page_budget(max_message_bytes: int) -> int:
    """Bytes the items of one page may take in a response limited to `max_message_bytes` (and to 4 MiB)."""
    limit = min(max_message_bytes, DEFAULT_MAX_MESSAGE_BYTES)
    return max(limit - _RESPONSE_RESERVE_BYTES, limit // 2)


def fit_page(sizes: Iterable[int], page_size: int, budget: int) -> int:
    """How many leading items make a page: at most `page_size`, encoded within `budget` bytes, at least one.

    `sizes` are the items' encoded sizes (`ByteSize()`); each item of a repeated message field also costs its
    tag and length prefix. A single item larger than the budget still makes a page of one: a listing must make
    progress (such an item would not fit GetOrder either).
    """
    total = 0
    count = 0
    for size in sizes:
        if count >= page_size:
            break
        entry = 1 + _varint_length(size) + size
        if count and total + entry > budget:
            break
        total += entry
        count += 1
    return count


def _varint_length(value: int) -> int:
    return max(1, (value.bit_length() + 6) // 7)


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
    if set(payload) != {"v", "n", "i", "f"} or not _is_text(name, _MAX_NAME_LENGTH) or not _is_id(customer_id):
        raise _bad_token("is not a token this service issued")
    return CustomerCursor(name=name, customer_id=customer_id)


def encode_history_page_token(order_id: str, after_version: int) -> str:
    """The opaque token that continues an order's history after the event at `after_version`."""
    return _encode({"v": _TOKEN_VERSION, "o": order_id, "a": after_version})


def decode_history_page_token(token: str, order_id: str) -> int:
    """The version a history page continues after; InvalidArgument on `page_token` if garbled or issued for
    another order."""
    payload = _parse(token)
    after = payload.get("a")
    if set(payload) != {"v", "o", "a"} or not _is_int(after) or after < 1 or not _is_id(payload.get("o")):
        raise _bad_token("is not a token this service issued")
    if payload["o"] != order_id:
        raise _bad_token("was issued for another order; repeat the request with the same order_id")
    return after


def _parse(token: str) -> dict[str, Any]:
    """The JSON object inside a token, checked for our version; InvalidArgument for anything else.

    Tokens come back from clients, so anything may arrive here: deep nesting (RecursionError), other JSON types,
    floats or booleans where integers belong. Every such case is "not a token this service issued".
    """
    if len(token) > _MAX_TOKEN_LENGTH:
        raise _bad_token("is not a token this service issued")
    try:
        raw = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True)
        payload = json.loads(raw.decode("utf-8"))
    except (binascii.Error, ValueError, RecursionError) as exc:  # Unicode/JSON decode errors are ValueErrors
        raise _bad_token("is not a token this service issued") from exc
    if not isinstance(payload, dict) or not _is_int(payload.get("v")) or payload["v"] != _TOKEN_VERSION:
        raise _bad_token("is not a token this service issued")
    return payload


def _is_int(value: object) -> TypeGuard[int]:
    # bool is an int subclass: reject it explicitly so `true` is not read as 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: object) -> TypeGuard[str]:
    """Ids in the read model are canonical UUIDs; anything else in a token was not written by us."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def _is_text(value: object, max_length: int) -> TypeGuard[str]:
    """A string MongoDB can store: not too long and valid Unicode (a lone surrogate cannot be encoded)."""
    if not isinstance(value, str) or len(value) > max_length:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _cursor_from(payload: dict[str, Any]) -> Cursor:
    created_at_ms = payload.get("t")
    order_id = payload.get("i")
    if set(payload) != {"v", "t", "i", "f"} or not _is_int(created_at_ms) or not _is_id(order_id):
        raise _bad_token("is not a token this service issued")
    cursor = Cursor(created_at_ms=created_at_ms, order_id=order_id)
    try:
        cursor.created_at  # noqa: B018 - validates that the time is representable
    except OverflowError as exc:
        raise _bad_token("is not a token this service issued") from exc
    return cursor


def _bad_token(description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation("page_token", description)])
