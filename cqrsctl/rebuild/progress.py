"""A one-line progress display on stderr (events done, events/s, ETA), drawn only when stderr is a terminal."""

from __future__ import annotations

import sys
import time
from typing import TextIO

_REDRAW_SECONDS = 0.2


def eta_text(done: int, total: int, elapsed: float) -> str:
    """`m:ss` (or `h:mm:ss`) left at the rate so far; `?` before there is a rate or when the total is unknown."""
    if done <= 0 or total <= done or elapsed <= 0:
        return "?" if total > done else "0:00"
    seconds = int((total - done) * elapsed / done)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class RebuildProgress:
    """`start(label, total)` then `advance(n)` per batch; `close()` clears the line."""

    def __init__(self, enabled: bool, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self.enabled = enabled and self._stream.isatty()
        self._label = ""
        self._total = self._done = 0
        self._started = self._drawn_at = 0.0

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._done = label, total, 0
        self._started = time.monotonic()
        self._draw(force=True)

    def advance(self, count: int) -> None:
        self._done += count
        self._total = max(self._total, self._done)
        self._draw()

    def close(self) -> None:
        if self.enabled:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()

    def _draw(self, *, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._drawn_at < _REDRAW_SECONDS:
            return
        self._drawn_at = now
        elapsed = now - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        eta = eta_text(self._done, self._total, elapsed)
        text = f"{self._label} {self._done:,}/~{self._total:,} events ({rate:,.0f} events/s, ETA {eta})"
        self._stream.write("\r\x1b[2K" + text)
        self._stream.flush()
