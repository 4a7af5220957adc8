"""The read model's write concern, as the projector and the `cqrs` tools both spell it (CQRS_MONGO_WRITE_CONCERN):
"majority" on a replica set, or a number of members. Every read-model write is also journaled (`j: true`)."""

from __future__ import annotations

import re
from typing import Final

DEFAULT_WRITE_CONCERN: Final = "majority"
WRITE_CONCERN_PATTERN: Final = r"^(majority|[1-9][0-9]?)$"


def is_write_concern(value: str) -> bool:
    return re.fullmatch(WRITE_CONCERN_PATTERN, value) is not None


def as_w(value: str) -> int | str:
    """A valid write concern as PyMongo's `w`: "majority" or an int."""
    return int(value) if value.isdigit() else value
