"""Progress of a rebuild: a one-line display on stderr (events done, events/s, ETA), drawn only when stderr is a
terminal, and Prometheus metrics (`cqrs rebuild --metrics-port`, for the Kubernetes Job)."""

from __future__ import annotations

import time
from typing import Final, TextIO

from prometheus_client import CollectorRegistry, Counter, Gauge

from cqrsctl.status_line import StatusLine


def eta_text(done: int, total: int, elapsed: float) -> str:
    """`m:ss` (or `h:mm:ss`) left at the rate so far; `?` before there is a rate or when the total is unknown."""
    if done <= 0 or total <= done or elapsed <= 0:
        return "?" if total > done else "0:00"
    seconds = int((total - done) * elapsed / done)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


STATES: Final = ("building", "caught_up", "compared", "switching", "active")


class RebuildMetrics:
    """What a scraper sees of a running rebuild: events applied and left, the generation, its state."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.applied = Counter(
            "cqrs_rebuild_events_applied", "Events applied to the generation being built", registry=registry
        )
        self.remaining = Gauge(
            "cqrs_rebuild_events_remaining", "About how many events are left to apply (0: caught up)", registry=registry
        )
        self.generation = Gauge("cqrs_rebuild_generation", "The generation built or switched to", registry=registry)
        self.held_back = Counter(
            "cqrs_rebuild_held_back_seconds",
            "Seconds the rebuild waited for the live read model to catch up (--max-live-lag)",
            registry=registry,
        )
        self._state = Gauge("cqrs_rebuild_state", "1 for the rebuild's current state", ["state"], registry=registry)

    def state(self, generation: int, state: str) -> None:
        self.generation.set(generation)
        for name in STATES:
            self._state.labels(name).set(1 if name == state else 0)


class RebuildProgress:
    """`start(label, total)` then `advance(n)` per batch; `close()` clears the line."""

    def __init__(self, enabled: bool, stream: TextIO | None = None, metrics: RebuildMetrics | None = None) -> None:
        self._metrics = metrics
        self._line = StatusLine(enabled, stream, redraw_seconds=0.2)
        self.enabled = self._line.enabled
        self._label = ""
        self._total = self._done = 0
        self._started = 0.0

    def start(self, label: str, total: int) -> None:
        self._label, self._total, self._done = label, total, 0
        if self._metrics is not None:
            self._metrics.remaining.set(total)
        self._started = time.monotonic()
        self._draw(force=True)

    def advance(self, count: int) -> None:
        self._done += count
        self._total = max(self._total, self._done)
        if self._metrics is not None:
            self._metrics.applied.inc(count)
            self._metrics.remaining.set(self._total - self._done)
        self._draw()

    def close(self) -> None:
        self._line.clear()

    def _draw(self, *, force: bool = False) -> None:
        if not self._line.due(force):
            return
        elapsed = time.monotonic() - self._started
        rate = self._done / elapsed if elapsed > 0 else 0.0
        eta = eta_text(self._done, self._total, elapsed)
        self._line.show(f"{self._label} {self._done:,}/~{self._total:,} events ({rate:,.0f} events/s, ETA {eta})")
