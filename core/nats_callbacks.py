"""nats-py's connection callbacks as log lines that say what is down, without a traceback per retry.

With `max_reconnect_attempts=-1` nats-py retries a lost (or never made) connection every `reconnect_time_wait`
seconds, and its default `error_cb` logs each failed attempt at ERROR with a full traceback: about thirty lines a
second for as long as NATS is down, with the first connection too. Here a failed attempt is one WARNING line, at
most one per window per process part (the count of the others is in the next one); a disconnect and a reconnect
are one line each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import nats.errors

from core.error_text import describe_error
from core.log_throttle import LogThrottle

# What a failed connection attempt or a lost connection raises (nats-py's TimeoutError is a TimeoutError).
CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    OSError,
    TimeoutError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.UnexpectedEOF,
    nats.errors.ConnectionClosedError,
)


class NatsConnectionLog:
    """The `error_cb`, `disconnected_cb` and `reconnected_cb` of one NATS client, logging as `who`."""

    def __init__(
        self,
        logger: logging.Logger,
        who: str,
        *,
        stopping: Callable[[], bool] = lambda: False,
        throttle: LogThrottle | None = None,
    ) -> None:
        self._log = logger
        self._who = who
        self._stopping = stopping
        self._throttle = throttle or LogThrottle()

    async def error(self, exc: Exception) -> None:
        # nats-py reports failed connection attempts and the server's -ERR lines (permissions, slow consumer) alike.
        outage = isinstance(exc, CONNECTION_ERRORS)
        what = "unavailable" if outage else "error"
        kind = what if outage else (what, type(exc))  # one outage is one kind, whatever each attempt raised
        self._throttle.log(
            self._log, logging.WARNING, kind, "%s: NATS (JetStream) %s: %s", self._who, what, describe_error(exc)
        )

    async def disconnected(self) -> None:
        if not self._stopping():
            self._log.warning("%s: disconnected from NATS (JetStream); reconnecting", self._who)

    async def reconnected(self) -> None:
        self._log.info("%s: reconnected to NATS (JetStream)", self._who)
