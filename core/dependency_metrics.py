"""Latency and failures of calls to PostgreSQL, NATS (JetStream) and MongoDB, in a process's registry.

`cqrs_dependency_call_seconds{dependency,operation}` times each call; `cqrs_dependency_call_errors_total` counts
the calls that raised. There is one pair of metric families per registry: `dependency_metrics(registry)` returns
the same instance to every component of a process, and a private registry when given none (tests).

    deps = dependency_metrics(registry)
    async with deps.timed("postgres", "append"):
        ...

`timed(...)` also works as a decorator of a coroutine function.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from types import TracebackType
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Histogram

Dependency = Literal["postgres", "nats", "mongodb"]

# From 0.5 ms (a primary-key read on a warm connection) to 10 s (timeouts); beyond that only the count matters.
DEPENDENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

_BY_REGISTRY: weakref.WeakKeyDictionary[CollectorRegistry, DependencyMetrics] = weakref.WeakKeyDictionary()


class DependencyMetrics:
    """The two metric families; build it with `dependency_metrics(registry)` (one per registry)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.seconds = Histogram(
            "cqrs_dependency_call_seconds",
            "Duration of calls to PostgreSQL, NATS and MongoDB, by dependency and operation",
            ["dependency", "operation"],
            buckets=DEPENDENCY_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "cqrs_dependency_call_errors_total",
            "Calls to PostgreSQL, NATS and MongoDB that failed, by dependency and operation",
            ["dependency", "operation"],
            registry=registry,
        )

    def timed(self, dependency: Dependency, operation: str, *, ignore: tuple[type[BaseException], ...] = ()) -> _Timed:
        """Times the enclosed call; an exception counts as an error unless it is one of `ignore` (then the call
        is neither timed nor counted, e.g. a long-poll fetch that found nothing). Cancellation is not an error."""
        return _Timed(self, dependency, operation, ignore)

    def error(self, dependency: Dependency, operation: str, count: int = 1) -> None:
        """Counts failures that did not raise (e.g. JetStream acks that did not come)."""
        self.errors.labels(dependency=dependency, operation=operation).inc(count)


class _Timed(contextlib.AsyncContextDecorator):
    def __init__(
        self,
        metrics: DependencyMetrics,
        dependency: Dependency,
        operation: str,
        ignore: tuple[type[BaseException], ...],
    ) -> None:
        self._metrics = metrics
        self._dependency = dependency
        self._operation = operation
        self._ignore = ignore
        self._start = 0.0

    def _recreate_cm(self) -> _Timed:  # a fresh timer per decorated call (calls may overlap)
        return _Timed(self._metrics, self._dependency, self._operation, self._ignore)

    async def __aenter__(self) -> _Timed:
        self._start = time.perf_counter()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        elapsed = time.perf_counter() - self._start
        if exc is not None and isinstance(exc, self._ignore):
            return
        labels = {"dependency": self._dependency, "operation": self._operation}
        self._metrics.seconds.labels(**labels).observe(elapsed)
        if exc is not None and isinstance(exc, Exception):  # not CancelledError / KeyboardInterrupt
            self._metrics.errors.labels(**labels).inc()


def dependency_metrics(registry: CollectorRegistry | None = None) -> DependencyMetrics:
    """The dependency metrics registered in `registry` (created on first use); a private registry if None."""
    if registry is None:
        return DependencyMetrics(CollectorRegistry())
    metrics = _BY_REGISTRY.get(registry)
    if metrics is None:
        metrics = _BY_REGISTRY[registry] = DependencyMetrics(registry)
    return metrics
