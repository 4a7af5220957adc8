"""Resuming parked streams, and skipping the event a stream is parked at; shared by the projector and the CLI.

A resumption applies a parked stream's events through the same pipeline as a JetStream batch, with the stream
marked as being resumed (its park does not hold them back). The events come from the stream's held copies (the
projector's own resumption of `needs_upgrade`, `gap` and `write_failed` parks) or from PostgreSQL (an operator's
`cqrs dead-letters retry`, see `cqrsctl.dead_letters`). When every event applied, the park is removed, copies
held meanwhile are applied too, and the copies are deleted. When something still fails the stream stays parked
with the new reason.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from core.envelope import RecordedEvent
from core.projections import Projection
from projector.parking import HeldEvent, Park
from projector.pipeline import Pipeline
from projector.planning import GAP, NEEDS_UPGRADE, POISON, Decoder, Poison, classify, decode_recorded
from projector.settlement import BatchOutcome

log = logging.getLogger(__name__)

MAX_FOLLOW_UPS = 5
# Held events applied in one batch when many parks resume at once (a projector fetches up to 200 a batch).
RESUME_BATCH_EVENTS = 400
# A resumption's detail when another one (or a new park) replaced the park while its events were applied.
PARK_CHANGED = "the park changed meanwhile"


@dataclass(frozen=True, slots=True)
class ResumeResult:
    stream_id: str
    resumed: bool
    version: int  # the stream's document version afterwards (0: none)
    detail: str


class CannotSkip(Exception):
    """The parked event cannot be skipped (see the message)."""


class Repairer:
    """Resumes and skips parked streams against one read model."""

    def __init__(self, pipeline: Pipeline, decoder: Decoder) -> None:
        self._pipeline = pipeline
        self._parks = pipeline.parks
        self._decoder = decoder
        self._projections: Mapping[str, Projection] = pipeline.projections

    async def resume_held(self, park: Park) -> ResumeResult | None:
        """Resumes one stream from its held copies if the cause looks gone (None: nothing to try yet)."""
        results = await self.resume_held_many([park])
        return results[0] if results else None

    async def resume_held_many(self, parks: Sequence[Park]) -> list[ResumeResult]:
        """Resumes, together, those of these parks whose cause looks gone (their copies read in one round trip,
        applied in batches of about `RESUME_BATCH_EVENTS` events); the others are left for a later round.

        After a crash many streams may wait for a redelivered event at once. Resumed one at a time, each paid a whole
        batch's round trips: against the local MongoDB-wire server 28 streams a second with 300 parks, 10 with
        1,000 (now about 70 with either; `tests/integration/test_park_resume.py` bounds the round trips)."""
        if not parks:
            return []
        held = await self._parks.held_of(p.stream_id for p in parks)
        events_of: dict[str, list[RecordedEvent]] = {}
        for park in parks:
            events = await self._readable_copies(park, held.get(park.stream_id, []))
            if events is not None:
                events_of[park.stream_id] = events
        readable = [p for p in parks if p.stream_id in events_of]
        filled = await self._gaps_filled([p for p in readable if _head(p, events_of[p.stream_id]) is None])
        ready = [p for p in readable if self._cause_gone(p, events_of[p.stream_id], filled)]
        results: list[ResumeResult] = []
        for group in _batches(ready, events_of):
            events = [e for park in group for e in events_of[park.stream_id]]
            results += await self._resume({park.stream_id: park for park in group}, events)
        return results

    async def _readable_copies(self, park: Park, held: Sequence[HeldEvent]) -> list[RecordedEvent] | None:
        """The stream's held copies as events; None when one cannot be read (the park turns poison: an unreadable
        copy needs an operator, and PostgreSQL)."""
        events: list[RecordedEvent] = []
        for copy in held:
            recorded = _readable(copy)
            if recorded is None:
                if park.kind != POISON:
                    await self._parks.update_reason(park, f"unreadable message held ({copy.key})", POISON, None)
                return None
            events.append(recorded)
        return events

    def _cause_gone(self, park: Park, events: Sequence[RecordedEvent], gaps_filled: set[str]) -> bool:
        """Whether the park's cause looks gone, by its held copies (`events`)."""
        head = _head(park, events)
        if park.kind == GAP:
            return head is not None or park.stream_id in gaps_filled  # else still missing
        if park.kind == NEEDS_UPGRADE:
            # Without its copy: the event it waits on was delivered, so its copy is held; but the park and the copies
            # are written at once, and this one is not there yet. Resuming without it would find a gap that is not
            # one. With it: this build may not understand it either; then it waits for a newer replica.
            if head is None:
                return False
            item = classify(None, head, self._projections, self._decoder)
            return not (isinstance(item, Poison) and item.kind == NEEDS_UPGRADE)
        return True

    async def _gaps_filled(self, parks: Sequence[Park]) -> set[str]:
        """The gap parks whose missing version was applied without passing through the park: another replica's
        batch that read the stream's state just before the park was written applies it directly, and no copy is
        held. One round trip for all of them."""
        gaps = [p for p in parks if p.kind == GAP and p.version is not None]
        if not gaps:
            return set()
        states = await self._parks.states(p.stream_id for p in gaps)
        filled = set()
        for park in gaps:
            state = states.get(park.stream_id)
            if state is not None and park.version is not None and state.checkpoint >= park.version:
                filled.add(park.stream_id)
        return filled

    async def resume(self, park: Park, events: Sequence[RecordedEvent]) -> ResumeResult:
        """Applies `events` (the stream's, in any order; duplicates are harmless), then unparks if all applied."""
        [result] = await self._resume({park.stream_id: park}, events)
        return result

    async def resume_many(self, parks: Mapping[str, Park], events: Sequence[RecordedEvent]) -> list[ResumeResult]:
        """`resume` of several parked streams (by stream id) in one batch: the views they share (a customer's order
        statistics) are written once for all of them. One result per stream."""
        return await self._resume(parks, events) if parks else []

    async def _resume(self, parks: Mapping[str, Park], events: Sequence[RecordedEvent]) -> list[ResumeResult]:
        """Applies the events of these parked streams in one batch, unparks each stream whose events all applied,
        then applies the copies held for them meanwhile and deletes their copies."""
        out = await self._pipeline.apply(decode_recorded(events, self._projections, self._decoder), resuming=parks)
        results: list[ResumeResult] = []
        applied: dict[str, Park] = {}
        for sid, park in parks.items():
            failure = _failure(out, sid)
            if failure is None:
                applied[sid] = park
                continue
            new = out.parks.get(sid)
            if new is not None and (new.kind, new.reason, new.version) != (park.kind, park.reason, park.version):
                await self._parks.update_reason(park, new.reason, new.kind, new.version)
            results.append(ResumeResult(sid, False, out.versions.get(sid, 0), failure))
        unparked = await self._parks.unpark({sid: park.park_id for sid, park in applied.items()})
        reached: dict[str, int] = {}  # resumed stream -> the version its document reached
        for sid, park in applied.items():
            version = out.versions.get(sid, 0)
            if sid in unparked:
                log.info("resumed parked stream %s (%s) at version %d", sid, park.kind, version)
                reached[sid] = version
            else:
                results.append(ResumeResult(sid, False, version, PARK_CHANGED))
        if reached:
            await self._apply_held_meanwhile(reached)
            await self._parks.drop_resumed(reached)
        resumed = [ResumeResult(sid, True, version, "resumed") for sid, version in reached.items()]
        return results + resumed

    async def _apply_held_meanwhile(self, reached: dict[str, int]) -> None:
        """Copies held between the batch's read and the unparks were acknowledged: applies them (updating `reached`).
        A stream that fails here is parked again, with its copies: only what applied is deleted afterwards."""
        following = set(reached)
        for _ in range(MAX_FOLLOW_UPS):
            held = await self._parks.held_of(following)
            later = [
                e
                for sid in following
                for e in (_readable(c) for c in held.get(sid, []))
                if e is not None and e.version > reached[sid]
            ]
            if not later:
                return
            out = await self._pipeline.apply(decode_recorded(later, self._projections, self._decoder))
            following = {e.stream_id for e in later}
            for sid in list(following):
                if _failure(out, sid) is not None:  # parked again, holding its copies: none of them is deleted
                    following.discard(sid)
                    continue
                reached[sid] = max(reached[sid], out.versions.get(sid, reached[sid]))

    async def skip(self, park: Park, event: RecordedEvent, note: str = "") -> None:
        """Marks the parked event as skipped: the document moves to its version unchanged, and a record says so.

        The caller then resumes the stream with the later events. Only the event the stream is parked at can be
        skipped, and only when the document is right before it.
        """
        if park.version is None or event.version != park.version or event.stream_id != park.stream_id:
            raise CannotSkip(f"{park.stream_id} is parked at version {park.version}, not at {event.version}")
        projection = self._projections.get(event.stream_type)
        if projection is None:
            raise CannotSkip(f"no projection follows stream type {event.stream_type!r}")
        writer = self._pipeline.writers[event.stream_type]
        docs = await writer.load([event.stream_id])
        current = int(docs[event.stream_id].get("version", 0)) if event.stream_id in docs else 0
        if current == event.version:
            pass  # skipped already (a repeated command)
        elif current != event.version - 1:
            raise CannotSkip(f"the document is at version {current}; retry the stream first")
        elif current == 0:
            raise CannotSkip("the stream has no document yet: its later events could not apply without this one")
        else:
            await writer.skip_to(event.stream_id, current, event.version, event.position, event.recorded_at)
        await self._parks.record_skip(park, event.version, event.event_type, note)
        log.warning("skipped %s v%d (%s): %s", event.stream_id, event.version, event.event_type, park.reason)


def _head(park: Park, events: Sequence[RecordedEvent]) -> RecordedEvent | None:
    """The held copy of the event the stream is parked at, if any."""
    return next((e for e in events if e.version == park.version), None)


def _batches(parks: Sequence[Park], events_of: Mapping[str, Sequence[RecordedEvent]]) -> list[list[Park]]:
    """The parks in groups of about `RESUME_BATCH_EVENTS` held events (a stream holding more goes alone)."""
    groups: list[list[Park]] = []
    size = 0
    for park in parks:
        count = len(events_of[park.stream_id])
        if not groups or size + count > RESUME_BATCH_EVENTS:
            groups.append([])
            size = 0
        groups[-1].append(park)
        size += count
    return groups


def _failure(out: BatchOutcome, stream_id: str) -> str | None:
    if stream_id in out.parks:
        return out.parks[stream_id].reason
    return out.unsettled.get(stream_id)


def _readable(copy: HeldEvent) -> RecordedEvent | None:
    try:
        return RecordedEvent.from_json(copy.data)
    except ValueError:
        return None
