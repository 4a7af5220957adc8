"""Creates or updates the JetStream event stream idempotently (called at start-up by the relay and the projector)."""

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


async def ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Adds the stream, or updates it when it exists (both are idempotent on the server)."""
    assert config.name is not None
    try:
        await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        log.info("created JetStream stream %s", config.name)
        return
    await js.update_stream(config)
