"""A one-line progress bar on stderr, drawn only when stderr is a terminal (never in logs or pipes)."""

from __future__ import annotations

import time
from typing import TextIO

from cqrsctl.status_line import StatusLine


class Progress:
    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self._line = StatusLine(enabled, stream, redraw_seconds=0.1)
        self.enabled = self._line.enabled
        self._phase = ""
        self._total = 0
        self._done = 0
        self._started = time.monotonic()

    def phase(self, name: str, total: int = 0) -> None:
        """Starts a new phase (e.g. `stream`, `orders`) counting up to `total` (0: unknown)."""
        self._phase, self._total, self._done = name, total, 0
        self._started = time.monotonic()
        self._draw(force=True)

    def advance(self, count: int = 1) -> None:
        self._done += count
        self._draw()

    def close(self) -> None:
        self._line.clear()

    def _draw(self, force: bool = False) -> None:
        if not self._line.due(force):
            return
        rate = self._done / max(time.monotonic() - self._started, 1e-9)
        if self._total:
            share = min(self._done / self._total, 1.0)
            bar = "#" * int(share * 30)
            text = f"verify {self._phase:<10} [{bar:<30}] {self._done:,}/{self._total:,} ({rate:,.0f}/s)"
        else:
            text = f"verify {self._phase:<10} {self._done:,} ({rate:,.0f}/s)"
        self._line.show(text)
