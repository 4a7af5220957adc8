"""JetStream naming shared by the relay (publisher) and the projector (consumer).

The relay publishes each event on `<prefix>.<type>.<id>`. The stream maps that subject, on the way in, to
`<prefix>.<partition>.<type>.<id>` with NATS's `partition(N, token)` function over the stream id (a hash of
the id, so every event of one aggregate lands in the same partition); projector replicas each own a set of
partitions and consume them through one durable consumer per partition. A stream created before partitioning
stores the unmapped form; both forms are parsed.
"""

from __future__ import annotations

from typing import NamedTuple

DEFAULT_STREAM_NAME = "CQRS_EVENTS"
SUBJECT_PREFIX = "cqrs.events"
DEFAULT_PARTITIONS = 8


def stream_subjects(prefix: str = SUBJECT_PREFIX) -> list[str]:
    return [f"{prefix}.>"]


def event_subject(stream_type: str, stream_id: str, prefix: str = SUBJECT_PREFIX) -> str:
    """One subject per aggregate instance, e.g. `cqrs.events.order.<id>`; ids are UUIDs, so no dots or wildcards."""
    return f"{prefix}.{stream_type}.{stream_id}"


def partition_mapping(partitions: int, prefix: str = SUBJECT_PREFIX) -> tuple[str, str]:
    """(source, destination) of the stream's subject transform that adds the partition token."""
    return f"{prefix}.*.*", f"{prefix}.{{{{partition({partitions},2)}}}}.{{{{wildcard(1)}}}}.{{{{wildcard(2)}}}}"


def partitions_of_mapping(destination: str | None, prefix: str = SUBJECT_PREFIX) -> int:
    """The partition count of a stream's transform destination; 0 when the stream has no partition mapping."""
    head = f"{prefix}.{{{{partition("
    if not destination or not destination.startswith(head):
        return 0
    count, _, _ = destination[len(head) :].partition(",")
    return int(count) if count.isdigit() else 0


def partition_filter(partition: int, prefix: str = SUBJECT_PREFIX) -> str:
    """The filter subject of partition `partition`'s consumer."""
    return f"{prefix}.{partition}.>"


class EventSubject(NamedTuple):
    partition: int | None  # None: stored before the stream had a partition mapping
    stream_type: str
    stream_id: str


def parse_event_subject(subject: str, prefix: str = SUBJECT_PREFIX) -> EventSubject | None:
    """`<prefix>[.<partition>].<type>.<id>` -> its parts; None for any other subject."""
    if not subject.startswith(prefix + "."):
        return None
    tokens = subject[len(prefix) + 1 :].split(".")
    if len(tokens) == 3 and tokens[0].isdigit() and all(tokens[1:]):
        return EventSubject(int(tokens[0]), tokens[1], tokens[2])
    if len(tokens) == 2 and all(tokens):
        return EventSubject(None, tokens[0], tokens[1])
    return None
