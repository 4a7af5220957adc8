"""One line of status on a terminal (progress of `cqrs verify` and `cqrs rebuild`), redrawn in place at most every
`redraw_seconds`; nothing is written when the stream is not a terminal (logs, pipes, CI)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class StatusLine:
    def __init__(self, enabled: bool, stream: TextIO | None = None, redraw_seconds: float = 0.1) -> None:
        self._stream = stream or sys.stderr
        self.enabled = enabled and self._stream.isatty()
        self._redraw_seconds = redraw_seconds
        self._drawn_at = 0.0

    def due(self, force: bool = False) -> bool:
        """Whether a redraw is wanted now (always when `force`); the caller then builds the text and `show`s it."""
        return self.enabled and (force or time.monotonic() - self._drawn_at >= self._redraw_seconds)

    def show(self, text: str) -> None:
        self._drawn_at = time.monotonic()
        self._stream.write("\r\x1b[2K" + text)
        self._stream.flush()

    def clear(self) -> None:
        if self.enabled:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()
