"""Read-your-writes: waiting until the read model reflects the consistency tokens a query carries.

The projector raises `checkpoints[stream_id].version` (with `$max`) last in every batch, after all derived views,
so a token `(stream_id, version)` is reflected once that checkpoint reaches its version.

Waiting is shared: one `ConsistencyWaiter` per server runs one background task, only while some query waits,
that reads the checkpoints of the pending streams with `find({_id: {$in: ...}})` every `poll_interval` seconds
and wakes every query whose tokens are now reflected. Tokens are client input, so a round is bounded: at most
`MAX_STREAMS_PER_POLL` streams, shared fairly among the waiting queries (see `WaitBook.streams_to_poll`), in
queries of at most `STREAMS_PER_QUERY` ids. The highest versions seen are cached (they only ever grow), so a
token that is already reflected costs no query at all. N waiting queries therefore cost one small round per
interval, not N queries in a busy loop.

The bookkeeping (`WaitBook`, in `query_service.wait_book`) is pure; `ConsistencyWaiter` adds the task and the
MongoDB queries.

Where a waiting query's time goes (`cqrs_query_stage_seconds`, `core.stage_metrics`): `consistency_wait` per query
that waited (its whole wait, answered or not), and `checkpoint_to_seen` per query answered by a poll: from the
moment it could have been answered (the latest `updated_at` of the checkpoints that poll found for it, or its
arrival if that came later) to the poll's answer, so the waiter's own share: up to a tick, plus the query.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from cqrs.orders.v1 import consistency_pb2
from prometheus_client import CollectorRegistry
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from core.consistency import ConsistencyToken, decode_token
from core.dependency_metrics import dependency_metrics
from core.errors import FieldViolation, Unavailable
from core.mongo_ids import IDS_PER_QUERY
from core.read_model import CHECKPOINTS_COLLECTION
from core.stage_metrics import StageMetrics
from core.tracing import detached_task
from query_service.read_model import read_model_outage
from query_service.wait_book import Requirement, TooManyWaiters, VersionCache, WaitBook

__all__ = [
    "CHECKPOINTS_COLLECTION",
    "ConsistencyWaiter",
    "Lag",
    "ReadYourWrites",
    "Requirement",
    "TooManyWaiters",
    "VersionCache",
    "WaitBook",
    "WaitOutcome",
    "parse_requirement",
    "parse_tokens",
    "wait_budget",
]

log = logging.getLogger(__name__)

# More tokens than any sensible client sends (one per command it issued before the query).
MAX_TOKENS: Final = 100
# Malformed tokens reported one by one; the rest are counted in one more violation, so that the error stays small.
MAX_REPORTED_TOKEN_VIOLATIONS: Final = 5
# One poll round reads at most this many distinct streams, in queries of at most STREAMS_PER_QUERY ids each, so
# that neither a query (a few tens of KB) nor a round grows with the number of waiting tokens: 10,000 waiters
# with 100 forged tokens each would otherwise be one `$in` of a million ids, over MongoDB's 16 MB limit. Short
# lists (`core.mongo_ids`): the local MongoDB-wire server's `$in` costs ids x documents found.
MAX_STREAMS_PER_POLL: Final = 5_000
STREAMS_PER_QUERY: Final = IDS_PER_QUERY
# Stop waiting a little before the caller's deadline, so it gets our answer (a stale one, or UNAVAILABLE with the
# lag) instead of its own DEADLINE_EXCEEDED: 50 ms plus 10% of the remaining time, at most 500 ms. The read after
# the wait needs that time on a slow or busy MongoDB.
_MARGIN_FRACTION: Final = 0.10
_MARGIN_BASE_SECONDS: Final = 0.05
_MARGIN_MAX_SECONDS: Final = 0.5


# ------------------------------------------------------------------------------------------- request parsing


def parse_tokens(tokens: Iterable[str], field_path: str) -> tuple[list[Requirement], list[FieldViolation]]:
    """The requirements of some tokens (one per stream, the highest version wins) and their field violations.

    `field_path` names the repeated field, e.g. `consistency.consistency_tokens`; a bad token at index i is
    reported as `<field_path>[i]`.
    """
    violations: list[FieldViolation] = []
    by_stream: dict[str, Requirement] = {}
    token_list = list(tokens)
    if len(token_list) > MAX_TOKENS:
        return [], [FieldViolation(field_path, f"at most {MAX_TOKENS} tokens are accepted")]
    unreported = 0
    for index, text in enumerate(token_list):
        try:
            token: ConsistencyToken = decode_token(text)
        except ValueError as exc:
            if len(violations) < MAX_REPORTED_TOKEN_VIOLATIONS:
                violations.append(FieldViolation(f"{field_path}[{index}]", f"{exc} (pass tokens exactly as received)"))
            else:
                unreported += 1
            continue
        known = by_stream.get(token.stream_id)
        if known is None or token.version > known.version:
            by_stream[token.stream_id] = Requirement(token.stream_type, token.stream_id, token.version)
    if unreported:
        # All of them would not fit the status trailers (gRPC's 16 KB metadata limit): the caller would see
        # RESOURCE_EXHAUSTED "Stream removed" instead of our answer.
        violations.append(FieldViolation(field_path, f"{unreported} more tokens are malformed"))
    return list(by_stream.values()), violations


def parse_requirement(
    consistency: consistency_pb2.ConsistencyRequirement, field_path: str = "consistency"
) -> tuple[list[Requirement], list[FieldViolation]]:
    """The requirements of a query's `consistency` field, and the violations of its malformed tokens."""
    return parse_tokens(consistency.consistency_tokens, f"{field_path}.consistency_tokens")


def wait_budget(time_remaining: float | None, max_wait: float) -> float:
    """Seconds a query may wait for its tokens: the caller's remaining deadline minus a margin, capped."""
    if time_remaining is None:
        return max_wait
    margin = min(_MARGIN_BASE_SECONDS + _MARGIN_FRACTION * time_remaining, _MARGIN_MAX_SECONDS)
    return max(0.0, min(max_wait, time_remaining - margin))


# ------------------------------------------------------------------------------------------------ outcome


@dataclass(frozen=True, slots=True)
class Lag:
    """A requirement the read model has not reached: it has applied `applied` (0: nothing) of `required`."""

    stream_type: str
    stream_id: str
    required: int
    applied: int


@dataclass(frozen=True, slots=True)
class WaitOutcome:
    """How a wait ended: `behind` is empty when every requirement is reflected."""

    waited_seconds: float
    behind: tuple[Lag, ...] = ()

    @property
    def reached(self) -> bool:
        return not self.behind

    @property
    def waited_ms(self) -> int:
        return round(self.waited_seconds * 1000)

    def read_consistency(self) -> consistency_pb2.ReadConsistency:
        """The `ReadConsistency` of a response answered after this wait (stale when something is behind)."""
        return consistency_pb2.ReadConsistency(
            stale=not self.reached,
            waited_ms=self.waited_ms,
            behind=[
                consistency_pb2.StreamLag(
                    stream_type=lag.stream_type,
                    stream_id=lag.stream_id,
                    required_version=lag.required,
                    applied_version=lag.applied,
                )
                for lag in self.behind
            ],
        )

    def describe(self) -> str:
        """A message for UNAVAILABLE: how far behind the read model is, per stream, and how long we waited."""
        streams = "; ".join(
            f"{lag.stream_type} {lag.stream_id} is at version {lag.applied}, the token needs {lag.required}"
            for lag in self.behind
        )
        return (
            f"the read model has not caught up with the consistency tokens after waiting "
            f"{self.waited_seconds:.3f}s: {streams}. Retry later, or set consistency.accept_stale to read "
            f"stale data"
        )


NO_WAIT: Final = WaitOutcome(waited_seconds=0.0)


# ------------------------------------------------------------------------------------- the shared waiter


class ConsistencyWaiter:
    """The one shared waiter of a server (see the module docstring). Not thread-safe: one event loop."""

    def __init__(
        self,
        checkpoints: AsyncCollection[dict[str, Any]],
        *,
        poll_interval: float = 0.015,
        max_waiters: int = 10_000,
        max_streams_per_poll: int = MAX_STREAMS_PER_POLL,
        streams_per_query: int = STREAMS_PER_QUERY,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._checkpoints = checkpoints
        self._max_streams_per_poll = max_streams_per_poll
        self._streams_per_query = streams_per_query
        self._deps = dependency_metrics(registry)
        self.stages = StageMetrics(
            "cqrs_query_stage_seconds", "Seconds a query waiting for consistency tokens spends in each stage", registry
        )
        self._poll_interval = poll_interval
        self._book = WaitBook(max_waiters=max_waiters)
        # Generation switches so far: checkpoints read before the last one say nothing about the database in use.
        self.switches = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closed = False
        self.queries = 0  # checkpoint queries run so far (tests and metrics)
        self.last_error: BaseException | None = None

    @property
    def waiting(self) -> int:
        return len(self._book)

    def use_database(self, database: AsyncDatabase[dict[str, Any]]) -> None:
        """Reads the checkpoints of another generation from the next round on: pending waits carry over, and are
        answered once the new generation reflects them (a cutover never answers a token it does not reflect).

        The versions seen so far are forgotten: they were the old generation's, and the new one may be behind it
        (a switch's target catches up on the last events while it is already active; a rollback's target more)."""
        self._checkpoints = database[CHECKPOINTS_COLLECTION]
        self._book.forget_versions()
        self.switches += 1

    async def wait(self, requirements: list[Requirement], timeout: float) -> WaitOutcome:
        """Waits up to `timeout` seconds until every requirement is reflected.

        Returns the outcome (with what is still behind when the time ran out). Raises TooManyWaiters when the
        server is saturated, Unavailable when shutting down, and the driver's error when MongoDB failed
        while we waited (the caller maps it to UNAVAILABLE).
        """
        missing = self._book.unmet(requirements)
        if not missing:
            return NO_WAIT  # known to be reflected: no query at all
        if self._closed:
            raise Unavailable("the query service is shutting down")
        started = time.monotonic()
        if timeout > 0:
            ticket = self._book.add(missing, since=time.time())
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            ticket.future = future
            self._ensure_running()
            try:
                # asyncio.wait neither cancels the future nor swallows our own cancellation (unlike wait_for
                # on 3.11): a client that leaves cancels this task, and `finally` forgets the ticket.
                await asyncio.wait({future}, timeout=timeout)
            finally:
                self._book.remove(ticket)
                self.stages.observe("consistency_wait", time.monotonic() - started)
            if future.done():
                future.result()  # re-raises a MongoDB failure of the shared poll
                return WaitOutcome(waited_seconds=time.monotonic() - started)
            future.cancel()
        else:
            # No time to wait (a deadline too close, or no waiting configured): still read once what the read
            # model has, so that a token it reflects is answered fresh and a lag is reported as it is.
            self._observe(await self._read_checkpoints(list(missing)))
        waited = time.monotonic() - started
        behind = tuple(
            Lag(r.stream_type, r.stream_id, r.version, self._book.cache.get(r.stream_id))
            for r in requirements
            if self._book.cache.get(r.stream_id) < r.version
        )
        return WaitOutcome(waited_seconds=waited, behind=behind)

    def _ensure_running(self) -> None:
        if self._task is None:
            self._task = detached_task(self._run(), name="consistency-waiter")

    async def _run(self) -> None:
        """Polls while anyone waits; ends (and is restarted by the next waiter) when nobody does.

        Supervised in place: an unexpected failure is logged with its traceback and fails the current waiters
        with UNAVAILABLE (they may retry) instead of leaving them to their deadline; the next waiter restarts it.
        """
        try:
            while len(self._book) and not self._stop.is_set():
                await self._poll_once()
                if len(self._book):
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), timeout=self._poll_interval)
        except Exception:
            log.exception("consistency waiter failed; its current waiters get UNAVAILABLE, the next one restarts it")
            for ticket in self._book.tickets():
                self._book.remove(ticket)
                if ticket.future is not None and not ticket.future.done():
                    ticket.future.set_exception(Unavailable("read-your-writes wait failed; retry"))
        finally:
            # No await between the loop's last check and this line: a waiter added meanwhile starts a new task.
            self._task = None

    async def _poll_once(self) -> None:
        """One round: the checkpoints of (at most `max_streams_per_poll`) pending streams, in bounded queries."""
        try:
            docs = await self._read_checkpoints(self._book.streams_to_poll(self._max_streams_per_poll))
        except Exception as exc:
            # Every current waiter fails with the driver's error (UNAVAILABLE for them); the next waiter
            # restarts the poll, so an outage does not outlive MongoDB's.
            self.last_error = exc
            for ticket in self._book.tickets():
                self._book.remove(ticket)
                if ticket.future is not None and not ticket.future.done():
                    ticket.future.set_exception(exc)
            return
        self.last_error = None
        self._observe(docs)

    async def _read_checkpoints(self, streams: list[str]) -> list[dict[str, Any]]:
        """These streams' checkpoints, in bounded queries; the driver's error raises. Nothing when a generation
        switch came meanwhile: they would be the old generation's versions (the next round reads the new one's)."""
        self.queries += 1
        switches = self.switches
        docs: list[dict[str, Any]] = []
        for start in range(0, len(streams), self._streams_per_query):
            chunk = streams[start : start + self._streams_per_query]
            async with self._deps.timed("mongodb", "checkpoints"):
                docs += await self._checkpoints.find({"_id": {"$in": chunk}}, {"version": 1, "updated_at": 1}).to_list()
        return docs if self.switches == switches else []

    def _observe(self, docs: list[dict[str, Any]]) -> None:
        """Records the checkpoints read and wakes every waiting query they now satisfy."""
        seen_at = time.time()
        versions = {str(doc["_id"]): _version(doc) for doc in docs}
        written = {str(doc["_id"]): _written_at(doc) for doc in docs}
        for ticket in self._book.observe(versions):
            # Answerable once its last checkpoint was written (those read before this poll came earlier).
            answerable = max([ticket.since, *(written[s] for s in ticket.missing if s in written)])
            self.stages.observe("checkpoint_to_seen", seen_at - answerable)
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_result(None)

    async def close(self) -> None:
        """Stops the poll; waiters still registered fail with Unavailable. Idempotent."""
        self._closed = True
        self._stop.set()
        task = self._task
        if task is not None:
            task.cancel()
            await asyncio.wait({task}, timeout=10.0)
        for ticket in self._book.tickets():
            self._book.remove(ticket)
            if ticket.future is not None and not ticket.future.done():
                ticket.future.set_exception(Unavailable("the query service is shutting down"))


def _version(doc: Mapping[str, Any]) -> int:
    value = doc.get("version")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def _written_at(doc: Mapping[str, Any]) -> float:
    """A checkpoint's `updated_at` in wall-clock seconds (0 when it has none: the query's arrival counts)."""
    value = doc.get("updated_at")
    if not isinstance(value, datetime):
        return 0.0
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


class ReadYourWrites:
    """What every query does with its tokens: wait within its budget, then answer, fail or answer stale."""

    def __init__(self, waiter: ConsistencyWaiter, max_wait_seconds: float) -> None:
        self.waiter = waiter
        self._max_wait = max_wait_seconds

    @property
    def switches(self) -> int:
        """Generation switches so far. A query whose wait and read saw different counts may have read a generation
        its tokens were not checked against: it waits and reads again (`query_service.api.runner`)."""
        return self.waiter.switches

    async def ensure(
        self, requirements: list[Requirement], *, accept_stale: bool, time_remaining: float | None
    ) -> consistency_pb2.ReadConsistency:
        """The response's `ReadConsistency` once the tokens are reflected (or stale data is acceptable).

        Raises Unavailable, saying how far behind the read model is, when they are not reflected in time and the
        caller did not accept stale data.
        """
        if not requirements:
            return consistency_pb2.ReadConsistency()
        # The waiter polls MongoDB itself: its driver errors become the project's outage here, at the boundary.
        with read_model_outage():
            outcome = await self.waiter.wait(requirements, wait_budget(time_remaining, self._max_wait))
        if outcome.reached or accept_stale:
            return outcome.read_consistency()
        raise Unavailable(outcome.describe())
