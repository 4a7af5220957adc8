"""command_service settings, read once from the environment in __main__."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from core.grpc_server import ServerSecurity
from core.subjects import DEFAULT_PARTITIONS, DEFAULT_STREAM_NAME, SUBJECT_PREFIX


class CommandServiceSettings(ServerSecurity):
    """Environment: CQRS_<FIELD>; gRPC limits, TLS and auth come from ServerSecurity (core/grpc_server.py)."""

    model_config = SettingsConfigDict(env_prefix="CQRS_", extra="ignore")

    postgres_dsn: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    nats_url: str = "nats://127.0.0.1:4222"
    stream_name: str = DEFAULT_STREAM_NAME
    subject_prefix: str = SUBJECT_PREFIX
    # Partitions the stream maps subjects to (by stream id), for partition-owning projector replicas; 0: none.
    # Used only when the stream is created: an existing stream keeps its configuration.
    stream_partitions: int = Field(default=DEFAULT_PARTITIONS, ge=0, le=1024)
    # JetStream servers holding the stream (3 on a 3-node cluster); only when the stream is created.
    stream_replicas: int = Field(default=1, ge=1, le=5)
    command_listen: str = "127.0.0.1:50051"
    postgres_pool_max: int = Field(default=32, ge=1)
    postgres_timeout_seconds: float = Field(default=5.0, gt=0)
    max_append_attempts: int = Field(default=5, ge=1)
    # Streams kept decoded in memory (and at most 20 events per stream of it), so that a command on one of them
    # decides without reading PostgreSQL (stream_cache.py; the append's version check keeps it safe with several
    # replicas). About 40 MB at 10,000. Where commands are spread request by request over replicas its entries go
    # stale; it then stops answering on its own (stream_cache.StaleRatio), so it costs next to nothing (measured).
    stream_cache_size: int = Field(default=10_000, ge=0, le=10_000_000)
    # Group commit: concurrent appends share transactions (one durable commit for many commands).
    group_commit: bool = True
    group_commit_max_batch: int = Field(default=64, ge=1, le=1000)
    group_commit_flushers: int = Field(default=4, ge=1, le=64)
    relay_batch_size: int = Field(default=500, ge=1, le=10_000)
    relay_poll_seconds: float = Field(default=1.0, gt=0)
    # While commits keep coming the relay reads the outbox at most once per this many milliseconds (0: at every
    # commit's NOTIFY), so that one read and one publish carry the commits of that interval (relay.py).
    relay_fetch_interval_ms: float = Field(default=10.0, ge=0, le=1000)
    # The active relay's lease: a replica frozen or cut off this long loses it to a standby (relay_lease.py).
    relay_lease_seconds: float = Field(default=15.0, ge=3)
    relay_enabled: bool = True
    grace_seconds: float = Field(default=10.0, ge=0)
    # Prometheus /metrics; unset = no exporter, 0 = any free port.
    command_metrics_port: int | None = Field(default=None, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"
    log_level: str = "INFO"
