"""Checks of request fields on the query side (ids, free-text filters), shared by the order and customer tables.

Ids are accepted in the canonical hyphenated UUID form only: the read model is keyed by `str(uuid.UUID(...))`, and
accepting the other spellings `uuid.UUID` allows (braces, urn:uuid:, no hyphens) would only hide client bugs.

The command side refuses control characters and lone surrogates in everything it stores, so a filter that
contains them cannot match anything; it is far more likely a client bug (or an attack on a driver) than a real
query, so it is INVALID_ARGUMENT with the field named, never a query sent to MongoDB.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Callable
from typing import TypeVar

from core.errors import FieldViolation, InvalidArgument

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_Parsed = TypeVar("_Parsed")


def parse_uuid(raw: str, field: str) -> str:
    """The canonical (lower-case) form of a UUID; InvalidArgument on `field` otherwise."""
    if not raw:
        raise InvalidArgument([FieldViolation(field, "is required")])
    if not _UUID.fullmatch(raw):
        raise InvalidArgument([FieldViolation(field, "must be a UUID, e.g. 123e4567-e89b-12d3-a456-426614174000")])
    return str(uuid.UUID(raw))


def collect(violations: list[FieldViolation], parse: Callable[[], _Parsed]) -> _Parsed | None:
    """Runs a parser; its field violations are added to `violations` (None returned) so all are reported at once."""
    try:
        return parse()
    except InvalidArgument as exc:
        violations.extend(exc.violations)
        return None


def text_filter_violation(field: str, value: str, *, max_length: int) -> FieldViolation | None:
    """The violation of a free-text filter `value` (None when it is fine or empty)."""
    if len(value) > max_length:
        return FieldViolation(field, f"must be at most {max_length} characters long (got {len(value)})")
    for index, char in enumerate(value):
        category = unicodedata.category(char)
        if category == "Cc":
            return FieldViolation(
                field, f"must not contain control characters (found U+{ord(char):04X} at position {index})"
            )
        if category == "Cs":
            return FieldViolation(field, f"must be valid Unicode text (found a lone surrogate at position {index})")
    return None
