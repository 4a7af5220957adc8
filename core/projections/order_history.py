"""An order's change log and its earlier states, from the `history` the `orders` projection keeps (pure code).

"What did the order look like at version v (or time t)" is answered by folding the logged events up to there with
the very handlers the projector ran (`ORDERS.project`), onto no document: there is no second fold to drift from
the first. Both the query service (as-of reads) and tests use it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from core.envelope import EventMetadata, RecordedEvent
from core.events import decode_event
from core.order_events import ORDER_STREAM_TYPE
from core.projections import Document
from core.projections.orders import CUSTOMER_FIELDS, HISTORY_FIELD, ORDERS


class BeyondHistory(ValueError):
    """An as-of version after the order's last version."""


def history_of(doc: Document) -> list[Document]:
    """The order's logged events, oldest first."""
    entries: Sequence[Document] = doc.get(HISTORY_FIELD) or ()
    return sorted(entries, key=lambda entry: int(entry["version"]))


def recorded_from_entry(stream_id: str, entry: Document) -> RecordedEvent:
    """The recorded event a history entry was made from (its payload as recorded, at its schema version)."""
    recorded_at: datetime = entry["recorded_at"]
    if recorded_at.tzinfo is None:  # BSON dates are UTC; a client without tz_aware returns them naive
        recorded_at = recorded_at.replace(tzinfo=UTC)
    return RecordedEvent(
        event_id=uuid.UUID(str(entry["event_id"])),
        stream_type=ORDER_STREAM_TYPE,
        stream_id=stream_id,
        version=int(entry["version"]),
        event_type=str(entry["event_type"]),
        schema_version=int(entry["schema_version"]),
        payload=dict(entry["payload"]),
        metadata=EventMetadata(
            request_id=str(entry.get("request_id", "")),
            correlation_id=str(entry.get("correlation_id", "")),
            causation_id=str(entry.get("causation_id", "")),
            subject=str(entry.get("subject", "")),
        ),
        position=int(entry["position"]),
        recorded_at=recorded_at,
    )


def order_as_of(doc: Document, *, version: int | None = None, at: datetime | None = None) -> Document | None:
    """The order document right after `version`, or after its last event recorded at or before `at` (exactly one
    of the two); None when the order did not exist yet at `at`.

    The result may be a tombstone (`deleted: true`) when the order was deleted by then. The customer's name and
    e-mail are not order events: the result shows the current ones. Raises `BeyondHistory` for a version after
    the order's, ValueError if a logged event cannot be folded (the projector could not have applied it either).
    """
    if (version is None) == (at is None):
        raise ValueError("give exactly one of version and at")
    entries = history_of(doc)
    last = int(entries[-1]["version"]) if entries else 0
    if version is not None and version > last:
        raise BeyondHistory(f"order {doc.get('_id')} is at version {last}, not {version}")
    stream_id = str(doc["_id"])
    folded: Document | None = None
    for entry in entries:
        recorded = recorded_from_entry(stream_id, entry)
        if (version is not None and recorded.version > version) or (at is not None and recorded.recorded_at > at):
            break
        event = decode_event(recorded.event_type, recorded.schema_version, recorded.payload)
        folded = ORDERS.project(folded, recorded, event)
    if folded is None:
        return None
    return {**folded, **_current(doc, CUSTOMER_FIELDS)}


def _current(doc: Document, fields: frozenset[str]) -> dict[str, Any]:
    return {name: doc[name] for name in fields if name in doc}
