"""Building a generation: the events of PostgreSQL, in batches, through the projector's own `Pipeline`.

The pipeline writes the documents, the derived views and the checkpoints exactly as the projector does, guarded
by version, so re-applying a batch after a crash changes nothing. After each batch the generation document
records the reader's cursor; the next run resumes there.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

from prometheus_client import CollectorRegistry
from pymongo.asynchronous.database import AsyncDatabase

from core.dependency_metrics import dependency_metrics
from core.envelope import RecordedEvent
from core.events import decode_event
from core.projections import Projection
from cqrsctl.rebuild.generations import FAILED, Generations
from cqrsctl.rebuild.live_lag import LiveLagGate
from cqrsctl.rebuild.progress import RebuildProgress
from cqrsctl.rebuild.reader import Cursor, EventReader
from projector.mongo_writer import MongoDocument
from projector.parking import Park
from projector.pipeline import Pipeline
from projector.planning import DecodedBatch, Decoder, decode_recorded
from projector.repair import PARK_CHANGED, Repairer
from projector.settlement import CONFLICT, VIEW_REFUSED, WAITS_BEHIND_PARK, BatchOutcome

log = logging.getLogger(__name__)

# Called after each recorded batch with the number of batches so far (tests stop a rebuild there).
BatchHook = Callable[[int], Awaitable[None]]


class RebuildFailed(Exception):
    """An event could not be applied to the new generation (the generation is marked `failed`)."""


# A batch that lost write races to the projectors (during a cutover) is applied again, at most this many times.
MAX_CONFLICT_RETRIES = 20
# Why a resumption in the tail failed when it lost a race to the projectors (see `Builder._resume_parked`).
RACES_LOST = frozenset({CONFLICT, VIEW_REFUSED, PARK_CHANGED})


def only_conflicts(outcome: BatchOutcome) -> bool:
    """Every event left unapplied lost a race to a concurrent writer (applying the batch again settles it)."""
    return bool(outcome.conflicts) and all(why == CONFLICT for why in outcome.unsettled.values())


def problems(outcome: BatchOutcome, decoded: DecodedBatch) -> list[str]:
    """What went wrong in a batch applied in PostgreSQL's order (where nothing should): gaps, parks, conflicts,
    dead letters, undecodable events, streams left unsettled."""
    found: list[str] = []
    for failure in decoded.failures:
        found.append(f"{failure.stream_id} v{failure.version}: {failure.reason}")
    for park in outcome.parks.values():
        found.append(f"{park.stream_id} parked at v{park.version} ({park.kind}): {park.reason}")
    if outcome.gaps:
        found.append(f"{outcome.gaps} version gap(s): events of a stream came out of order")
    if outcome.conflicts:
        found.append(f"{outcome.conflicts} write conflict(s): is another rebuild writing this generation?")
    for letter in outcome.dead_letters:
        found.append(f"dead letter: {letter.reason}")
    for stream_id, why in outcome.unsettled.items():
        found.append(f"{stream_id}: {why}")
    return list(dict.fromkeys(found))


class Builder:
    """Applies the event store to one generation's database; `run` until caught up."""

    def __init__(
        self,
        database: AsyncDatabase[MongoDocument],
        projections: Sequence[Projection],
        reader: EventReader,
        generations: Generations,
        generation: int,
        *,
        batch_size: int,
        decoder: Decoder = decode_event,
        on_batch: BatchHook | None = None,
        replay: bool = False,
        gate: LiveLagGate | None = None,
    ) -> None:
        """`replay`: the generation already holds most of what the reader will bring (a rollback to a retired
        generation): each batch's checkpoints are read first and only the events above them are applied, instead
        of every stream's document being loaded to find that out. `gate`: each batch first waits for the live read
        model to be within its lag (see `run`'s `hold_back`)."""
        self.projections: Mapping[str, Projection] = {p.stream_type: p for p in projections}
        self.pipeline = Pipeline(
            database,
            self.projections,
            dependency_metrics(CollectorRegistry()),
            stream_name="",
            park_after=1,  # no redelivery will come: anything that fails is reported at once
            max_backoff=1.0,
        )
        self._reader = reader
        self._generations = generations
        self._generation = generation
        self._batch_size = batch_size
        self._decoder = decoder
        self._on_batch = on_batch
        self._replay = replay
        self._gate = gate
        self._repairer = Repairer(self.pipeline, decoder)
        self.batches = 0

    async def prepare(self) -> None:
        await self.pipeline.ensure_indexes()

    async def run(
        self,
        cursor: Cursor,
        position: int,
        progress: RebuildProgress,
        *,
        concurrent_writers: bool = False,
        before_xact: int | None = None,
        stop: asyncio.Event | None = None,
        hold_back: bool = True,
    ) -> tuple[Cursor, int, int, float]:
        """Applies every final event after `cursor`; returns the new cursor, the highest position applied, the
        number of events applied and the seconds it took. Raises `RebuildFailed` (after marking the generation).

        `concurrent_writers`: projectors write the generation too (a cutover): a batch that lost write races to
        them is applied again (the version guard skips what they wrote) instead of failing. `before_xact`: stop
        at the events of transactions with this id or later (see `EventReader.next_batch`). `stop`: return after the
        batch in hand once it is set. Without either, it stops at the transactions that start after it did: under a
        steady load faster than the generation can take (a saturated machine), "until caught up" would never come;
        the next pass (or the projectors, after a switch) takes what came meanwhile. `hold_back`: each batch waits
        for the live read model (the builder's `gate`); not during a switch, whose tail must end it."""
        started = time.monotonic()
        if before_xact is None and stop is None:
            before_xact = await self._reader.horizon()
        applied = 0
        conflicts = 0
        while stop is None or not stop.is_set():
            if self._gate is not None and hold_back:
                await self._gate.wait(f"generation {self._generation}'s next batch")
            batch = await self._reader.next_batch(cursor, self._batch_size, before_xact=before_xact)
            if not batch.events:
                return cursor, position, applied, time.monotonic() - started
            events = await self._not_applied(batch.events) if self._replay else batch.events
            decoded = decode_recorded(events, self.projections, self._decoder)
            outcome = await self.pipeline.apply(decoded)
            if concurrent_writers:
                await self._resume_parked(outcome, batch.events)
            if concurrent_writers and only_conflicts(outcome) and conflicts < MAX_CONFLICT_RETRIES:
                conflicts += 1
                continue  # the same batch again: nothing of it is recorded as done
            conflicts = 0
            found = problems(outcome, decoded)
            if found:
                error = "; ".join(found[:20])
                await self._generations.set_state(self._generation, FAILED, error=error)
                raise RebuildFailed(f"generation {self._generation}: {error}")
            cursor = batch.cursor
            position = max(position, max(e.position for e in batch.events))
            await self._generations.record_batch(self._generation, cursor, position, len(batch.events))
            applied += len(batch.events)
            self.batches += 1
            progress.advance(len(batch.events))
            if self._on_batch is not None:
                await self._on_batch(self.batches)
        return cursor, position, applied, time.monotonic() - started

    async def _not_applied(self, events: list[RecordedEvent]) -> list[RecordedEvent]:
        """The events above their stream's checkpoint in the generation (those at or below it are duplicates, which
        the pipeline would skip after loading their documents)."""
        states = await self.pipeline.parks.states({e.stream_id for e in events})
        return [e for e in events if e.stream_id not in states or e.version > states[e.stream_id].checkpoint]

    async def _resume_parked(self, outcome: BatchOutcome, events: Sequence[RecordedEvent]) -> None:
        """During a cutover the projectors write the generation too, which parks streams two ways that the tail's
        events (from PostgreSQL) can resolve:

        * a projector that moved to the generation early finds a stream's next event missing (it applied it to the
          old generation; the tail has not brought it yet) and parks the stream at that gap: the batch's events
          wait behind the park;
        * the batch's own writes of a shared view (a customer's order statistics) keep being overtaken by the
          projectors' (`order_stats.STATS_ATTEMPTS`), and the batch parks the streams at once (no redelivery
          would retry them).

        Either way the stream is resumed with the batch's events, as `cqrs dead-letters retry` does: applied past
        the park, which goes, then the copies a projector held. Updates `outcome`: a resumed stream is settled; one
        still overtaken, or whose park a projector resumed or replaced meanwhile, counts as a conflict (the batch is
        applied again, `MAX_CONFLICT_RETRIES` times at most); any other failure stays a problem."""
        waiting = [sid for sid, why in outcome.unsettled.items() if why == WAITS_BEHIND_PARK]
        overtaken = [sid for sid, park in outcome.parks.items() if park.reason == VIEW_REFUSED and sid not in waiting]
        if not waiting and not overtaken:
            return
        # The parks as stored: a projector may have parked the stream first (the first park stays).
        states = await self.pipeline.parks.states([*waiting, *overtaken])
        parks: dict[str, Park] = {}
        for sid in [*waiting, *overtaken]:
            park = state.park if (state := states.get(sid)) is not None else None
            if park is None:  # resumed meanwhile (a projector's resume loop): applying again settles it
                _conflict(outcome, sid)
            else:
                parks[sid] = park
        # All in one batch: the streams overtaken on a busy customer's statistics share them, and a resume writes
        # them by recompute (a read of every order of the customer); one at a time, a switch under load spent
        # minutes resuming the streams of four busy customers (85 of them, about 1.6 s each).
        results = await self._repairer.resume_many(parks, [e for e in events if e.stream_id in parks])
        for result in results:
            sid, park = result.stream_id, parks[result.stream_id]
            if result.resumed:
                outcome.parks.pop(sid, None)
                outcome.unsettled.pop(sid, None)
                log.info("resumed %s, parked at v%s (%s) in the switch, from PostgreSQL", sid, park.version, park.kind)
            elif result.detail in RACES_LOST:
                _conflict(outcome, sid)
            else:
                outcome.unsettled[sid] = f"parked at v{park.version} ({park.kind}: {park.reason}): {result.detail}"


def _conflict(outcome: BatchOutcome, stream_id: str) -> None:
    """Records a stream whose events lost a race to the projectors: applying the batch again settles it."""
    outcome.parks.pop(stream_id, None)
    outcome.unsettled[stream_id] = CONFLICT
    outcome.conflicts += 1
