"""Command-side metrics: the outbox backlog and the age of its oldest row (how far JetStream is behind)."""

from __future__ import annotations

import asyncio
import logging

import asyncpg
from prometheus_client import CollectorRegistry, Gauge

log = logging.getLogger(__name__)


class OutboxMetrics:
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
        """Refreshes the gauges every `interval` seconds; a failed probe marks PostgreSQL down, never raises."""
        while True:
            try:
                row = await pool.fetchrow(
                    """SELECT count(*) AS backlog,
                              coalesce(extract(epoch FROM clock_timestamp() - min(enqueued_at)), 0) AS age
                         FROM outbox""",
                    timeout=interval,
                )
                assert row is not None
                self.backlog.set(row["backlog"])
                self.oldest_age.set(float(row["age"]))
                self.up.set(1)
            except Exception as exc:  # reported through the gauge; the health probe logs the outage
                log.debug("outbox metrics probe failed: %r", exc)
                self.up.set(0)
            await asyncio.sleep(interval)
