"""A driver error's message on one line (logs, the cqrs tools' one-line errors)."""

from __future__ import annotations

from pymongo.errors import ServerSelectionTimeoutError

from core.error_text import MAX_LENGTH, describe_error
from projector.mongo_watch import short_error

SELECTION = ServerSelectionTimeoutError(
    "127.0.0.1:2: [Errno 111] Connection refused (configured timeouts: connectTimeoutMS: 20000.0ms), Timeout: 5.0s,"
    " Topology Description: <TopologyDescription id: 1, topology_type: Single, servers: [<ServerDescription ...>]>"
)


def test_pymongos_topology_description_is_cut_off() -> None:
    assert describe_error(SELECTION) == (
        "127.0.0.1:2: [Errno 111] Connection refused (configured timeouts: connectTimeoutMS: 20000.0ms), Timeout: 5.0s"
    )
    assert short_error(SELECTION) == f"ServerSelectionTimeoutError: {describe_error(SELECTION)}"


def test_one_line_at_most_max_length_and_never_empty() -> None:
    assert describe_error(RuntimeError("first line\n  detail\n  more")) == "first line"
    long = describe_error(ValueError("x" * 1000))
    assert len(long) == MAX_LENGTH and long.endswith("...")
    assert describe_error(TimeoutError()) == "TimeoutError"
