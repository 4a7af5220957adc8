"""Composition of the command side: PostgreSQL pool, handler, gRPC server, health, reflection and the relay."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from functools import partial

import asyncpg
import grpc
from cqrs.orders.v1 import (
    command_service_pb2,
    command_service_pb2_grpc,
    customer_service_pb2,
    customer_service_pb2_grpc,
)
from grpc_health.v1 import _async as health_aio  # the asyncio HealthServicer (also exported as health.aio)
from grpc_health.v1 import health_pb2
from prometheus_client import CollectorRegistry, Gauge

from command_service.api.customers import CustomerCommandServicer
from command_service.api.orders import OrderCommandServicer
from command_service.config import CommandServiceSettings
from command_service.event_store import EventStore, keep_session
from command_service.event_store_probe import EventStoreProbe
from command_service.group_commit import GroupCommitter
from command_service.handlers import customer_handler, order_handler
from command_service.metrics import OutboxMetrics
from command_service.relay import OutboxRelay, RelaySettings
from command_service.stream_cache import StreamCache
from core.error_text import describe_error
from core.grpc_assembly import Service, assemble_server
from core.health import Readiness
from core.metrics import MetricsServer, start_metrics_server
from core.supervisor import Supervisor

log = logging.getLogger(__name__)

SERVICE_NAME = command_service_pb2.DESCRIPTOR.services_by_name["OrderCommandService"].full_name
CUSTOMER_SERVICE_NAME = customer_service_pb2.DESCRIPTOR.services_by_name["CustomerCommandService"].full_name
HEALTH_INTERVAL_SECONDS = 2.0
# Health name of the outbox relay (see `_probe`), and how long it may make no progress before it is reported.
RELAY_HEALTH_SERVICE = "outbox-relay"
RELAY_STALL_SECONDS = 30.0
RELAY_TASK = "outbox-relay"
EVENT_STORE_CONDITION = "event store (PostgreSQL) reachable"
TASKS_CONDITION = "background tasks running"


@dataclass
class RunningCommandServer:
    server: grpc.aio.Server
    port: int
    pool: asyncpg.Pool
    store: EventStore
    relay: OutboxRelay | None
    supervisor: Supervisor
    health: health_aio.HealthServicer
    readiness: Readiness
    grace_seconds: float
    metrics: MetricsServer | None = None
    registry: CollectorRegistry | None = None

    async def stop(self) -> None:
        """Graceful: report NOT_SERVING, finish in-flight RPCs within the grace period, then stop the relay.

        Every wait is bounded, so the process ends (and closes its pools) even when the relay's pass or
        PostgreSQL takes longer than the grace period.
        """
        await self.health.enter_graceful_shutdown()
        await self.server.stop(self.grace_seconds)
        if self.relay is not None:
            self.relay.stop()
        await self.supervisor.stop(timeout=5.0, drain=(RELAY_TASK,), drain_timeout=max(self.grace_seconds, 1.0))
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.store.close(), timeout=5.0)
        try:
            await asyncio.wait_for(self.pool.close(), timeout=5.0)
        except Exception as exc:  # in-flight work past every grace period: drop the connections
            log.warning("closing the PostgreSQL pool took too long (%r); terminating its connections", exc)
            self.pool.terminate()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)


async def start_command_server(
    settings: CommandServiceSettings, *, health_interval: float = HEALTH_INTERVAL_SECONDS
) -> RunningCommandServer:
    """Starts everything and returns once the gRPC port is bound (PostgreSQL may still be down: it retries);
    PostgreSQL is probed every `health_interval` seconds while it answers."""
    registry = CollectorRegistry()
    pool = await asyncpg.create_pool(
        settings.postgres_dsn,
        min_size=0,  # lazily: the service starts (NOT_SERVING) even when PostgreSQL is down
        max_size=settings.postgres_pool_max,
        timeout=settings.postgres_timeout_seconds,
        command_timeout=settings.postgres_timeout_seconds,
        reset=keep_session,
    )
    committer = (
        GroupCommitter(
            pool,
            timeout=settings.postgres_timeout_seconds,
            max_batch=settings.group_commit_max_batch,
            flushers=settings.group_commit_flushers,
            registry=registry,
        )
        if settings.group_commit
        else None
    )
    store = EventStore(pool, command_timeout=settings.postgres_timeout_seconds, committer=committer, registry=registry)

    # A whole command (load, decide, append, retries) gets two statement timeouts: past that, PostgreSQL is not
    # answering, and the caller is better served by UNAVAILABLE now than by its own deadline.
    command_seconds = 2 * settings.postgres_timeout_seconds
    streams = StreamCache(store, settings.stream_cache_size, registry)  # one for both: orders check customers
    orders = OrderCommandServicer(order_handler(store, settings.max_append_attempts, command_seconds, streams))
    customers = CustomerCommandServicer(customer_handler(store, settings.max_append_attempts, command_seconds, streams))
    try:
        assembled = await assemble_server(
            settings,
            component="command service",
            listen=settings.command_listen,
            services=(
                Service(
                    SERVICE_NAME, partial(command_service_pb2_grpc.add_OrderCommandServiceServicer_to_server, orders)
                ),
                Service(
                    CUSTOMER_SERVICE_NAME,
                    partial(customer_service_pb2_grpc.add_CustomerCommandServiceServicer_to_server, customers),
                ),
            ),
            access="write",
            # NOT_SERVING until the first PostgreSQL probe succeeds.
            conditions=((EVENT_STORE_CONDITION, False), (TASKS_CONDITION, True)),
            registry=registry,
        )
    except RuntimeError:
        await pool.close()
        raise
    server, port = assembled.server, assembled.port
    health_servicer, readiness = assembled.health, assembled.readiness
    if settings.relay_enabled:
        await health_servicer.set(RELAY_HEALTH_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    await server.start()

    async def tasks_health(healthy: bool) -> None:
        await readiness.set(TASKS_CONDITION, healthy)

    supervisor = Supervisor("command service", on_health_change=tasks_health)
    relay: OutboxRelay | None = None
    if settings.relay_enabled:
        relay = OutboxRelay(
            settings.postgres_dsn,
            settings.nats_url,
            RelaySettings(
                stream_name=settings.stream_name,
                subject_prefix=settings.subject_prefix,
                stream_partitions=settings.stream_partitions,
                stream_replicas=settings.stream_replicas,
                batch_size=settings.relay_batch_size,
                poll_interval=settings.relay_poll_seconds,
                fetch_interval=settings.relay_fetch_interval_ms / 1000,
                lease_seconds=settings.relay_lease_seconds,
            ),
            registry=registry,
        )
        supervisor.start(RELAY_TASK, relay.run)
    probe = EventStoreProbe(settings.postgres_dsn, settings.postgres_timeout_seconds)
    outbox_metrics = OutboxMetrics(registry)
    supervisor.start(
        "health-probe", lambda: _probe(probe, readiness, outbox_metrics.up, health_servicer, relay, health_interval)
    )
    metrics_server: MetricsServer | None = None
    if settings.command_metrics_port is not None:
        supervisor.start("outbox-metrics", lambda: outbox_metrics.observe_forever(pool), essential=False)
        metrics_server = start_metrics_server(registry, settings.metrics_host, settings.command_metrics_port)
    log.info("command service listening on %s (port %d, %s)", settings.command_listen, port, _transport(settings))
    return RunningCommandServer(
        server,
        port,
        pool,
        store,
        relay,
        supervisor,
        health_servicer,
        readiness,
        settings.grace_seconds,
        metrics_server,
        registry,
    )


async def _probe(
    probe: EventStoreProbe,
    readiness: Readiness,
    up: Gauge,
    servicer: health_aio.HealthServicer,
    relay: OutboxRelay | None,
    interval: float,
) -> None:
    """Ready only while PostgreSQL answers (on the probe's own connection: a busy pool is not an outage), and
    `up` (`cqrs_postgres_up`) says the same; NATS being down does not stop commands (the outbox buffers).

    The relay has a health name of its own (`outbox-relay`): NOT_SERVING while this replica's relay is stuck
    (neither relaying nor standing by), so an operator sees a frozen outbox even while commands succeed.
    """
    reachable: bool | None = None
    relay_ok: bool | None = None
    try:
        while True:
            try:
                await probe.check()
                ok = True
            except Exception as exc:  # any failure means "not serving"; the reason is logged once per change
                ok = False
                if reachable is not False:
                    log.warning("event store (PostgreSQL) unavailable: %s", describe_error(exc))
            if ok and reachable is False:
                log.info("event store (PostgreSQL) reachable again")
            reachable = ok
            up.set(1 if ok else 0)
            await readiness.set(EVENT_STORE_CONDITION, ok)
            if relay is not None:
                relay_ok = await _report_relay(relay, relay_ok, servicer)
            await asyncio.sleep(interval if ok else 0.5)
    finally:
        await probe.close()


async def _report_relay(relay: OutboxRelay, was_ok: bool | None, servicer: health_aio.HealthServicer) -> bool:
    """Sets the relay's health name when its state changed; returns the state."""
    now_ok = relay.stalled_for() < RELAY_STALL_SECONDS
    if now_ok != was_ok:
        if not now_ok:
            log.warning("outbox relay has made no progress for %.0fs", relay.stalled_for())
        status = health_pb2.HealthCheckResponse.SERVING if now_ok else health_pb2.HealthCheckResponse.NOT_SERVING
        await servicer.set(RELAY_HEALTH_SERVICE, status)
    return now_ok


def _transport(settings: CommandServiceSettings) -> str:
    if settings.tls_client_ca_file is not None:
        return "mutual TLS"
    return "TLS" if settings.tls_cert_file is not None else "plaintext"
