"""Read-model projections: each module defines one `Projection`, a table of pure `on_<event>` handlers.

A handler takes the current document (or None when the entity has no document yet), the recorded event and its
decoded payload, and returns the new document without mutating its input. The runner owns everything else:
ordering, the version guard, batching, acknowledgements.

The package lives in `core/` because two processes run the same fold: the projector (through
`projector.registry`) and the query service, which folds an order's history for as-of reads
(`core.projections.order_history`).

Adding a read model: write a module with its own handler table and a `Projection`, and add it to
`projector.registry.PROJECTIONS`. A view that copies one read model's data into another's documents is a
`DerivedView` in `projector.registry.VIEWS`, declaring the events that make it stale.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.envelope import RecordedEvent
from core.events import Event

Document = dict[str, Any]
Handler = Callable[[Document | None, RecordedEvent, Event], Document]
IndexKeys = Sequence[tuple[str, int]]


class UnhandledEvent(ValueError):
    """The projection has no handler for this event type (a poison message for this read model)."""


@dataclass(frozen=True, slots=True)
class Projection:
    """One read model: which stream type it follows, where its documents live, and how events change them.

    Documents are keyed by the aggregate's stream id (`_id`) and carry `version` (stream version applied),
    `position` (global position of the last applied event) and `updated_at`; the runner guards on `version`.
    """

    name: str
    stream_type: str
    collection: str
    handlers: Mapping[str, Handler]
    indexes: Sequence[IndexKeys] = field(default_factory=tuple)
    # Fields of the document that other writers keep current (e.g. an order's copy of its customer's name): the
    # version-guarded write sets them only when it creates the document, so it never overwrites a newer value
    # written concurrently by that other writer.
    foreign_fields: frozenset[str] = frozenset()
    # Bumped when a change to the handlers changes documents already written (a new field, a fixed bug): a
    # generation of the read model built with another version is rebuilt on deployment (`cqrs rebuild
    # --if-needed`), so the documents of old events get the change too.
    version: int = 1

    def handles(self, event_type: str) -> bool:
        return event_type in self.handlers

    def project(self, doc: Document | None, recorded: RecordedEvent, event: Event) -> Document:
        """Applies one event and stamps the bookkeeping fields; raises ValueError if it cannot apply."""
        handler = self.handlers.get(recorded.event_type)
        if handler is None:
            raise UnhandledEvent(f"projection {self.name!r} has no handler for {recorded.event_type!r}")
        new_doc = handler(doc, recorded, event)
        new_doc["_id"] = recorded.stream_id
        new_doc["version"] = recorded.version
        new_doc["position"] = recorded.position
        new_doc["updated_at"] = recorded.recorded_at
        return new_doc


EVERY_EVENT: frozenset[str] = frozenset({"*"})
"""A trigger set meaning every event of the stream type."""


@dataclass(frozen=True, slots=True)
class DerivedView:
    """A cross-model view: fields of one read model's documents computed from other streams' documents.

    The view is keyed by an entity (e.g. a customer id): `key_fields[t]` names the field of a stream type `t`'s
    document that holds the key (None: the stream id is the key). After a batch applies one of `triggers[t]` to a
    stream of type `t`, the view of that stream's key is recomputed (idempotently, from the documents, never
    accumulated). `stamp_field`, if any, is the field of the target documents that records the key document's
    version they copied (lets a writer skip documents already current).
    """

    name: str
    collection: str  # where the view's fields live
    fields: frozenset[str]  # the fields it owns there (the projection declares them foreign)
    triggers: Mapping[str, frozenset[str]]  # stream type -> event types after which the view is recomputed
    key_fields: Mapping[str, str | None]  # stream type -> document field naming the key (None: the stream id)
    stamp_field: str | None = None
    version: int = 1  # as `Projection.version`: bumped when the view's computed fields change meaning
    # A report: the view writes whole documents of its own collection (no projection writes it), and `fields`
    # lists their fields.
    owns_collection: bool = False
    # For a view where one document belongs to several keys (a report by day: an order counts on the day it was
    # placed and on the day it was cancelled): (stream type, stream id, document) -> keys. Replaces `key_fields`.
    keys_from: Callable[[str, str, Document | None], tuple[str, ...]] | None = None

    def triggered_by(self, stream_type: str, event_type: str) -> bool:
        events = self.triggers.get(stream_type, frozenset())
        return event_type in events or events == EVERY_EVENT

    def key_of(self, stream_type: str, stream_id: str, doc: Document | None) -> str | None:
        """The view key a stream's document belongs to (None: not known yet, e.g. no document)."""
        field_name = self.key_fields.get(stream_type)
        if field_name is None:
            return stream_id
        value = (doc or {}).get(field_name)
        return str(value) if value else None

    def keys_of(self, stream_type: str, stream_id: str, doc: Document | None) -> tuple[str, ...]:
        """Every view key a stream's document belongs to (empty: none known yet)."""
        if self.keys_from is not None:
            return self.keys_from(stream_type, stream_id, doc)
        key = self.key_of(stream_type, stream_id, doc)
        return () if key is None else (key,)
