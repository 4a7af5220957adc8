"""The streams this replica last saw committed, decoded, so that most commands decide without reading PostgreSQL.

A command on a cached stream decides against the cached events and appends with the cached version as its
expected version. The append's own version check (and, for a precondition, its stream guard) is what makes that
safe: if another replica or a crashed attempt moved the stream meanwhile, the append writes nothing, the entry is
forgotten and the command is decided again from PostgreSQL. A rejection decided on cached events (a check that
failed) is also confirmed from PostgreSQL before it is returned, so a stale entry never changes an answer; it costs
at most one more round trip. Absent streams are never cached: a stream may appear at any moment. A creating
command (CreateOrder, RegisterCustomer) on a stream the cache does not hold is decided as the stream's first, without
a read; if the stream exists after all, the append's version check refuses it and the command is decided again on
the stream as read.

Trusted only while it pays: each stale entry costs a refused append and a second decision, more than the read a hit
saves. Where clients spread one aggregate's commands over replicas (per-request round robin), most entries are
stale by the time they are used; `StaleRatio` follows the share of cached decisions that turned out stale, and
above DISTRUST_ABOVE the cache answers only every PROBE_EVERY-th read (to keep measuring) and the others read
PostgreSQL, until the share falls below TRUST_BELOW again. Entries are kept current all the while.

Bounded: least recently used streams go first once the cache holds `CQRS_STREAM_CACHE_SIZE` streams (0 turns it
off) or EVENTS_PER_STREAM times as many events (~200 bytes each), so a few very long streams cannot grow it
without bound; a stream longer than that on its own is never kept.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace

from prometheus_client import CollectorRegistry, Counter, Gauge

from command_service.event_store import CommandReply, EventStore
from core.events import Event, decode_event

log = logging.getLogger(__name__)

# The cache's bound in events, per stream of its capacity: typical orders hold a handful.
EVENTS_PER_STREAM = 20
# Trust (see the module docstring): a stale decision costs about three round trips and a hit saves one, so the
# cache stops answering when a quarter of its decisions are stale, and answers again below a tenth.
DISTRUST_ABOVE = 0.25
TRUST_BELOW = 0.10
PROBE_EVERY = 16
STALE_WINDOW = 64  # decisions: the ratio is an exponential average over about this many


class StaleRatio:
    """The share of cached decisions that turned out stale, an exponential average over the last ~`window`, and
    whether the cache is trusted (with hysteresis between the two thresholds)."""

    def __init__(self, window: int = STALE_WINDOW) -> None:
        self._weight = 1.0 / window
        self.ratio = 0.0
        self.trusted = True
        self._reads = 0  # while distrusted: which read is the next probe

    def answers(self) -> bool:
        """Whether this read may be answered from the cache: always while trusted, else every PROBE_EVERY-th."""
        if self.trusted:
            return True
        self._reads += 1
        return self._reads % PROBE_EVERY == 0

    def decided(self) -> bool:
        """A decision was made on a cached entry; returns whether that changed the trust."""
        self.ratio *= 1.0 - self._weight
        return self._update()

    def stale(self) -> bool:
        """A cached entry a decision was made on turned out to be behind PostgreSQL; whether trust changed."""
        self.ratio += self._weight
        return self._update()

    def _update(self) -> bool:
        if self.trusted and self.ratio > DISTRUST_ABOVE:
            self.trusted = False
            log.warning(
                "stream cache: %.0f%% of recent cached decisions were stale (another replica wrote those streams): "
                "reading PostgreSQL for commands until that falls below %.0f%%; route an aggregate's commands to "
                "one replica to benefit from the cache", self.ratio * 100, TRUST_BELOW * 100,
            )  # fmt: skip
            return True
        if not self.trusted and self.ratio < TRUST_BELOW:
            self.trusted = True
            log.info("stream cache: stale decisions are down to %.0f%%; trusting the cache again", self.ratio * 100)
            return True
        return False


@dataclass(frozen=True, slots=True)
class StreamSnapshot:
    """A stream's events as committed up to `version`, decoded; `cached`: read from this replica's cache."""

    stream_type: str
    events: tuple[Event, ...]
    version: int
    position: int
    cached: bool = False


class CacheMetrics:
    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.reads = Counter(
            "cqrs_command_stream_cache_reads",
            "Stream reads for a command decision, by where they were answered from (hit: this replica's cache)",
            ["result"],
            registry=registry,
        )
        self.hits, self.misses = self.reads.labels("hit"), self.reads.labels("miss")
        self.stale = Counter(
            "cqrs_command_stream_cache_stale",
            "Cached streams that PostgreSQL showed to be behind (another writer moved them); decided again",
            registry=registry,
        )
        self.streams = Gauge("cqrs_command_stream_cache_streams", "Streams held in the cache", registry=registry)
        self.trusted = Gauge(
            "cqrs_command_stream_cache_trusted",
            "1 while commands decide on cached streams; 0 while too many cached decisions were stale (see the log)",
            registry=registry,
        )
        self.trusted.set(1)


class StreamCache:
    """Reads streams for command decisions, from the cache when it holds them (see the module docstring)."""

    def __init__(
        self,
        store: EventStore,
        capacity: int,
        registry: CollectorRegistry | None = None,
        trust: StaleRatio | None = None,
    ) -> None:
        self._store = store
        self._capacity = capacity
        self._max_events = capacity * EVENTS_PER_STREAM
        self._events = 0  # held in all entries
        self._entries: OrderedDict[str, StreamSnapshot] = OrderedDict()
        self._served: set[str] = set()  # streams whose entry a decision was made on since it was stored
        self._metrics = CacheMetrics(registry)
        self.trust = trust if trust is not None else StaleRatio()

    async def read(self, stream_id: str, *, fresh: bool = False) -> StreamSnapshot | None:
        """The stream as committed (None if it has no events); `fresh`: from PostgreSQL, whatever is cached."""
        if not fresh and stream_id in self._entries and self.trust.answers():
            cached = self._entries[stream_id]
            self._entries.move_to_end(stream_id)
            self._metrics.hits.inc()
            self._served.add(stream_id)
            if self.trust.decided():
                self._metrics.trusted.set(1 if self.trust.trusted else 0)
            return cached
        self._metrics.misses.inc()
        recorded = await self._store.load_stream(stream_id)
        if not recorded:
            self.forget(stream_id)
            return None
        last = recorded[-1]
        loaded = StreamSnapshot(
            stream_type=last.stream_type,
            events=tuple(decode_event(r.event_type, r.schema_version, r.payload) for r in recorded),
            version=last.version,
            position=last.position,
        )
        self._keep(stream_id, loaded)
        return loaded

    def unknown(self, stream_id: str) -> bool:
        """Whether the cache is on and does not hold this stream (a creating command may then assume it is new)."""
        return self._capacity > 0 and stream_id not in self._entries

    def appended(self, before: StreamSnapshot | None, events: Sequence[Event], reply: CommandReply) -> None:
        """Records a committed append of `events` on top of `before` (None: the stream's first append)."""
        base = before.events if before is not None else ()
        self._keep(reply.stream_id, StreamSnapshot(reply.stream_type, (*base, *events), reply.version, reply.position))

    def stale(self, stream_id: str) -> None:
        """PostgreSQL showed the stream to be behind what the decision saw: forget it (counted as stale when that
        decision was made on the cached entry)."""
        served = stream_id in self._served
        if self._drop(stream_id) and served:
            self._metrics.stale.inc()
            if self.trust.stale():
                self._metrics.trusted.set(1 if self.trust.trusted else 0)

    def forget(self, stream_id: str) -> None:
        self._drop(stream_id)

    def _keep(self, stream_id: str, snapshot: StreamSnapshot) -> None:
        if self._capacity <= 0:
            return
        current = self._entries.get(stream_id)
        if current is not None and current.version > snapshot.version:
            return  # a slower reader must not put back an older state than a later append left
        self._drop(stream_id)
        if len(snapshot.events) > self._max_events:
            return
        self._entries[stream_id] = replace(snapshot, cached=True)
        self._events += len(snapshot.events)
        while len(self._entries) > self._capacity or self._events > self._max_events:
            evicted_id, evicted = self._entries.popitem(last=False)
            self._served.discard(evicted_id)
            self._events -= len(evicted.events)
        self._metrics.streams.set(len(self._entries))

    def _drop(self, stream_id: str) -> bool:
        self._served.discard(stream_id)
        dropped = self._entries.pop(stream_id, None)
        if dropped is None:
            return False
        self._events -= len(dropped.events)
        self._metrics.streams.set(len(self._entries))
        return True


__all__ = ["StaleRatio", "StreamCache", "StreamSnapshot"]
