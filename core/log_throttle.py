"""Log lines that every failing request would repeat, limited: the first of a kind at once, then at most one per
window, saying how many were left out.

An outage fails every request that needs the dependency: at 1,000 requests a second that was 1,000 identical
warnings a second, which drowned every other line and cost the process CPU just when it had least to spare. The
RPC metrics (`cqrs_grpc_server_handled_total{method,code}`) still count every failure; the log says what is down,
once a window.

Left-out lines are counted into the next line of their kind; when none comes (the outage ended), the count is not
logged. Not thread-safe: each service runs its requests on one event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

DEFAULT_WINDOW_SECONDS = 10.0
# Kinds are (method, cause) pairs: a few dozen in a service. The bound only guards against a caller keying on
# something unbounded; past it every kind starts afresh.
MAX_KINDS = 1024


@dataclass(slots=True)
class _Kind:
    quiet_until: float
    left_out: int = 0


class LogThrottle:
    def __init__(
        self, window_seconds: float = DEFAULT_WINDOW_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._window = window_seconds
        self._clock = clock
        self._kinds: dict[Hashable, _Kind] = {}

    def log(self, logger: logging.Logger, level: int, kind: Hashable, msg: str, *args: object) -> None:
        """`logger.log(level, msg, *args)` unless a line of `kind` was logged less than a window ago."""
        if not logger.isEnabledFor(level):
            return
        now = self._clock()
        state = self._kinds.get(kind)
        if state is not None and now < state.quiet_until:
            state.left_out += 1
            return
        if state is None:
            if len(self._kinds) >= MAX_KINDS:
                self._kinds.clear()
            state = self._kinds[kind] = _Kind(quiet_until=now)
        left_out, state.left_out, state.quiet_until = state.left_out, 0, now + self._window
        if left_out:
            msg = f"{msg} (and {left_out} more like it since the last one logged)"
        logger.log(level, msg, *args, stacklevel=2)

    def clear(self) -> None:
        """Forget every kind (tests that count lines start from here)."""
        self._kinds.clear()


# The one throttle of a process's request paths (both gRPC servers' error mapping, authentication).
per_request = LogThrottle()
