"""Creates the JetStream event stream when missing (called at start-up by the relay and the projector)."""

from __future__ import annotations

import logging

from nats.js import JetStreamContext
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from core.subjects import stream_subjects

log = logging.getLogger(__name__)


def event_stream_config(
    name: str,
    subject_prefix: str,
    duplicate_window_seconds: float = 120.0,
    max_age_seconds: float = 7 * 24 * 3600.0,
) -> StreamConfig:
    """File-backed, limits-retention stream; the duplicate window dedupes relay re-publishes by Nats-Msg-Id.

    PostgreSQL stays the source of truth, so the stream may age out old events (max_age): a new projection is
    rebuilt from the event store, not from the stream.
    """
    return StreamConfig(
        name=name,
        description="CQRS domain events, published from the PostgreSQL outbox",
        subjects=stream_subjects(subject_prefix),
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        max_age=max_age_seconds,
        duplicate_window=duplicate_window_seconds,
        num_replicas=1,
    )


_COMPARED_FIELDS = ("subjects", "retention", "storage", "max_age", "duplicate_window", "num_replicas", "discard")


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Adds the stream when it is missing; an existing stream is left exactly as it is.

    Operators tune the stream (replicas, retention, storage) with the NATS tools; a service restarting must never
    undo that, so differences from our defaults are only logged.
    """
    assert config.name is not None
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("created JetStream stream %s", config.name)
        return
    differences = stream_config_differences(info.config, config)
    if differences:
        log.warning(
            "JetStream stream %s differs from this service's defaults (kept as configured): %s",
            config.name,
            "; ".join(differences),
        )


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
