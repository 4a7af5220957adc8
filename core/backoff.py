"""Exponential backoff shared by every retry loop (relay, projector)."""

from __future__ import annotations

import random


def exponential(attempt: int, base: float, cap: float) -> float:
    """`base * 2**(attempt-1)`, capped; attempt 1 is the first retry."""
    return float(min(cap, base * 2 ** max(0, min(attempt - 1, 30))))


def full_jitter(attempt: int, base: float, cap: float) -> float:
    """A random delay in [0, exponential(...)]: spreads the retries of many clients hitting one outage."""
    return random.uniform(0, exponential(attempt, base, cap))
