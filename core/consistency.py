"""Consistency tokens: what a command reply hands out and a query waits for (read-your-writes).

A token names one event stream and the version a command left it at. The read model reflects the token once
the projector has applied that stream up to that version (and every view derived from it). The text form is
opaque to clients: `v1.` + URL-safe base64 of compact JSON, so the format can change behind the version prefix.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

_PREFIX = "v1."
MAX_TOKEN_LENGTH = 512


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
    except (binascii.Error, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError("malformed consistency token") from exc
    if not (
        isinstance(token.stream_type, str)
        and isinstance(token.stream_id, str)
        and token.stream_type
        and token.stream_id
        and type(token.version) is int
        and type(token.position) is int
        and token.version >= 1
        and token.position >= 0
    ):
        raise ValueError("malformed consistency token")
    return token
