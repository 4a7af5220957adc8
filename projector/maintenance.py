"""The projector's periodic background work, beside the consume loop (`projector.runner` supervises both loops).

* `resume_parked`: counts the parked streams by kind (metric) and resumes the self-healing ones whose cause is
  gone (`projector.repair.Repairer.resume_held_many`). Every replica runs it: a park records no partition, and an
  event an older build cannot understand must be resumed by whichever replica is up to date (guarantee 10);
  replicas that repeat each other's resumption are settled by the version guard and the park ids.
* `sweep_sales_tags`: forgets the sales facts' tags no batch can need any more (`projector.sales_tags`), in one
  replica only.

Both wait for MongoDB (the consume loop reports it down) rather than fail, log what they could not do, and wake
up at once when the projector stops.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from pymongo.errors import PyMongoError

from core.dependency_metrics import DependencyMetrics
from projector.config import ProjectorSettings
from projector.health import ProjectorStats
from projector.metrics import ProjectorMetrics
from projector.mongo_watch import short_error
from projector.pipeline import Pipeline
from projector.planning import POISON, SELF_HEALING_KINDS
from projector.repair import Repairer

log = logging.getLogger(__name__)

# Parked streams whose held copies are read (and, if their cause is gone, resumed) together.
RESUME_STREAMS_PER_ROUND = 100
# The sweep's MongoDB calls in the dependency metrics: background work between batches, part of none
# (`bench.table` says so beside the batches' calls).
SALES_TAG_SWEEP_OPERATION = "sales_tags_sweep"


class Maintenance:
    """The periodic loops of one projector replica. `current` gives the pipeline and the repairer of the
    generation written now (they change at a cutover); `sweeps_sales_tags` says whether this replica sweeps;
    `sleep` waits, returning early when `stopping` is set."""

    def __init__(
        self,
        settings: ProjectorSettings,
        stats: ProjectorStats,
        metrics: ProjectorMetrics,
        deps: DependencyMetrics,
        *,
        current: Callable[[], tuple[Pipeline, Repairer]],
        sweeps_sales_tags: Callable[[], bool],
        stopping: asyncio.Event,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self._settings = settings
        self._stats = stats
        self._metrics = metrics
        self._deps = deps
        self._current = current
        self._sweeps_sales_tags = sweeps_sales_tags
        self._stopping = stopping
        self._sleep = sleep

    def _due(self) -> bool:
        """Whether a round may run now: the projector is not stopping and MongoDB answered last time."""
        return not self._stopping.is_set() and self._stats.mongo_available

    async def resume_parked(self) -> None:
        """Every `CQRS_PROJECTOR_RESUME_INTERVAL_SECONDS` until stopped: counts the parked streams, resumes the
        self-healing ones whose cause is gone."""
        while not self._stopping.is_set():
            await self._sleep(self._settings.projector_resume_interval_seconds)
            if not self._due():
                continue
            pipeline, repairer = self._current()
            try:
                counts = await pipeline.parks.count_by_kind()
                for kind in {POISON, *SELF_HEALING_KINDS} | set(counts):
                    self._metrics.parked_streams.labels(kind).set(counts.get(kind, 0))
                parks = await pipeline.parks.parks(SELF_HEALING_KINDS)
                for start in range(0, len(parks), RESUME_STREAMS_PER_ROUND):
                    if self._stopping.is_set():
                        break
                    results = await repairer.resume_held_many(parks[start : start + RESUME_STREAMS_PER_ROUND])
                    self._stats.resumed += sum(1 for result in results if result.resumed)
            except PyMongoError as exc:
                log.warning("could not look at the parked streams: %s", short_error(exc))

    async def sweep_sales_tags(self) -> None:
        """Every `CQRS_PROJECTOR_SALES_TAG_SWEEP_SECONDS` until stopped, in the replica that sweeps: forgets the
        sales facts' tags that no batch can need any more."""
        while not self._stopping.is_set():
            await self._sleep(self._settings.projector_sales_tag_sweep_seconds)
            if not self._sweeps_sales_tags():
                self._metrics.sales_tags_held.set(0)  # the sweeping replica reports them (dashboards take the max)
                continue
            if not self._due():
                continue
            pipeline, _ = self._current()
            try:
                async with self._deps.timed("mongodb", SALES_TAG_SWEEP_OPERATION):
                    swept = await pipeline.sales_tags.sweep()
            except PyMongoError as exc:
                log.warning("could not sweep the sales report's tags: %s", short_error(exc))
                continue
            self._metrics.sales_tags_held.set(swept.held)
            self._metrics.sales_tags_forgotten.inc(swept.forgotten)
