"""A driver error's message on one line, for logs and command-line tools."""

from __future__ import annotations

from typing import Final

MAX_LENGTH: Final = 300
# PyMongo appends the whole topology (every server and its last error) to a server-selection timeout.
_PYMONGO_TOPOLOGY: Final = ", Topology Description:"


def describe_error(exc: BaseException) -> str:
    """The error's first line without PyMongo's topology description, at most MAX_LENGTH characters; the type's
    name when the message is empty."""
    text = str(exc).split(_PYMONGO_TOPOLOGY, 1)[0].strip().split("\n", 1)[0].strip() or type(exc).__name__
    return text if len(text) <= MAX_LENGTH else text[: MAX_LENGTH - 3] + "..."
