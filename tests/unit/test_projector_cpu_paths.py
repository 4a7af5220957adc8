"""The projector's cheaper per-message paths give what the general ones gave."""

from __future__ import annotations

import pytest
from nats.aio.client import Client

from projector.nats_client import ProjectorNatsClient, parse_header_lines


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
