"""Whether the read model (MongoDB) answers, as the projector's loops see it.

A loop asks `ready(probe)` before it fetches: while MongoDB is known to be down, one caller at a time runs the probe
(create the indexes the first time, else a ping) and backs off exponentially between attempts; the others wait
for its verdict. A failed write or read anywhere reports itself with `failed(exc)`, which logs what is down once
per failure and sets `cqrs_projector_mongo_up` to 0.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pymongo.errors import PyMongoError

from core.backoff import exponential
from core.error_text import describe_error
from projector.health import ProjectorStats
from projector.metrics import ProjectorMetrics

log = logging.getLogger("projector.runner")

# First delay of the MongoDB outage backoff; doubles per attempt up to `projector_max_backoff_seconds`.
MONGO_BACKOFF_BASE_SECONDS = 0.1


class MongoWatch:
    def __init__(
        self,
        stats: ProjectorStats,
        metrics: ProjectorMetrics,
        max_backoff: float,
        sleep: Callable[[float], Awaitable[None]],
        on_back: Callable[[], None],
    ) -> None:
        self._stats = stats
        self._metrics = metrics
        self._max_backoff = max_backoff
        self._sleep = sleep  # wakes up early when the projector stops
        self._on_back = on_back
        self._attempts = 0
        self._lock = asyncio.Lock()

    async def ready(self, probe: Callable[[], Awaitable[None]]) -> bool:
        """True when MongoDB is known to answer; else one probe (or the verdict of a concurrent one), backing off
        after a failure."""
        if not self._stats.mongo_available:
            async with self._lock:
                if not self._stats.mongo_available:
                    await self._probe(probe)
        return self._stats.mongo_available

    async def _probe(self, probe: Callable[[], Awaitable[None]]) -> None:
        try:
            await probe()
        except PyMongoError as exc:
            self.failed(exc)
            await self._sleep(self.backoff())
            return
        self._on_back()
        if self._attempts:
            log.info("read model (MongoDB) available again")
        self._attempts = 0
        self._stats.mongo_available = True
        self._metrics.mongo_up.set(1)

    def failed(self, exc: BaseException) -> None:
        self._attempts += 1
        self._stats.mongo_failures += 1
        self._stats.mongo_available = False
        self._metrics.mongo_up.set(0)
        log.warning("read model (MongoDB) unavailable: %s", short_error(exc))

    def backoff(self) -> float:
        return exponential(self._attempts, MONGO_BACKOFF_BASE_SECONDS, self._max_backoff)


def short_error(exc: BaseException) -> str:
    """`Type: message` on one line, without PyMongo's topology description."""
    return f"{type(exc).__name__}: {describe_error(exc)}"
