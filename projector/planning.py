"""Pure batch planning: decode messages, fold events onto documents, decide checkpoints (the derived views a batch
writes are planned in `projector.view_planning`).

Nothing here does I/O; the pipeline (`projector.pipeline`) loads documents, calls these functions and writes what
they decide. `cqrsctl verify` imports `fold` and `Delivery` to replay PostgreSQL's events through the same code.

Vocabulary:

* a **delivery** is an event decoded for a projection (with its JetStream message, or None when the event comes
  from somewhere else: held events of a parked stream, or PostgreSQL during a repair);
* a **failure** is an event that cannot be applied: `poison` (undecodable, or a handler rejects it),
  `needs_upgrade` (a type or schema version this build does not know: a newer replica will), `gap` (a version
  that never came), `write_failed` (MongoDB refuses a document or a derived view, e.g. a validator);
* a **parked** stream waits behind its first failure: nothing of it is applied until it is resumed, in order.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from nats.aio.msg import Msg

from core.envelope import HEADER_STREAM_ID, HEADER_VERSION, RecordedEvent
from core.events import Event, Payload, UnknownEventType, decode_event
from core.projections import Document, Projection
from core.subjects import parse_event_subject
from projector.checkpoints import Checkpoint
from projector.customer_views import CustomerFields
from projector.mongo_writer import Change, WriteOutcome

log = logging.getLogger(__name__)

POISON: Final = "poison"
NEEDS_UPGRADE: Final = "needs_upgrade"
GAP: Final = "gap"
WRITE_FAILED: Final = "write_failed"
# Kinds a projector resumes by itself once the cause is gone (a newer build, the missing event, MongoDB fixed);
# poison waits for an operator (`cqrs dead-letters retry|skip`).
SELF_HEALING_KINDS: Final = frozenset({NEEDS_UPGRADE, GAP, WRITE_FAILED})

Decoder = Callable[[str, int, Payload], Event]


@dataclass(frozen=True, slots=True)
class Delivery:
    """A decoded event: the JetStream message (None when not from JetStream) plus the event it carries."""

    msg: Msg | None
    recorded: RecordedEvent
    event: Event


@dataclass(frozen=True, slots=True)
class Poison:
    """An event that cannot be applied (see the module docstring for the kinds); its stream parks behind it.

    `stream_id` is None only for a message that names no stream at all (a dead letter of its own).
    """

    msg: Msg | None
    reason: str
    kind: str = POISON
    stream_id: str | None = None
    stream_type: str | None = None
    version: int | None = None
    recorded: RecordedEvent | None = None


@dataclass(slots=True)
class FoldResult:
    """What one batch does to the read model, before anything is written."""

    changes: list[Change] = field(default_factory=list)
    applied: dict[str, list[Delivery]] = field(default_factory=dict)  # doc id -> deliveries in its change
    duplicates: list[Delivery] = field(default_factory=list)
    deferred: list[Delivery] = field(default_factory=list)  # gaps and what follows them
    poison: list[Poison] = field(default_factory=list)
    held: list[Delivery] = field(default_factory=list)  # behind a poison event: they wait with its stream
    gaps: int = 0
    gap_at: dict[str, int] = field(default_factory=dict)  # doc id -> the missing version


def stored_version(doc: Document | None) -> int:
    return 0 if doc is None else int(doc.get("version", 0))


def fold(projection: Projection, groups: dict[str, list[Delivery]], docs: dict[str, Document]) -> FoldResult:
    """Applies each aggregate's deliveries, in version order, onto its current document (pure, no I/O)."""
    result = FoldResult()
    for doc_id, deliveries in groups.items():
        original = docs.get(doc_id)
        doc = original
        version = stored_version(original)
        poisoned = gap = False
        applied: list[Delivery] = []
        for delivery in sorted(deliveries, key=lambda d: d.recorded.version):
            event_version = delivery.recorded.version
            if event_version <= version:
                result.duplicates.append(delivery)
            elif poisoned:
                result.held.append(delivery)
            elif gap:
                result.deferred.append(delivery)
            elif event_version > version + 1:
                log.info(
                    "version gap on %s %s: read model at v%d, got v%d; retrying later",
                    projection.stream_type,
                    doc_id,
                    version,
                    event_version,
                )
                result.gaps += 1
                result.gap_at[doc_id] = version + 1
                result.deferred.append(delivery)
                gap = True
            else:
                try:
                    doc = projection.project(doc, delivery.recorded, delivery.event)
                except ValueError as exc:
                    rec = delivery.recorded
                    result.poison.append(
                        Poison(delivery.msg, f"cannot apply: {exc}", POISON, doc_id, rec.stream_type, rec.version, rec)
                    )
                    poisoned = True
                    continue
                version = event_version
                applied.append(delivery)
        if applied and doc is not None:
            expected = None if original is None else stored_version(original)
            result.changes.append(Change(doc_id, expected, doc))
            result.applied[doc_id] = applied
    return result


@dataclass(slots=True)
class ProjectionBatch:
    """One projection's part of a batch: its deliveries by stream id, the loaded documents, the fold, the write."""

    projection: Projection
    groups: dict[str, list[Delivery]] = field(default_factory=dict)
    docs: dict[str, Document] = field(default_factory=dict)
    result: FoldResult = field(default_factory=FoldResult)
    outcome: WriteOutcome = field(default_factory=WriteOutcome)

    def written(self) -> dict[str, list[Delivery]]:
        """Applied deliveries whose document write succeeded, by stream id."""
        return {
            doc_id: applied
            for doc_id, applied in self.result.applied.items()
            if doc_id not in self.outcome.conflicts and doc_id not in self.outcome.failed
        }

    def settled(self) -> dict[str, list[Delivery]]:
        """Deliveries that will be acked (written or duplicates), by stream id."""
        done = {doc_id: list(applied) for doc_id, applied in self.written().items()}
        for delivery in self.result.duplicates:
            done.setdefault(delivery.recorded.stream_id, []).append(delivery)
        return done

    def current_docs(self) -> dict[str, Document]:
        """The documents as this batch left them (written or loaded), by stream id."""
        return {**self.docs, **{change.doc_id: change.new_doc for change in self.result.changes}}


def prefill_customer_fields(changes: Sequence[Change], customers: dict[str, CustomerFields]) -> None:
    """Gives new order documents the fields of their customer, when the customer is in the read model."""
    for change in changes:
        if change.expected_version is None:
            customer = customers.get(str(change.new_doc.get("customer_id")))
            if customer is not None:
                change.new_doc.update(customer.order_fields())


def checkpoints_of(batches: Iterable[ProjectionBatch]) -> dict[str, Checkpoint]:
    """Per settled stream, the latest event version (and its position) this batch applied or found applied."""
    checkpoints: dict[str, Checkpoint] = {}
    for batch in batches:
        for stream_id, settled in batch.settled().items():
            for delivery in settled:
                rec = delivery.recorded
                checkpoints[stream_id] = Checkpoint(rec.stream_type, rec.version, rec.position).later(
                    checkpoints.get(stream_id)
                )
    return checkpoints


# ---- decoding -------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class DecodedBatch:
    """A batch split by what can be done with it."""

    groups: dict[str, dict[str, list[Delivery]]] = field(default_factory=dict)  # stream type -> stream id -> ...
    failures: list[Poison] = field(default_factory=list)
    foreign: list[Msg] = field(default_factory=list)  # stream types no read model follows: acked, ignored

    def stream_ids(self) -> set[str]:
        ids = {stream_id for groups in self.groups.values() for stream_id in groups}
        return ids | {f.stream_id for f in self.failures if f.stream_id is not None}


def classify(
    msg: Msg | None, recorded: RecordedEvent, projections: Mapping[str, Projection], decoder: Decoder
) -> Delivery | Poison | None:
    """A delivery, a failure, or None for a stream type no projection follows."""
    projection = projections.get(recorded.stream_type)
    if projection is None:
        return None
    rec = recorded
    try:
        event = decoder(rec.event_type, rec.schema_version, rec.payload)
    except UnknownEventType as exc:
        # A newer build wrote it: not poison. The stream waits for a replica that understands it.
        reason = f"needs upgrade: {exc}"
        return Poison(msg, reason, NEEDS_UPGRADE, rec.stream_id, rec.stream_type, rec.version, rec)
    except ValueError as exc:  # MalformedEvent
        return Poison(msg, f"{type(exc).__name__}: {exc}", POISON, rec.stream_id, rec.stream_type, rec.version, rec)
    if not projection.handles(rec.event_type):
        reason = f"no handler for event type {rec.event_type!r}"
        return Poison(msg, reason, POISON, rec.stream_id, rec.stream_type, rec.version, rec)
    return Delivery(msg, rec, event)


def add_to(batch: DecodedBatch, item: Delivery | Poison | None, msg: Msg | None) -> None:
    if item is None:
        if msg is not None:
            batch.foreign.append(msg)
    elif isinstance(item, Poison):
        batch.failures.append(item)
    else:
        rec = item.recorded
        batch.groups.setdefault(rec.stream_type, {}).setdefault(rec.stream_id, []).append(item)


def decode_messages(
    msgs: Iterable[Msg], projections: Mapping[str, Projection], subject_prefix: str, decoder: Decoder = decode_event
) -> DecodedBatch:
    """Splits JetStream messages into deliveries, failures (each naming its stream when it can) and foreign ones."""
    batch = DecodedBatch()
    for msg in msgs:
        try:
            recorded = RecordedEvent.from_json(msg.data)
        except ValueError as exc:
            stream_type, stream_id, version = stream_of_undecodable(msg, subject_prefix)
            if stream_type is not None and stream_type not in projections:
                batch.foreign.append(msg)
                continue
            batch.failures.append(Poison(msg, str(exc), POISON, stream_id, stream_type, version))
            continue
        add_to(batch, classify(msg, recorded, projections, decoder), msg)
    return batch


def decode_recorded(
    events: Iterable[RecordedEvent], projections: Mapping[str, Projection], decoder: Decoder = decode_event
) -> DecodedBatch:
    """The same split for events that do not come from JetStream (held events, PostgreSQL rows)."""
    batch = DecodedBatch()
    for recorded in events:
        add_to(batch, classify(None, recorded, projections, decoder), None)
    return batch


def stream_of_undecodable(msg: Msg, subject_prefix: str) -> tuple[str | None, str | None, int | None]:
    """Stream type, id and version of a message whose body cannot be read: from its subject and headers."""
    headers = msg.headers or {}
    stream_type: str | None = None
    stream_id: str | None = headers.get(HEADER_STREAM_ID) or None
    parsed = parse_event_subject(msg.subject, subject_prefix)
    if parsed is not None:
        stream_type = parsed.stream_type
        stream_id = stream_id or parsed.stream_id
    version: int | None = None
    try:
        version = int(headers[HEADER_VERSION])
    except (KeyError, ValueError):
        pass
    return stream_type, stream_id, version


def hold_from_failures(batch: DecodedBatch) -> dict[str, list[Delivery]]:
    """Takes out of the groups every delivery at or after a failure of its stream (they wait behind it).

    A failure without a version (an unreadable body) holds the whole stream in this batch.
    """
    first: dict[str, int | None] = {}
    for failure in batch.failures:
        if failure.stream_id is None:
            continue
        known = first.get(failure.stream_id, failure.version)
        first[failure.stream_id] = None if failure.version is None or known is None else min(known, failure.version)
    held: dict[str, list[Delivery]] = {}
    for groups in batch.groups.values():
        for stream_id, blocked_at in first.items():
            deliveries = groups.get(stream_id)
            if deliveries is None:
                continue
            keep = [d for d in deliveries if blocked_at is not None and d.recorded.version < blocked_at]
            held[stream_id] = [d for d in deliveries if d not in keep]
            if keep:
                groups[stream_id] = keep
            else:
                del groups[stream_id]
    return held


def doc_checkpoints(batches: Iterable[ProjectionBatch], streams: set[str]) -> dict[str, Checkpoint]:
    """Checkpoints at the loaded documents' versions, for streams whose views count those versions now (a view
    owed for them was done in full)."""
    checkpoints: dict[str, Checkpoint] = {}
    for batch in batches:
        for stream_id in streams:
            doc = batch.docs.get(stream_id)
            if doc is not None and stored_version(doc) > 0:
                checkpoints[stream_id] = Checkpoint(
                    batch.projection.stream_type, stored_version(doc), int(doc.get("position") or 0)
                )
    return checkpoints


def merge_checkpoints(*parts: Mapping[str, Checkpoint]) -> dict[str, Checkpoint]:
    merged: dict[str, Checkpoint] = {}
    for part in parts:
        for stream_id, checkpoint in part.items():
            merged[stream_id] = checkpoint.later(merged.get(stream_id))
    return merged


def delivered(msg: Msg | None) -> int:
    """How often JetStream delivered the message (1 when there is no JetStream message)."""
    if msg is None:
        return 1
    try:
        return int(msg.metadata.num_delivered)
    except Exception:  # not a JetStream message; only in hand-made messages
        return 1


def stream_seq(msg: Msg | None) -> int | None:
    if msg is None:
        return None
    try:
        return int(msg.metadata.sequence.stream)
    except Exception:
        return None
