"""Retry policy: exponential backoff with jitter, on UNAVAILABLE and a server's CANCELLED only, bounded in attempts
and total time."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

T = TypeVar("T")

# Statuses that mean "the request did not take effect or is safe to repeat": commands carry a request_id the server
# deduplicates on, queries are reads. UNAVAILABLE: a replica or its database is down. CANCELLED: a replica that is
# shutting down (a rolling restart) cancels the calls it had received but not yet handed to a handler
# (grpc/grpc#41785); a call this client cancels itself raises asyncio.CancelledError instead, so it is never retried.
# DEADLINE_EXCEEDED, ABORTED, RESOURCE_EXHAUSTED etc. are the caller's call.
RETRYABLE: frozenset[grpc.StatusCode] = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a unary call is retried on a status in `RETRYABLE` (UNAVAILABLE, a server's CANCELLED).

    Attempt n (1-based) that failed is followed by a pause of `min(max_backoff, initial_backoff * multiplier**(n-1))`
    reduced by a random fraction of up to `jitter` (so replicas that failed together do not retry in lockstep).
    No attempt starts after `total_timeout` seconds from the first one, and each attempt's deadline is cut to fit.
    """

    max_attempts: int = 5
    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.2
    total_timeout: float = 20.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if self.initial_backoff < 0 or self.max_backoff < self.initial_backoff or self.multiplier < 1:
            raise ValueError("need 0 <= initial_backoff <= max_backoff and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("jitter must be within [0, 1]")
        if self.total_timeout <= 0:
            raise ValueError("total_timeout must be > 0")

    def backoff(self, failed_attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after the `failed_attempt`-th (1-based) attempt failed."""
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (failed_attempt - 1))
        return base * (1.0 - self.jitter * rand())


NO_RETRY = RetryPolicy(max_attempts=1)


def is_retryable(error: BaseException) -> bool:
    return isinstance(error, grpc.aio.AioRpcError) and error.code() in RETRYABLE


async def call_with_retry(
    attempt: Callable[[float], Awaitable[T]],
    policy: RetryPolicy,
    timeout: float,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> T:
    """Runs `attempt(deadline_seconds)` until it succeeds, fails with a non-retryable status, or the policy is spent.

    `attempt` must send the very same request each time (same request_id): that is what makes the repeat safe.
    The last error is raised unchanged.
    """
    started = time.monotonic()
    n = 0
    while True:
        n += 1
        remaining = policy.total_timeout - (time.monotonic() - started)
        try:
            return await attempt(max(0.001, min(timeout, remaining)))
        except grpc.aio.AioRpcError as error:
            if not is_retryable(error) or n >= policy.max_attempts:
                raise
            pause = policy.backoff(n)
            if time.monotonic() - started + pause >= policy.total_timeout:
                raise
            await sleep(pause)
