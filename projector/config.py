"""Projector settings, read from `CQRS_*` environment variables only (once, in `__main__`)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.subjects import DEFAULT_PARTITIONS, DEFAULT_STREAM_NAME, SUBJECT_PREFIX
from core.write_concern import DEFAULT_WRITE_CONCERN, WRITE_CONCERN_PATTERN, as_w


class ProjectorSettings(BaseSettings):
    """Every server address is overridable so the same code runs against local and production servers."""

    model_config = SettingsConfigDict(env_prefix="CQRS_", extra="ignore", frozen=True)

    nats_url: str = "nats://127.0.0.1:4222"
    mongo_url: str = "mongodb://127.0.0.1:27017/?directConnection=true"
    mongo_database: str = "cqrs"
    # Server selection / connect timeout; socket reads get a multiple of it (a bulk write takes longer).
    mongo_timeout_ms: int = Field(default=2000, gt=0)
    # Write concern of every projector write (always journaled): "majority" on a replica set, or a member count.
    mongo_write_concern: str = Field(default=DEFAULT_WRITE_CONCERN, pattern=WRITE_CONCERN_PATTERN)
    # MongoDB's retryable writes (the driver repeats a write once after a network error or a failover, and the
    # server keeps a record of every write to recognise the repeat). Off: every projector write is idempotent and a
    # failed batch is redelivered whole, so the records are pure cost (docs/performance.md, "Levers measured in one
    # run").
    mongo_retry_writes: bool = False
    # A batch's independent MongoDB calls (its loads, then its derived views) sent at once: against a MongoDB that
    # serves them in parallel this saves round trips. False: one after the other, for a server that works through
    # requests one at a time (the local stand-in, SecantusDB: concurrent requests only contend for it;
    # docs/performance.md, "Levers measured in one run").
    projector_parallel_mongo_calls: bool = True
    stream_name: str = DEFAULT_STREAM_NAME
    subject_prefix: str = SUBJECT_PREFIX
    # Partitions the stream maps subjects to (by stream id), for partition-owning projector replicas; 0: none.
    # Used only when the stream is created: an existing stream keeps its configuration.
    stream_partitions: int = Field(default=DEFAULT_PARTITIONS, ge=0, le=1024)
    # JetStream servers holding the stream (3 on a 3-node cluster); only when the stream is created.
    stream_replicas: int = Field(default=1, ge=1, le=5)

    projector_durable: str = "orders-projector"
    # Partition leases (a partitioned stream): a replica that stops renewing loses its partitions after this long
    # (a crash: rebalance time); renewed every third of it.
    projector_lease_seconds: float = Field(default=10.0, ge=1.0)
    projector_batch_size: int = Field(default=200, ge=1, le=10_000)
    projector_fetch_timeout_seconds: float = Field(default=1.0, gt=0)
    # Redelivery if a projector dies holding messages; must exceed the time one batch takes.
    projector_ack_wait_seconds: float = Field(default=30.0, gt=0)
    # Bounds the messages a consumer (all replicas together) holds un-acked, including naked-with-delay ones.
    projector_max_ack_pending: int = Field(default=2000, ge=1)
    # Cap of the exponential backoff used for MongoDB outages and for version gaps.
    projector_max_backoff_seconds: float = Field(default=5.0, gt=0)
    # A gap, or a write MongoDB refuses, is retried with backoff; offered this many times, its stream is parked
    # (its messages copied to MongoDB and acknowledged) so that it never holds max_ack_pending slots for long.
    projector_park_after_deliveries: int = Field(default=6, ge=1)
    # How often parked streams are counted (metric) and the self-healing ones (needs_upgrade, gap, write_failed)
    # are tried again from their held copies.
    projector_resume_interval_seconds: float = Field(default=5.0, gt=0)
    # How often the sales report's shards are swept of the tags their orders' checkpoints cover (a tag goes at
    # the first sweep 120 s or more after the one that found it covered; `projector.sales_tags`).
    projector_sales_tag_sweep_seconds: float = Field(default=30.0, gt=0)
    # How often the active read-model generation is checked (a cutover by `cqrs rebuild` moves the projector to
    # the new database within this long) and the projector's writer heartbeat refreshed.
    generation_poll_seconds: float = Field(default=1.0, gt=0)
    # How often a one-line throughput/lag summary is logged (only when events were applied).
    projector_stats_interval_seconds: float = Field(default=10.0, gt=0)
    # Serve Prometheus `/metrics` on this port (0: any free port); unset: no HTTP server.
    projector_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    # SIGTERM: the batch in hand gets this long to be written and acked; after that the loop is cancelled and its
    # unacked messages are redelivered by JetStream (after ack_wait) to another replica or the next start.
    grace_seconds: float = Field(default=10.0, ge=0)

    log_level: str = "INFO"

    @property
    def mongo_write_concern_w(self) -> int | str:
        """`mongo_write_concern` as PyMongo's `w`: "majority" or an int."""
        return as_w(self.mongo_write_concern)
