"""In-process facts about the projector: health, throughput and lag statistics, whether its dependencies answer.

The runner logs a one-line summary of them periodically; `projector.metrics` exports the same facts to Prometheus
(`cqrs_projector_serving` is the health).
"""

from __future__ import annotations

import logging
import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from projector.settlement import BatchOutcome

log = logging.getLogger("projector.runner")  # the summary line has always been the runner's

RECENT_LAGS = 10_000

SERVING = "SERVING"
NOT_SERVING = "NOT_SERVING"


@dataclass(slots=True)
class ProjectorHealth:
    """SERVING while the projector runs and every essential background loop is up (not waiting to restart)."""

    started: bool = False
    loops_up: bool = True
    down: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        return SERVING if self.started and self.loops_up else NOT_SERVING

    @property
    def serving(self) -> bool:
        return self.status == SERVING


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of `values` (`fraction` in [0, 1]); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(slots=True)
class Summary:
    applied: int
    seconds: float
    duplicates: int
    gaps: int
    dead_letters: int
    lag_p50: float
    lag_p99: float

    @property
    def rate(self) -> float:
        return self.applied / self.seconds if self.seconds > 0 else 0.0


@dataclass(slots=True)
class ProjectorStats:
    """Counters since start plus a bounded window of recent lags (seconds from `recorded_at` to applied)."""

    applied: int = 0
    duplicates: int = 0
    gaps: int = 0
    dead_letters: int = 0
    conflicts: int = 0
    parked: int = 0  # streams this projector parked
    held: int = 0  # events of parked streams it copied and acknowledged
    resumed: int = 0  # parked streams it resumed
    mongo_failures: int = 0
    last_lag: float | None = None
    recent_lags: deque[float] = field(default_factory=lambda: deque(maxlen=RECENT_LAGS))
    mongo_available: bool = False
    last_batch_monotonic: float | None = None
    _interval_start: float = field(default_factory=time.monotonic)
    _interval_lags: list[float] = field(default_factory=list)
    _interval_applied: int = 0
    _interval_duplicates: int = 0
    _interval_gaps: int = 0
    _interval_dead_letters: int = 0

    def record_applied(self, lag_seconds: float) -> None:
        self.applied += 1
        self._interval_applied += 1
        self.last_lag = lag_seconds
        self.recent_lags.append(lag_seconds)
        if len(self._interval_lags) < RECENT_LAGS:
            self._interval_lags.append(lag_seconds)

    def record_duplicates(self, count: int) -> None:
        self.duplicates += count
        self._interval_duplicates += count

    def record_gaps(self, count: int) -> None:
        self.gaps += count
        self._interval_gaps += count

    def record_dead_letters(self, count: int) -> None:
        self.dead_letters += count
        self._interval_dead_letters += count

    def record_outcome(self, outcome: BatchOutcome) -> None:
        """Counts what one settled batch did."""
        now = datetime.now(UTC)
        for delivery in outcome.applied:
            self.record_applied((now - delivery.recorded.recorded_at).total_seconds())
        self.record_duplicates(outcome.duplicates)
        self.record_gaps(outcome.gaps)
        self.record_dead_letters(len(outcome.parks) + len(outcome.dead_letters))
        self.conflicts += outcome.conflicts
        self.parked += len(outcome.parks)
        self.held += outcome.held

    def lag_percentile(self, fraction: float) -> float:
        return percentile(list(self.recent_lags), fraction)

    def take_summary(self, min_interval_seconds: float, now: float | None = None) -> Summary | None:
        """The interval's summary if `min_interval_seconds` passed and events were applied, then starts anew."""
        now = time.monotonic() if now is None else now
        elapsed = now - self._interval_start
        if elapsed < min_interval_seconds:
            return None
        summary = None
        if self._interval_applied:
            summary = Summary(
                applied=self._interval_applied,
                seconds=elapsed,
                duplicates=self._interval_duplicates,
                gaps=self._interval_gaps,
                dead_letters=self._interval_dead_letters,
                lag_p50=percentile(self._interval_lags, 0.50),
                lag_p99=percentile(self._interval_lags, 0.99),
            )
        self._interval_start = now
        self._interval_lags = []
        self._interval_applied = self._interval_duplicates = self._interval_gaps = self._interval_dead_letters = 0
        return summary


def log_summary(stats: ProjectorStats, interval: float) -> None:
    """Logs one line of throughput and lag every `interval` seconds in which events were applied."""
    summary = stats.take_summary(interval)
    if summary is not None:
        log.info(
            "applied %d events in %.1fs (%.0f/s), lag p50 %.3fs p99 %.3fs; %d duplicates, %d gaps, %d dead letters",
            summary.applied,
            summary.seconds,
            summary.rate,
            summary.lag_p50,
            summary.lag_p99,
            summary.duplicates,
            summary.gaps,
            summary.dead_letters,
        )
