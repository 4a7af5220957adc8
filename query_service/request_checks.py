"""Checks of free-text request fields on the query side (filters), shared by the order and customer servicers.

The command side refuses control characters and lone surrogates in everything it stores, so a filter that
contains them cannot match anything; it is far more likely a client bug (or an attack on a driver) than a real
query, so it is INVALID_ARGUMENT with the field named, never a query sent to MongoDB.
"""

from __future__ import annotations

import unicodedata

from core.errors import FieldViolation


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
