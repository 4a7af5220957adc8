"""JetStream naming shared by the relay (publisher) and the projector (consumer)."""

from __future__ import annotations

DEFAULT_STREAM_NAME = "CQRS_EVENTS"
SUBJECT_PREFIX = "cqrs.events"


def stream_subjects(prefix: str = SUBJECT_PREFIX) -> list[str]:
    return [f"{prefix}.>"]


def event_subject(stream_type: str, stream_id: str, prefix: str = SUBJECT_PREFIX) -> str:
    """One subject per aggregate instance, e.g. `cqrs.events.order.<id>`; ids are UUIDs, so no dots or wildcards."""
    return f"{prefix}.{stream_type}.{stream_id}"
