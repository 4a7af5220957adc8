"""Consistency tokens: what a command reply hands out and a query waits for (read-your-writes).

A token names one event stream and the version a command left it at. The read model reflects the token once
the projector has applied that stream up to that version (and every view derived from it). The text form is
opaque to clients: `v1.` + URL-safe base64 of compact JSON, so the format can change behind the version prefix.

Tokens come back from clients, so they are input like any other: `decode_token` accepts only what a command
reply can have handed out (a known stream type, a canonical UUID stream id, versions that fit an int64) and says
why it refuses anything else, so a forged token is INVALID_ARGUMENT and never reaches MongoDB.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Final

from core.customer_events import CUSTOMER_STREAM_TYPE
from core.order_events import ORDER_STREAM_TYPE

_PREFIX: Final = "v1."
MAX_TOKEN_LENGTH: Final = 512
# Stream types a command reply can name; every other type is forged.
STREAM_TYPES: Final = frozenset({ORDER_STREAM_TYPE, CUSTOMER_STREAM_TYPE})
# Versions and positions are PostgreSQL bigints (and int64 in the protos).
MAX_INT64: Final = 2**63 - 1
# Stream ids are server-chosen UUIDs in canonical form (lower-case hex with hyphens), as `str(uuid.uuid4())`.
_STREAM_ID: Final = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True, slots=True)
class ConsistencyToken:
    stream_type: str
    stream_id: str
    version: int
    position: int

    def encode(self) -> str:
        body = json.dumps(
            {"t": self.stream_type, "s": self.stream_id, "v": self.version, "p": self.position},
            separators=(",", ":"),
        )
        return _PREFIX + base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode_token(text: str) -> ConsistencyToken:
    """Parses a token; raises ValueError with a reason for anything that is not one of ours."""
    if not text.startswith(_PREFIX) or len(text) > MAX_TOKEN_LENGTH:
        raise ValueError("not a consistency token from this service")
    raw = text[len(_PREFIX) :]
    try:
        body = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
        token = ConsistencyToken(stream_type=body["t"], stream_id=body["s"], version=body["v"], position=body["p"])
    except (binascii.Error, UnicodeDecodeError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise ValueError("malformed consistency token") from exc
    problem = _problem(token)
    if problem is not None:
        raise ValueError(f"malformed consistency token: {problem}")
    return token


def _problem(token: ConsistencyToken) -> str | None:
    """What makes a decoded token one this service cannot have issued (None when it could have)."""
    if not isinstance(token.stream_type, str) or token.stream_type not in STREAM_TYPES:
        return f"unknown stream type (known: {', '.join(sorted(STREAM_TYPES))})"
    if not isinstance(token.stream_id, str) or _STREAM_ID.fullmatch(token.stream_id) is None:
        return "the stream id is not an id this service issues"
    if not _is_int_between(token.version, 1, MAX_INT64):
        return f"the version must be an integer between 1 and {MAX_INT64}"
    if not _is_int_between(token.position, 0, MAX_INT64):
        return f"the position must be an integer between 0 and {MAX_INT64}"
    return None


def _is_int_between(value: Any, low: int, high: int) -> bool:
    # `type(...) is int`: JSON `true` would otherwise pass as 1.
    return type(value) is int and low <= value <= high
