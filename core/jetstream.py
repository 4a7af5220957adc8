"""Creates the JetStream event stream when missing (called at start-up by the relay and the projector)."""

from __future__ import annotations

import logging

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig, SubjectTransform
from nats.js.errors import NotFoundError, ServiceUnavailableError

from core.subjects import DEFAULT_PARTITIONS, partition_mapping, partitions_of_mapping, stream_subjects

log = logging.getLogger(__name__)

# What a JetStream API request fails with while JetStream cannot serve it (a cluster electing its leaders, or one
# without a quorum): a 503 or no responders (nats-py raises `ServiceUnavailableError` for both), or no answer in
# time. Asking again later is the cure; any other API error is an answer.
JETSTREAM_UNAVAILABLE: tuple[type[Exception], ...] = (ServiceUnavailableError, nats.errors.TimeoutError, TimeoutError)


def event_stream_config(
    name: str,
    subject_prefix: str,
    duplicate_window_seconds: float = 120.0,
    max_age_seconds: float = 7 * 24 * 3600.0,
    *,
    partitions: int = DEFAULT_PARTITIONS,
    replicas: int = 1,
) -> StreamConfig:
    """File-backed, limits-retention stream; the duplicate window dedupes relay re-publishes by Nats-Msg-Id.

    PostgreSQL stays the source of truth, so the stream may age out old events (max_age): a new projection is
    rebuilt from the event store, not from the stream. `partitions` > 0 maps every subject to its partition on
    the way in (`core.subjects`); `replicas` is the number of JetStream servers holding the stream (3 on a
    cluster: it survives the loss of one).
    """
    transform = None
    if partitions > 0:
        source, destination = partition_mapping(partitions, subject_prefix)
        transform = SubjectTransform(src=source, dest=destination)
    return StreamConfig(
        name=name,
        description="CQRS domain events, published from the PostgreSQL outbox",
        subjects=stream_subjects(subject_prefix),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=max_age_seconds,
        duplicate_window=duplicate_window_seconds,
        num_replicas=replicas,
        subject_transform=transform,
    )


_COMPARED_FIELDS = (
    "subjects",
    "retention",
    "storage",
    "max_age",
    "duplicate_window",
    "num_replicas",
    "discard",
    "subject_transform",
)


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> StreamConfig:
    """Adds the stream when it is missing; an existing stream is left exactly as it is. Returns its config.

    Operators tune the stream (replicas, retention, storage) with the NATS tools; a service restarting must never
    undo that, so differences from our defaults are only logged.
    """
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        info = await js.add_stream(config)
        log.info("created JetStream stream %s", config.name)
        return info.config
    differences = stream_config_differences(info.config, config)
    if differences:
        log.warning(
            "JetStream stream %s differs from this service's defaults (kept as configured): %s",
            config.name,
            "; ".join(differences),
        )
    return info.config


def stream_config_differences(existing: StreamConfig, wanted: StreamConfig) -> list[str]:
    """Human-readable `field: existing (default wanted)` for each compared field that differs (pure)."""
    differences = []
    for field in _COMPARED_FIELDS:
        have, want = getattr(existing, field), getattr(wanted, field)
        if field == "subjects":
            have, want = sorted(have or []), sorted(want or [])
        if have != want:
            differences.append(f"{field}: {have!r} (default {want!r})")
    return differences


def stream_partitions(config: StreamConfig) -> int:
    """How many partitions the stream maps its subjects to (0: none, a stream from before partitioning)."""
    transform = config.subject_transform
    prefix_source = transform.src if transform is not None else None
    if transform is None or not prefix_source or not prefix_source.endswith(".*.*"):
        return 0
    return partitions_of_mapping(transform.dest, prefix_source.removesuffix(".*.*"))


def nats_servers(urls: str) -> list[str]:
    """`CQRS_NATS_URL` may list several servers of a cluster, comma-separated; nats-py wants a list."""
    return [url.strip() for url in urls.split(",") if url.strip()]
