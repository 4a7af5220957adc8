"""Settings of the query service, read from environment variables only (once, in `__main__`)."""

from __future__ import annotations

import logging
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from core.grpc_server import ServerSecurity


class QuerySettings(ServerSecurity):
    """Environment: CQRS_MONGO_URL, CQRS_MONGO_DATABASE, CQRS_QUERY_LISTEN, CQRS_MONGO_TIMEOUT_MS,
    CQRS_GRACE_SECONDS, CQRS_LOG_LEVEL, CQRS_QUERY_MAX_WAIT_SECONDS, CQRS_QUERY_MAX_WAITERS,
    CQRS_QUERY_CONSISTENCY_POLL_MS, CQRS_QUERY_MAX_WATCHERS, CQRS_QUERY_METRICS_PORT, CQRS_METRICS_HOST,
    CQRS_GENERATION_POLL_SECONDS;
    gRPC limits, TLS and auth (CQRS_GRPC_*, CQRS_TLS_*, CQRS_AUTH_*) come from ServerSecurity (core/grpc_server.py).

    Unrelated CQRS_* variables (the other services' settings) are ignored, so one environment can serve all
    three processes. No `.env` file is read: configuration comes from the environment only.
    """

    model_config = SettingsConfigDict(env_prefix="CQRS_", extra="ignore", frozen=True)

    mongo_url: str = "mongodb://127.0.0.1:27017/?directConnection=true"
    mongo_database: Annotated[str, Field(min_length=1)] = "cqrs"
    query_listen: Annotated[str, Field(min_length=1)] = "127.0.0.1:50052"
    # One budget for server selection, socket reads and the whole operation (client-side operation timeout),
    # so a request against an unreachable MongoDB fails fast with UNAVAILABLE instead of hanging.
    mongo_timeout_ms: Annotated[int, Field(gt=0)] = 2000
    grace_seconds: Annotated[float, Field(ge=0)] = 10.0
    log_level: str = "INFO"
    # Read-your-writes: a query with consistency tokens waits at most this long (and never past the caller's
    # deadline) for the read model to reflect them.
    query_max_wait_seconds: Annotated[float, Field(ge=0)] = 5.0
    # Queries waiting for tokens at once; more are RESOURCE_EXHAUSTED (each one holds a future and its token).
    query_max_waiters: Annotated[int, Field(gt=0)] = 10_000
    # How often the one shared waiter reads the checkpoints of all pending tokens (one query per round).
    query_consistency_poll_ms: Annotated[int, Field(ge=1, le=1000)] = 15
    # Concurrent WatchOrder streams; more are RESOURCE_EXHAUSTED.
    query_max_watchers: Annotated[int, Field(gt=0)] = 10_000
    # Prometheus /metrics (RPC counts and latencies); unset = no exporter, 0 = any free port.
    query_metrics_port: Annotated[int | None, Field(ge=0, le=65535)] = None
    metrics_host: str = "127.0.0.1"
    # How often the active read-model generation is checked: after a cutover (`cqrs rebuild --cutover`) every
    # query reads the new generation's database within this long (CQRS_GENERATION_POLL_SECONDS).
    generation_poll_seconds: Annotated[float, Field(gt=0, le=60)] = 1.0

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ValueError(f"unknown log level {value!r}")
        return level
