"""The open-loop arrival schedule and how totals are split between workers. Pure arithmetic."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ArrivalSchedule:
    """Arrivals at fixed intervals from `start`: arrival i is due at start + (i + phase) / rate.

    Each of P workers gets rate R/P and phase w/P, so together they arrive exactly every 1/R seconds instead of
    in bursts of P. The schedule never depends on replies: a slow reply does not delay the next arrival, which is
    what makes latencies measured from the intended time free of coordinated omission.
    """

    start: float
    rate: float
    phase: float = 0.0

    def intended(self, index: int) -> float:
        return self.start + (index + self.phase) / self.rate

    def due(self, now: float) -> int:
        """How many arrivals are due at `now` (arrivals 0 .. due-1 have an intended time <= now)."""
        if now < self.intended(0):
            return 0
        return int((now - self.start) * self.rate - self.phase) + 1

    def count_within(self, duration: float) -> int:
        """How many arrivals fall strictly before start + duration."""
        n = self.due(self.start + duration)
        while n > 0 and self.intended(n - 1) >= self.start + duration:
            n -= 1
        return n


def split_evenly(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers differing by at most one, larger ones first."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
