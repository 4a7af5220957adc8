"""Holding a rebuild back while the live read model lags PostgreSQL (`cqrs rebuild --max-live-lag`).

A rebuild writes to the same MongoDB as the live projectors. At full speed it takes the capacity they need: the
live read model falls behind, every client waiting for its own write (a consistency token) waits with it, and
the comparison then finds most sampled documents behind on the live side (a soak's second rebuild under a
saturating load: 8,451 of 8,843, the live side minutes behind, which no settle time resolves while the load
goes on). So, as an online schema change pauses its copy while the replicas lag, the build pauses between
batches while the live read model is more than `max_lag` seconds behind, and the comparison starts only once it
is not.

How far behind: the newest events PostgreSQL recorded more than `max_lag` seconds ago (`SAMPLE` of them, by
position: spread over the streams, so over the projectors' partitions), looked up in the live generation's
checkpoints; one that is not covered yet means the live side is at least that far behind. A parked stream waits
by design (guarantee 10, `cqrs dead-letters`) and does not count. Only live projectors catch up: with none alive
(no writer heartbeat within the writer TTL: projectors stopped, a read model restored from nothing) there is
nothing to protect or to wait for, and the build goes on.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import asyncpg
from pymongo.asynchronous.database import AsyncDatabase

from core.generations import live_writers
from cqrsctl.rebuild.progress import RebuildMetrics
from projector.parking import ParkStore, StreamState

log = logging.getLogger(__name__)

# Events looked up per check: enough that a partition behind is almost never missed (with one of three behind,
# 64 events all on the others has odds of 1 in 10^11), few enough for one short `$in` of checkpoints.
SAMPLE: Final = 64
POLL_SECONDS: Final = 1.0
# While held back, one log line this often (and one when the wait ends).
LOG_EVERY_SECONDS: Final = 30.0

# The newest events recorded before the cut-off, by position (the primary key, walked backwards from the end:
# a few seconds of events are skipped, not the store). Times are PostgreSQL's own on both sides.
_RECENT_SQL = """
SELECT stream_id, version, extract(epoch FROM clock_timestamp() - recorded_at)::float8 AS age
  FROM events
 WHERE recorded_at <= clock_timestamp() - make_interval(secs => $1::float8)
   AND stream_type = ANY($2::text[])
 ORDER BY position DESC
 LIMIT $3
"""


@dataclass(frozen=True, slots=True)
class RecentEvent:
    stream_id: str
    version: int
    age_seconds: float  # since PostgreSQL recorded it


def oldest_unapplied(events: Sequence[RecentEvent], states: Mapping[str, StreamState]) -> RecentEvent | None:
    """The oldest of `events` that the live checkpoints (`states`, by stream) do not cover. A stream without a
    checkpoint has none of its events applied; a parked stream waits by design and does not count."""
    behind = [
        e
        for e in events
        if (state := states.get(e.stream_id)) is None or (state.park is None and state.checkpoint < e.version)
    ]
    return max(behind, key=lambda e: e.age_seconds, default=None)


class LiveLagGate:
    """`wait()` returns once the live read model is at most `max_lag_seconds` behind PostgreSQL."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        base: AsyncDatabase[dict[str, Any]],
        live: AsyncDatabase[dict[str, Any]],
        stream_types: Iterable[str],
        *,
        max_lag_seconds: float,
        writer_ttl_seconds: float,
        timeout_seconds: float,
        metrics: RebuildMetrics | None = None,
    ) -> None:
        self._pool = pool
        self._metrics = metrics
        self._base = base
        self._live = ParkStore(live)
        self._stream_types = sorted(set(stream_types))
        self.max_lag_seconds = max_lag_seconds
        self._writer_ttl = writer_ttl_seconds
        self._timeout = timeout_seconds
        self.waited_seconds = 0.0  # in all, over every wait

    async def behind(self) -> RecentEvent | None:
        """An event recorded more than `max_lag_seconds` ago that the live read model has not applied (the oldest
        of those sampled), or None: within the limit, or no live projector to wait for."""
        if not await live_writers(self._base, self._writer_ttl):
            return None
        rows = await self._pool.fetch(
            _RECENT_SQL, self.max_lag_seconds, self._stream_types, SAMPLE, timeout=self._timeout
        )
        events = [RecentEvent(str(r["stream_id"]), int(r["version"]), float(r["age"])) for r in rows]
        return oldest_unapplied(events, await self._live.states(e.stream_id for e in events))

    async def wait(self, before: str) -> float:
        """Waits (polling every `POLL_SECONDS`) until the live read model is within the limit; `before` says what
        waits, for the log. Returns the seconds waited."""
        started = time.monotonic()
        logged_at: float | None = None
        while (event := await self.behind()) is not None:
            if logged_at is None or time.monotonic() - logged_at >= LOG_EVERY_SECONDS:
                log.info(
                    "the live read model is more than %gs behind PostgreSQL (%s v%d, recorded %.1fs ago, not applied "
                    "yet): %s waits for the projectors (held back %.0fs so far; --max-live-lag 0 never waits)",
                    self.max_lag_seconds, event.stream_id, event.version, event.age_seconds, before,
                    time.monotonic() - started,
                )  # fmt: skip
                logged_at = time.monotonic()
            slept = time.monotonic()
            await asyncio.sleep(POLL_SECONDS)
            if self._metrics is not None:
                self._metrics.held_back.inc(time.monotonic() - slept)
        if logged_at is None:
            return 0.0  # not held back: the check alone is not waiting
        waited = time.monotonic() - started
        log.info("the live read model is within %gs again after %.1fs: %s goes on", self.max_lag_seconds, waited,
                 before)  # fmt: skip
        self.waited_seconds += waited
        return waited
