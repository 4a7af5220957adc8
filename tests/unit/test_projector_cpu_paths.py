"""The projector's cheaper per-message paths give what the general ones gave."""

from __future__ import annotations

import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from projector.nats_client import ProjectorNatsClient, _takes_queued_first, parse_header_lines


@pytest.mark.parametrize(
    "raw",
    [
        b"Nats-Msg-Id: 1f0c\r\nCqrs-Version: 3\r\nCqrs-Recorded-At: 2025-03-04T05:06:07+00:00\r\n\r\n",
        b"Name:Value\r\nTabbed:\tv \r\n",
        b"Bad Name: x\r\nTab\tName: y\r\nFs\x1cName: z\r\nok: 1\r\n",
        b"no colon here\r\n\r\n: empty name\r\n",
        "Caf\u00e9: x\r\nUtf: caf\u00e9\r\n".encode() + b"Broken: \xff\xfe\r\n",
        b"",
    ],
)
def test_header_parsing_matches_nats_py(raw: bytes) -> None:
    assert parse_header_lines(raw) == Client._parse_header_lines(raw)
    assert ProjectorNatsClient._parse_header_lines(raw) == Client._parse_header_lines(raw)


def test_only_nats_py_subscriptions_with_the_expected_queue_take_queued_messages_first() -> None:
    client = Client()
    assert _takes_queued_first(Subscription(client, 1, "a"))

    class OwnSubscription(Subscription):  # a release's (or anyone's) subclass keeps its own next_msg
        pass

    assert not _takes_queued_first(OwnSubscription(client, 2, "b"))
    changed = Subscription(client, 3, "c")
    del changed._pending_size  # a release that keeps its pending size elsewhere
    assert not _takes_queued_first(changed)
    changed = Subscription(client, 4, "d")
    changed._pending_queue = None  # type: ignore[assignment]  # ... or its queue
    assert not _takes_queued_first(changed)
