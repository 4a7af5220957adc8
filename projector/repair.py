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
        """Resumes from the held copies if the cause looks gone (None: nothing to try yet)."""
        held = await self._parks.held(park.stream_id)
        events: list[RecordedEvent] = []
        for copy in held:
            recorded = _readable(copy)
            if recorded is None:
                if park.kind != POISON:  # an unreadable copy needs an operator, and PostgreSQL
                    await self._parks.update_reason(park, f"unreadable message held ({copy.key})", POISON, None)
                return None
            events.append(recorded)
        head = next((e for e in events if e.version == park.version), None)
        if park.kind == GAP and head is None and not await self._gap_filled(park):
            return None  # still missing
        if park.kind == NEEDS_UPGRADE and head is None:
            # The event it waits on was delivered, so its copy is held; but the park and the copies are written at
            # once, and this one is not there yet. Resuming without it would find a gap that is not one.
            return None
        if park.kind == NEEDS_UPGRADE and head is not None:
            item = classify(None, head, self._projections, self._decoder)
            if isinstance(item, Poison) and item.kind == NEEDS_UPGRADE:
                return None  # this build does not understand it either: leave it for a newer replica
        return await self.resume(park, events)

    async def _gap_filled(self, park: Park) -> bool:
        """Whether the missing version was applied without passing through the park: another replica's batch that
        read the stream's state just before this park was written applies it directly, and no copy is held."""
        if park.version is None:
            return False
        states = await self._parks.states([park.stream_id])
        state = states.get(park.stream_id)
        return state is not None and state.checkpoint >= park.version

    async def resume(self, park: Park, events: Sequence[RecordedEvent]) -> ResumeResult:
        """Applies `events` (the stream's, in any order; duplicates are harmless), then unparks if all applied."""
        sid = park.stream_id
        out = await self._pipeline.apply(
            decode_recorded(events, self._projections, self._decoder), resuming={sid: park}
        )
        failure = _failure(out, sid)
        if failure is not None:
            new = out.parks.get(sid)
            if new is not None and (new.kind, new.reason, new.version) != (park.kind, park.reason, park.version):
                await self._parks.update_reason(park, new.reason, new.kind, new.version)
            return ResumeResult(sid, False, out.versions.get(sid, 0), failure)
        version = out.versions.get(sid, 0)
        if not await self._parks.unpark(sid, park.park_id):
            return ResumeResult(sid, False, version, "the park changed meanwhile")
        log.info("resumed parked stream %s (%s) at version %d", sid, park.kind, version)
        # Copies held between our read and the unpark were acknowledged: apply them now.
        for _ in range(MAX_FOLLOW_UPS):
            later = [e for e in (_readable(c) for c in await self._parks.held(sid)) if e and e.version > version]
            if not later:
                break
            out = await self._pipeline.apply(decode_recorded(later, self._projections, self._decoder))
            version = max(version, out.versions.get(sid, version))
            if _failure(out, sid) is not None:
                break  # parked again (it holds its copies): nothing to delete below what applied
        await self._parks.drop_held(sid, version, unreadable=True)
        return ResumeResult(sid, True, version, "resumed")

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


def _failure(out: BatchOutcome, stream_id: str) -> str | None:
    if stream_id in out.parks:
        return out.parks[stream_id].reason
    return out.unsettled.get(stream_id)


def _readable(copy: HeldEvent) -> RecordedEvent | None:
    try:
        return RecordedEvent.from_json(copy.data)
    except ValueError:
        return None
