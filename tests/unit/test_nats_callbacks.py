"""nats-py's connection callbacks: one line per outage window, no traceback, no disconnect line while stopping."""

from __future__ import annotations

import logging

import nats.errors
import pytest

from core.log_throttle import LogThrottle
from core.nats_callbacks import NatsConnectionLog

LOGGER = "tests.nats_callbacks"


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def test_failed_attempts_are_one_warning_a_window_with_the_count(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    clock = Clock()
    callbacks = NatsConnectionLog(logging.getLogger(LOGGER), "outbox relay", throttle=LogThrottle(10.0, clock))
    refused = ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 4222)")
    for second in range(12):  # nats-py retries once a second
        clock.now = float(second)
        await callbacks.error(refused)
    lines = [(r.levelno, r.getMessage(), r.exc_info) for r in caplog.records if r.name == LOGGER]
    assert lines == [
        (logging.WARNING, "outbox relay: NATS (JetStream) unavailable: [Errno 111] Connect call failed "
         "('127.0.0.1', 4222)", None),
        (logging.WARNING, "outbox relay: NATS (JetStream) unavailable: [Errno 111] Connect call failed "
         "('127.0.0.1', 4222) (and 9 more like it since the last one logged)", None),
    ]  # fmt: skip


async def test_a_disconnect_is_logged_unless_stopping(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    stopping = False
    callbacks = NatsConnectionLog(logging.getLogger(LOGGER), "projector", stopping=lambda: stopping)
    await callbacks.disconnected()
    await callbacks.reconnected()
    stopping = True
    await callbacks.disconnected()
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        "projector: disconnected from NATS (JetStream); reconnecting",
        "projector: reconnected to NATS (JetStream)",
    ]


async def test_a_server_error_is_not_called_an_outage(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    callbacks = NatsConnectionLog(logging.getLogger(LOGGER), "projector")
    await callbacks.error(nats.errors.Error("nats: permissions violation for subscription to 'x'"))
    await callbacks.error(nats.errors.UnexpectedEOF())
    await callbacks.error(ConnectionRefusedError(111, "Connect call failed"))
    assert [r.getMessage() for r in caplog.records if r.name == LOGGER] == [
        "projector: NATS (JetStream) error: nats: permissions violation for subscription to 'x'",
        "projector: NATS (JetStream) unavailable: nats: unexpected EOF",
    ]
