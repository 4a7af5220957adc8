"""Read-model projections: each module defines one `Projection`, a table of pure `on_<event>` handlers.

A handler takes the current document (or None when the entity has no document yet), the recorded event and its
decoded payload, and returns the new document without mutating its input. The runner owns everything else:
ordering, the version guard, batching, acknowledgements.

Adding a read model: write a module with its own handler table and a `Projection`, and add it to
`projector.registry.PROJECTIONS`.
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
