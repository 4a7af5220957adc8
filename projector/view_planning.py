"""Pure planning of a batch's derived views: which views each stream owes (`lagging_views`, `plan_views`) and which
keys an incrementing view may bring forward by the batch's steps alone (`view_steps`).

Nothing here does I/O; the pipeline (`projector.pipeline`) calls these after folding a batch (`projector.planning`)
and writes what they decide.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from core.projections import EVERY_EVENT, DerivedView, Document
from core.read_model import ORDER_HISTORY_FIELD
from projector.planning import Delivery, ProjectionBatch, stored_version
from projector.view_sources import Step


@dataclass(slots=True)
class ViewPlan:
    """Per derived view, the keys to recompute; and which streams depend on which view keys."""

    keys: dict[str, set[str]] = field(default_factory=dict)  # view name -> keys
    # view name -> key -> lowest version of the key's document the triggering documents already carry
    carried: dict[str, dict[str, int]] = field(default_factory=dict)
    depends: dict[str, set[tuple[str, str]]] = field(default_factory=dict)  # stream id -> {(view name, key)}

    def needs(self, stream_id: str, view: str, key: str) -> None:
        self.keys.setdefault(view, set()).add(key)
        self.depends.setdefault(stream_id, set()).add((view, key))


def lagging_views(
    batches: Mapping[str, ProjectionBatch], checkpoints: Mapping[str, int], views: Iterable[DerivedView]
) -> dict[str, set[str]]:
    """Per view name, the streams whose loaded document is ahead of their checkpoint (`checkpoints`: 0 or absent
    for none) by an event the view follows: an earlier batch wrote the document and may have stopped before that
    view (a failure, a crash, a replica that stopped), so the view is done in full for them (pure).

    A stream ahead only by events a view does not follow needs nothing of that view: by the view's triggers, those
    events change nothing it shows, so it counts the stream at the document's version as it did at the checkpoint
    (a draft's added item does not touch its customer's statistics). The events come from the document's change
    log; a document without one, or whose log does not show every version above the checkpoint, is ahead for every
    view that follows its stream type.
    """
    unconfirmed: dict[str, tuple[str, frozenset[str] | None]] = {}
    for stream_type, batch in batches.items():
        for sid, doc in batch.docs.items():
            checkpoint = checkpoints.get(sid, 0)
            if stored_version(doc) > checkpoint:
                unconfirmed[sid] = (stream_type, _event_types_above(doc, checkpoint))
    lagging: dict[str, set[str]] = {}
    for view in views:
        lagging[view.name] = {
            sid
            for sid, (stream_type, types) in unconfirmed.items()
            if (events := view.triggers.get(stream_type)) is not None
            and (types is None or events == EVERY_EVENT or not events.isdisjoint(types))
        }
    return lagging


def _event_types_above(doc: Document, checkpoint: int) -> frozenset[str] | None:
    """The event types of the document's versions above `checkpoint`, from its change log; None when the log does
    not show every one of them (pure)."""
    log = doc.get(ORDER_HISTORY_FIELD)
    if not isinstance(log, list):
        return None
    types: dict[int, str] = {}
    for entry in log:
        version = int(entry.get("version") or 0) if isinstance(entry, Mapping) else 0
        if version > checkpoint:
            types[version] = str(entry.get("event_type") or "")
    if set(types) != set(range(checkpoint + 1, stored_version(doc) + 1)):
        return None
    return frozenset(types.values())


def plan_views(
    batches: Mapping[str, ProjectionBatch],
    views: Iterable[DerivedView],
    lagging: Mapping[str, set[str]],
    touched: set[str],
) -> ViewPlan:
    """Plans the derived views a batch must write before its checkpoints: a view is recomputed for the keys of
    every stream to which the batch wrote one of the view's trigger events (one key, or several for a view with
    `keys_from`: an order counts in the sales report of the day it was placed and of its cancellation).

    `lagging[view name]`: streams whose document is ahead of their checkpoint by an event the view follows
    (`lagging_views`): an earlier batch wrote it and may not have got as far as that view. The view is done in full
    for them here, whatever events this batch brings (duplicates only, after a redelivery), so the checkpoint never
    covers a version whose views are missing. A duplicate of a stream at its checkpoint needs nothing: the
    checkpoint says every view counts it already (recomputing a busy customer's statistics for it read all of the
    customer's orders, for every event redelivered after a crash or brought again by a switch's tail).
    `touched` are stream ids to treat as settled even without deliveries (a stream being resumed).
    """
    plan = ViewPlan()
    # Each stream type's documents and written deliveries are the same for every view: built once a batch.
    per_type: dict[str, tuple[dict[str, Document], dict[str, list[Delivery]]]] = {}
    for view in views:
        plan.keys[view.name] = set()
        carried = plan.carried[view.name] = {}
        full_keys: set[str] = set()
        behind = lagging.get(view.name, set())
        for stream_type, events in view.triggers.items():
            batch = batches.get(stream_type)
            if batch is None:
                continue
            if stream_type not in per_type:
                per_type[stream_type] = (batch.current_docs(), batch.written())
            docs, written = per_type[stream_type]
            triggers = _view_triggers(batch, written, behind)
            own_key = view.key_fields.get(stream_type) is None
            every = events == EVERY_EVENT
            for stream_id in set(triggers) | (touched & set(docs)):
                applied = triggers.get(stream_id, ())
                # `view.triggered_by` inlined (every event, or one of `events`); keys only for triggered streams.
                if not (
                    stream_id in behind
                    or (every and (applied or stream_id in touched))
                    or any(d.recorded.event_type in events for d in applied)
                ):
                    continue
                full = stream_id in behind
                doc = docs.get(stream_id)
                keys = view.keys_of(stream_type, stream_id, doc)
                if not keys:
                    continue
                for key in keys:
                    plan.needs(stream_id, view.name, key)
                    if own_key or view.stamp_field is None:
                        full_keys.add(key)  # the key's own document changed: every target may need it
                    else:
                        version = 0 if full else int((doc or {}).get(view.stamp_field) or 0)
                        carried[key] = min(version, carried.get(key, version))
        for key in full_keys:
            carried.pop(key, None)
    return plan


def _view_triggers(
    batch: ProjectionBatch, written: dict[str, list[Delivery]], behind: set[str]
) -> dict[str, list[Delivery]]:
    """The deliveries that may call for a view, by stream id: those written (`batch.written()`), and for a stream
    behind on the view the duplicates too (the view is done in full for it whatever it brings)."""
    if not behind:
        return written
    triggers = dict(written)
    for stream_id, deliveries in batch.settled().items():
        if stream_id in behind:
            triggers[stream_id] = deliveries
    return triggers


def view_steps(
    plan: ViewPlan,
    view: str,
    batches: Iterable[ProjectionBatch],
    checkpoints: Mapping[str, int],
    resuming: set[str],
    behind: set[str],
) -> dict[str, list[Step]]:
    """Per key of `view`, the steps (document before, document after) of the streams that need it, for the keys
    whose every such stream this batch wrote onto a document the view counts as it is (views complete), not
    resuming: a document at its checkpoint, or ahead of it only by events the view does not follow (not in
    `behind`, `lagging_views`).

    Those keys can be brought forward by the steps alone (an incrementing view); the others are left out and
    must be recomputed (`checkpoints`: each stream's checkpoint version, 0 or absent for none).
    """
    fresh: dict[str, Step] = {}
    for batch in batches:
        written = batch.written()
        for change in batch.result.changes:
            sid = change.doc_id
            before = batch.docs.get(sid)
            version, checkpoint = stored_version(before), checkpoints.get(sid, 0)
            counted = version == checkpoint or (version > checkpoint and sid not in behind)
            if sid in written and sid not in resuming and counted:
                fresh[sid] = (before, change.new_doc)
    steps: dict[str, list[Step]] = {}
    stale: set[str] = set()
    for sid, needs in plan.depends.items():
        for name, key in needs:
            if name != view:
                continue
            step = fresh.get(sid)
            if step is None:
                stale.add(key)
            else:
                steps.setdefault(key, []).append(step)
    return {key: found for key, found in steps.items() if key not in stale}
