"""Command-side metrics: the outbox backlog and the age of its oldest row (how far JetStream is behind)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger(__name__)


class OutboxMetrics:
    """The outbox gauges, and `up`: set by the readiness probe (`command_service.server`), which asks PostgreSQL
    on a connection of its own, so that a busy pool neither freezes it nor fails it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.backlog = Gauge(
            "cqrs_outbox_backlog", "Events committed but not yet acknowledged by JetStream", registry=registry
        )
        self.oldest_age = Gauge(
            "cqrs_outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row (0 when empty)",
            registry=registry,
        )
        self.up = Gauge("cqrs_postgres_up", "1 while the event store answers", registry=registry)

    async def observe_forever(self, pool: asyncpg.Pool, interval: float = 2.0) -> None:
        """Refreshes the outbox gauges every `interval` seconds, each read bounded by it (the wait for a pooled
        connection included); a failed read leaves them as they were (PostgreSQL's state is `up`'s), never raises."""
        while True:
            try:
                async with pool.acquire(timeout=interval) as conn:
                    row = await conn.fetchrow(
                        """SELECT count(*) AS backlog,
                                  coalesce(extract(epoch FROM clock_timestamp() - min(enqueued_at)), 0) AS age
                             FROM outbox""",
                        timeout=interval,
                    )
                assert row is not None
                self.backlog.set(row["backlog"])
                self.oldest_age.set(float(row["age"]))
            except Exception as exc:  # the health probe reports and logs an outage
                log.debug("outbox metrics read failed: %r", exc)
            await asyncio.sleep(interval)
