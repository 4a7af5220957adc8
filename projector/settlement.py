"""How a batch's messages are settled: what is acked, naked (with which backoff), terminated or parked, and why.

`Pipeline.apply` decides what happened to each message (applied, a duplicate, a gap, a lost race, a refused write,
a message that cannot be decoded); `Settlement` turns that into a `BatchOutcome`: the acks, naks and terms the
caller sends, the parks and dead letters the pipeline writes, and the reasons streams stay behind.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nats.aio.msg import Msg

from core.backoff import exponential
from projector.dead_letters import DeadLetter
from projector.parking import Park, StreamState, earlier, park_of
from projector.planning import GAP, WRITE_FAILED, DecodedBatch, Delivery, ProjectionBatch, delivered

log = logging.getLogger(__name__)

GAP_BACKOFF_BASE_SECONDS = 0.25
CONFLICT_BACKOFF_BASE_SECONDS = 0.05
WRITE_BACKOFF_BASE_SECONDS = 0.25
# A held copy whose park vanished meanwhile (a resumption won the race) comes back soon, to be applied normally.
UNPARKED_RETRY_SECONDS = 0.05
VIEW_REFUSED = "MongoDB refused a derived view (customer fan-out, order statistics or sales report)"
# Why a stream's events stayed unapplied: its park holds them (`BatchOutcome.unsettled`).
WAITS_BEHIND_PARK = "waits behind a parked event"
# ... or another writer moved its document first (applying them again settles it).
CONFLICT = "conflict"


@dataclass(slots=True)
class BatchOutcome:
    """How to settle a batch's messages, and what happened, for stats, metrics and resumptions."""

    ack: list[Msg] = field(default_factory=list)
    nak: list[tuple[Msg, float]] = field(default_factory=list)
    term: list[Msg] = field(default_factory=list)
    applied: list[Delivery] = field(default_factory=list)
    duplicates: int = 0
    gaps: int = 0
    conflicts: int = 0
    held: int = 0
    dead_letters: list[DeadLetter] = field(default_factory=list)
    parks: dict[str, Park] = field(default_factory=dict)  # parked by this batch
    unsettled: dict[str, str] = field(default_factory=dict)  # stream -> why some of its events did not apply
    versions: dict[str, int] = field(default_factory=dict)  # stream -> document version after this batch
    stats_writes: dict[str, int] = field(default_factory=dict)  # customers' statistics written, by how (StatsWrite)


class Settlement:
    """Settles the messages of batches from one JetStream stream (`stream_name`, recorded with dead letters): an event
    offered `park_after` times parks its event stream; naks back off exponentially, up to `max_backoff` seconds."""

    def __init__(self, *, stream_name: str, park_after: int, max_backoff: float) -> None:
        self._stream_name = stream_name
        self._park_after = park_after
        self._cap = max_backoff

    def failures(
        self, decoded: DecodedBatch, parked: Mapping[str, Park | None], out: BatchOutcome, hold: dict[str, list[Any]]
    ) -> None:
        """Undecodable and not-yet-understood events: park their stream (or dead-letter a stream-less message)."""
        for failure in decoded.failures:
            if failure.stream_id is None:
                if failure.msg is not None:
                    out.dead_letters.append(DeadLetter.of(failure.msg, failure.reason, self._stream_name))
                    out.term.append(failure.msg)
                continue
            if failure.stream_id not in parked:
                self.new_park(out, park_of(failure))
            hold.setdefault(failure.stream_id, []).append(failure)

    def new_park(self, out: BatchOutcome, park: Park) -> None:
        current = out.parks.get(park.stream_id)
        if current is None or earlier(park.version, current.version):
            out.parks[park.stream_id] = park

    def gaps(self, batch: ProjectionBatch, out: BatchOutcome, hold: dict[str, list[Any]]) -> None:
        """A gap is retried with backoff; offered `park_after` times (or met while resuming), it parks."""
        out.gaps += batch.result.gaps
        by_stream: dict[str, list[Delivery]] = {}
        for delivery in batch.result.deferred:
            by_stream.setdefault(delivery.recorded.stream_id, []).append(delivery)
        for sid, deliveries in by_stream.items():
            if any(d.msg is None or delivered(d.msg) >= self._park_after for d in deliveries):
                missing = batch.result.gap_at.get(sid, min(d.recorded.version for d in deliveries))
                self.new_park(
                    out,
                    Park(sid, batch.projection.stream_type, GAP, f"waiting for version {missing}", missing),
                )
                hold.setdefault(sid, []).extend(deliveries)
                continue
            out.unsettled.setdefault(sid, "gap")
            for d in deliveries:
                assert d.msg is not None
                out.nak.append((d.msg, exponential(delivered(d.msg), GAP_BACKOFF_BASE_SECONDS, self._cap)))

    def held(self, out: BatchOutcome, hold: Mapping[str, list[Any]], still_parked: set[str]) -> None:
        """Messages held behind a park: acked once their copy is stored and the park is still there (re-read after
        the copies were written); a stream resumed meanwhile gets them offered again, to be applied normally."""
        for sid, items in hold.items():
            for item in items:
                if item.msg is None:
                    continue
                if sid in still_parked:
                    out.ack.append(item.msg)
                    out.held += 1
                else:
                    out.nak.append((item.msg, UNPARKED_RETRY_SECONDS))
            out.unsettled.setdefault(sid, WAITS_BEHIND_PARK)

    def written(
        self,
        batches: dict[str, ProjectionBatch],
        out: BatchOutcome,
        failed_views: set[str],
        states: Mapping[str, StreamState],
        hold: dict[str, list[Any]],
    ) -> None:
        """Acks and naks of what was folded: applied, duplicates, lost races, refused writes."""
        for batch in batches.values():
            stream_type = batch.projection.stream_type
            for delivery in batch.result.duplicates:
                self._done(delivery, out, failed_views, states, stream_type, hold, duplicate=True)
            for doc_id, applied in batch.result.applied.items():
                if doc_id in batch.outcome.conflicts:
                    out.conflicts += 1
                    out.unsettled.setdefault(doc_id, CONFLICT)
                    log.info("%s %s changed concurrently; re-evaluating", stream_type, doc_id)
                    for d in applied:
                        if d.msg is not None:
                            delay = exponential(delivered(d.msg), CONFLICT_BACKOFF_BASE_SECONDS, self._cap)
                            out.nak.append((d.msg, delay))
                elif doc_id in batch.outcome.failed:
                    reason = f"writing the document failed: {batch.outcome.failed[doc_id]}"
                    log.warning("%s %s: %s", stream_type, doc_id, reason)
                    self._refused(applied, out, reason, stream_type, applied[0].recorded.version, hold)
                else:
                    for d in applied:
                        self._done(d, out, failed_views, states, stream_type, hold, duplicate=False)

    def _done(
        self,
        delivery: Delivery,
        out: BatchOutcome,
        failed_views: set[str],
        states: Mapping[str, StreamState],
        stream_type: str,
        hold: dict[str, list[Any]],
        *,
        duplicate: bool,
    ) -> None:
        sid = delivery.recorded.stream_id
        if sid in failed_views:
            state = states.get(sid)
            version = (state.checkpoint if state is not None else 0) + 1
            self._refused([delivery], out, VIEW_REFUSED, stream_type, version, hold, applied=True)
            return
        if duplicate:
            out.duplicates += 1
        else:
            out.applied.append(delivery)
        if delivery.msg is not None:
            out.ack.append(delivery.msg)

    def _refused(
        self,
        deliveries: list[Delivery],
        out: BatchOutcome,
        reason: str,
        stream_type: str,
        version: int,
        hold: dict[str, list[Any]],
        *,
        applied: bool = False,
    ) -> None:
        """MongoDB refused a write for this stream: retry with backoff; after `park_after` offers, park it."""
        sid = deliveries[0].recorded.stream_id
        out.unsettled.setdefault(sid, reason)
        if any(d.msg is None or delivered(d.msg) >= self._park_after for d in deliveries):
            self.new_park(out, Park(sid, stream_type, WRITE_FAILED, reason, version))
            if applied:  # the documents have it; only the views wait: the message itself needs no copy
                out.ack += [d.msg for d in deliveries if d.msg is not None]
            else:
                hold.setdefault(sid, []).extend(deliveries)
            return
        for d in deliveries:
            if d.msg is not None:
                out.nak.append((d.msg, exponential(delivered(d.msg), WRITE_BACKOFF_BASE_SECONDS, self._cap)))


__all__ = ["VIEW_REFUSED", "BatchOutcome", "Settlement"]
