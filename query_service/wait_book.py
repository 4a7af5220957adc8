"""Pure bookkeeping of the shared consistency waiter: who waits for which stream, and what the next poll reads.

No I/O and no task here (see `query_service.consistency` for the waiter that runs the MongoDB query).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class TooManyWaiters(Exception):
    """More queries wait for tokens than the server allows (gRPC RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True, slots=True)
class Requirement:
    """One stream the read model must reflect up to `version`."""

    stream_type: str
    stream_id: str
    version: int


class VersionCache:
    """The highest applied version seen per stream (monotonic), bounded: least recently used entries go first.

    Forgetting an entry is harmless: the stream is simply read again when a token needs it.
    """

    def __init__(self, capacity: int = 100_000) -> None:
        self.capacity = capacity
        self._versions: OrderedDict[str, int] = OrderedDict()

    def get(self, stream_id: str) -> int:
        version = self._versions.get(stream_id)
        if version is None:
            return 0
        self._versions.move_to_end(stream_id)
        return version

    def raise_to(self, stream_id: str, version: int) -> None:
        """Records that `stream_id` is applied at least up to `version` (a lower value changes nothing)."""
        if version > self._versions.get(stream_id, 0):
            self._versions[stream_id] = version
        if stream_id in self._versions:
            self._versions.move_to_end(stream_id)
            while len(self._versions) > self.capacity:
                self._versions.popitem(last=False)

    def __len__(self) -> int:
        return len(self._versions)


@dataclass(eq=False)
class Ticket:
    """One waiting query: the versions it still needs per stream, and the future that wakes it.

    `offset` is where the next poll continues in `streams` when it cannot read all of them in one round; `since`
    is when the query began to wait (wall-clock seconds, comparable with the checkpoints' `updated_at`).
    """

    id: int
    missing: dict[str, int]
    since: float = 0.0
    future: asyncio.Future[None] | None = field(default=None, repr=False)
    streams: list[str] = field(default_factory=list, repr=False)
    offset: int = field(default=0, repr=False)


class WaitBook:
    """Which queries wait for which streams (pure: no I/O, no task).

    `observe(versions)` feeds in what the checkpoints say and returns the tickets now satisfied (and forgets
    them); `streams_to_poll(limit)` is what the next round must read.
    """

    def __init__(self, *, max_waiters: int, cache: VersionCache | None = None) -> None:
        self._max_waiters = max_waiters
        self.cache = cache or VersionCache()
        self._tickets: dict[int, Ticket] = {}
        self._by_stream: dict[str, set[int]] = {}
        self._ids = itertools.count(1)
        self._rotation = 0  # which ticket the next capped round starts with

    def forget_versions(self) -> None:
        """Forgets every version seen (they describe a read model no longer read); the tickets stay."""
        self.cache = VersionCache(self.cache.capacity)

    def unmet(self, requirements: Iterable[Requirement]) -> dict[str, int]:
        """stream id -> version of the requirements the cache does not already know to be reflected."""
        return {r.stream_id: r.version for r in requirements if self.cache.get(r.stream_id) < r.version}

    def add(self, missing: Mapping[str, int], since: float = 0.0) -> Ticket:
        """Registers a query waiting since `since`; TooManyWaiters when the book is full."""
        if len(self._tickets) >= self._max_waiters:
            raise TooManyWaiters(
                f"too many queries are waiting for consistency tokens ({self._max_waiters}); retry later"
            )
        ticket = Ticket(id=next(self._ids), missing=dict(missing), since=since, streams=list(missing))
        self._tickets[ticket.id] = ticket
        for stream_id in ticket.missing:
            self._by_stream.setdefault(stream_id, set()).add(ticket.id)
        return ticket

    def remove(self, ticket: Ticket) -> None:
        """Forgets a ticket (satisfied, timed out or cancelled); idempotent."""
        if self._tickets.pop(ticket.id, None) is None:
            return
        for stream_id in ticket.missing:
            waiting = self._by_stream.get(stream_id)
            if waiting is not None:
                waiting.discard(ticket.id)
                if not waiting:
                    del self._by_stream[stream_id]

    def observe(self, versions: Mapping[str, int]) -> list[Ticket]:
        """Records applied versions; returns (and removes) the tickets whose every stream is now reflected."""
        satisfied: list[Ticket] = []
        for stream_id, version in versions.items():
            self.cache.raise_to(stream_id, version)
            for ticket_id in list(self._by_stream.get(stream_id, ())):
                ticket = self._tickets[ticket_id]
                if all(self.cache.get(s) >= v for s, v in ticket.missing.items()):
                    satisfied.append(ticket)
                    self.remove(ticket)
        return satisfied

    def pending_streams(self) -> list[str]:
        return list(self._by_stream)

    def streams_to_poll(self, limit: int) -> list[str]:
        """At most `limit` distinct pending streams for the next round, shared fairly among the waiting queries.

        When everything fits, that is every pending stream. Otherwise the queries take turns: the first
        still-missing stream of each query, then the second of each, and so on, each query continuing where its
        previous round stopped and the round starting with a different query each time. A flood of queries with
        many (forged) tokens therefore costs a bounded query per round and cannot starve a query with one token:
        its stream is read within `ceil(queries / limit)` rounds.
        """
        if len(self._by_stream) <= limit:
            return list(self._by_stream)
        tickets = [t for t in self._tickets.values() if t.streams]
        start = self._rotation % len(tickets)
        active = tickets[start:] + tickets[:start]
        chosen: dict[str, None] = {}
        taken: dict[int, int] = {}
        stopped_after = start - 1  # the next capped round starts after the query this one ended with
        depth = 0
        while active and len(chosen) < limit:
            for ticket in active:
                stream = ticket.streams[(ticket.offset + depth) % len(ticket.streams)]
                taken[ticket.id] = depth + 1
                if self.cache.get(stream) < ticket.missing[stream]:
                    chosen[stream] = None
                    if len(chosen) >= limit:
                        stopped_after = tickets.index(ticket)
                        break
            depth += 1
            active = [t for t in active if len(t.streams) > depth]
        for ticket in tickets:
            ticket.offset = (ticket.offset + taken.get(ticket.id, 0)) % len(ticket.streams)
        self._rotation = stopped_after + 1
        return list(chosen)

    def tickets(self) -> list[Ticket]:
        return list(self._tickets.values())

    def __len__(self) -> int:
        return len(self._tickets)
