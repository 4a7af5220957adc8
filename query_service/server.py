"""Composition of the query service: gRPC servers, health, reflection, MongoDB watcher, shared waiters, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol

import grpc
from cqrs.orders.v1 import customer_service_pb2, customer_service_pb2_grpc, query_service_pb2, query_service_pb2_grpc
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from core.error_text import describe_error
from core.generations import GenerationFollower
from core.grpc_assembly import Service, assemble_server
from core.health import Readiness
from core.metrics import MetricsServer, start_metrics_server
from core.supervisor import Supervisor
from query_service.api.customers import CustomerQueryServicer
from query_service.api.orders import OrderQueryServicer
from query_service.config import QuerySettings
from query_service.consistency import CHECKPOINTS_COLLECTION, ConsistencyWaiter, ReadYourWrites
from query_service.customer_read_model import CUSTOMER_INDEXES, CustomerReadModel
from query_service.read_model import (
    ORDER_INDEXES,
    Document,
    OrderReadModel,
    ensure_indexes,
    make_client,
    redact_mongo_url,
)
from query_service.sales_report import SalesReportReader
from query_service.watch import OrderWatchHub

log = logging.getLogger(__name__)

SERVICE_NAME: Final[str] = query_service_pb2.DESCRIPTOR.services_by_name["OrderQueryService"].full_name
CUSTOMER_SERVICE_NAME: Final[str] = customer_service_pb2.DESCRIPTOR.services_by_name["CustomerQueryService"].full_name
HEALTH_INTERVAL_SECONDS: Final = 2.0
READ_MODEL_CONDITION: Final = "read model (MongoDB) reachable"
GENERATION_CONDITION: Final = "active read-model generation known"
TASKS_CONDITION: Final = "background tasks running"


class _AsyncHealth(Protocol):
    """The part of `grpc_health.v1.health.aio.HealthServicer` we use (the stubs do not describe it)."""

    async def set(self, service: str, status: Any) -> None: ...

    async def enter_graceful_shutdown(self) -> None: ...


@dataclass
class RunningServer:
    """A started query server. `port` is the bound port (useful after binding port 0)."""

    port: int
    address: str
    server: grpc.aio.Server
    health: _AsyncHealth
    client: AsyncMongoClient[Document]
    probe_client: AsyncMongoClient[Document]
    grace_seconds: float
    consistency_waiter: ConsistencyWaiter
    watch_hub: OrderWatchHub
    supervisor: Supervisor
    readiness: Readiness
    _stop_watching: asyncio.Event = field(repr=False)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    metrics: MetricsServer | None = None
    _stopped: bool = field(default=False, repr=False)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: report NOT_SERVING, let in-flight RPCs finish within `grace`, close MongoDB."""
        if self._stopped:
            return
        self._stopped = True
        # First tell load balancers / Kubernetes to send no more traffic; later health updates are ignored.
        await self.health.enter_graceful_shutdown()
        self._stop_watching.set()  # the loops also watch this: see `_watch_mongo`
        await self.supervisor.stop(timeout=10.0)
        # WatchOrder streams never finish by themselves: end them now (UNAVAILABLE, so clients watch again
        # elsewhere) instead of holding the whole grace period; unary queries, waiting ones too, may finish.
        await self.watch_hub.close()
        await self.server.stop(self.grace_seconds if grace is None else grace)
        await self.consistency_waiter.close()
        await self.client.close()
        await self.probe_client.close()
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)
        log.info("query service stopped")


async def start_query_server(
    settings: QuerySettings, *, health_interval: float = HEALTH_INTERVAL_SECONDS
) -> RunningServer:
    """Builds and starts the server on `settings.query_listen` (port 0 picks a free port).

    Nothing here waits for MongoDB: the server starts even when MongoDB is down, then answers UNAVAILABLE
    and reports NOT_SERVING until a ping succeeds (checked every `health_interval` seconds).
    """
    registry = CollectorRegistry()
    client = make_client(settings)
    # Readiness pings on a connection of their own: queries holding every pooled connection (an overload) are
    # not MongoDB being unreachable, and a pod taken out of rotation for them only moves the load to the others.
    probe_client = make_client(settings, max_pool_size=1, purpose="readiness")
    database = client[settings.mongo_database]
    read_model = OrderReadModel.from_client(client, settings.mongo_database, registry)
    customers = CustomerReadModel.from_client(client, settings.mongo_database, registry)
    # follows the active generation like the other readers (`readers` below)
    sales_report = SalesReportReader(database, registry)
    waiter = ConsistencyWaiter(
        database[CHECKPOINTS_COLLECTION],
        poll_interval=settings.query_consistency_poll_ms / 1000,
        max_waiters=settings.query_max_waiters,
        registry=registry,
    )
    read_your_writes = ReadYourWrites(waiter, settings.query_max_wait_seconds)
    watch_hub = OrderWatchHub(read_model.collection, max_watchers=settings.query_max_watchers)
    limit = settings.grpc_max_message_bytes
    orders = OrderQueryServicer(
        read_model, read_your_writes, watch_hub, max_message_bytes=limit, sales_report=sales_report
    )
    customer_queries = CustomerQueryServicer(customers, read_your_writes, max_message_bytes=limit)
    try:
        assembled = await assemble_server(
            settings,
            component="query service",
            listen=settings.query_listen,
            services=(
                Service(SERVICE_NAME, partial(query_service_pb2_grpc.add_OrderQueryServiceServicer_to_server, orders)),
                Service(
                    CUSTOMER_SERVICE_NAME,
                    partial(customer_service_pb2_grpc.add_CustomerQueryServiceServicer_to_server, customer_queries),
                ),
            ),
            access="read",
            # The health servicer starts "" SERVING; we know nothing about MongoDB yet.
            conditions=((READ_MODEL_CONDITION, False), (GENERATION_CONDITION, False), (TASKS_CONDITION, True)),
            registry=registry,
        )
    except RuntimeError:
        await client.close()
        await probe_client.close()
        raise
    server, port = assembled.server, assembled.port
    health_servicer, readiness = assembled.health, assembled.readiness
    await server.start()
    metrics_server = None
    if settings.query_metrics_port is not None:
        metrics_server = start_metrics_server(registry, settings.metrics_host, settings.query_metrics_port)
    stop_watching = asyncio.Event()
    index_plans = [(read_model.collection, ORDER_INDEXES), (customers.collection, CUSTOMER_INDEXES)]

    async def tasks_health(healthy: bool) -> None:
        await readiness.set(TASKS_CONDITION, healthy)

    supervisor = Supervisor("query service", on_health_change=tasks_health)
    supervisor.start(
        "mongo-health",
        lambda: _watch_mongo(index_plans, probe_client, readiness, settings, health_interval, stop_watching),
    )
    # Everything that reads the read model follows the active generation (a cutover by `cqrs rebuild`).
    readers: list[_FollowsGeneration] = [read_model, customers, sales_report, waiter, watch_hub]
    follower = GenerationFollower(client[settings.mongo_database])
    supervisor.start(
        "generation-follower",
        lambda: _follow_generations(follower, readers, client, readiness, settings, stop_watching),
    )
    address = f"{settings.query_listen.rpartition(':')[0]}:{port}"
    log.info(
        "query service listening on %s (read model %s, database %r)",
        address,
        redact_mongo_url(settings.mongo_url),
        settings.mongo_database,
    )
    return RunningServer(
        port=port,
        address=address,
        server=server,
        health=health_servicer,
        client=client,
        probe_client=probe_client,
        grace_seconds=settings.grace_seconds,
        consistency_waiter=waiter,
        watch_hub=watch_hub,
        supervisor=supervisor,
        readiness=readiness,
        _stop_watching=stop_watching,
        registry=registry,
        metrics=metrics_server,
    )


IndexPlan = tuple[AsyncCollection[Document], list[IndexModel]]


class _FollowsGeneration(Protocol):
    def use_database(self, database: AsyncDatabase[Document]) -> None: ...


async def _follow_generations(
    follower: GenerationFollower,
    readers: list[_FollowsGeneration],
    client: AsyncMongoClient[Document],
    readiness: Readiness,
    settings: QuerySettings,
    stop: asyncio.Event,
) -> None:
    """Polls the active generation until `stop` is set and points every reader at it when it moves.

    The service is not ready until the first poll answered: a replica started after a cutover must not serve
    the retired generation meanwhile. Polling errors are left to the MongoDB health loop to report."""
    known = False
    while not stop.is_set():
        try:
            moved = await follower.poll()
        except Exception as exc:
            log.debug("could not read the active read-model generation: %s", describe_error(exc))
        else:
            if moved is not None:
                database = client[moved.database]
                for reader in readers:
                    reader.use_database(database)
            if not known:
                known = True
                await readiness.set(GENERATION_CONDITION, True)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=settings.generation_poll_seconds)


async def _watch_mongo(
    index_plans: list[IndexPlan],
    probe_client: AsyncMongoClient[Document],
    readiness: Readiness,
    settings: QuerySettings,
    interval: float,
    stop: asyncio.Event,
) -> None:
    """Pings MongoDB (on `probe_client`'s own connection) until `stop` is set, mirrors reachability into
    readiness, creates the indexes (on the collections' client).

    It also watches `stop` because on Python 3.11 `asyncio.wait_for` (inside PyMongo's async network layer) can
    swallow a cancellation when the awaited operation finishes at the same moment (CPython gh-86296).
    """
    where = f"{redact_mongo_url(settings.mongo_url)} (database {settings.mongo_database!r})"
    healthy: bool | None = None
    pending = list(index_plans)
    # last logged failure per collection, so a lasting one is logged once, not every round
    index_errors: dict[str, str | None] = {}
    while not stop.is_set():
        try:
            await probe_client.admin.command("ping")
        except Exception as exc:
            if healthy is not False:
                log.warning("read model (MongoDB) at %s is unavailable: %s", where, describe_error(exc))
            healthy = False
        else:
            if healthy is not True:
                log.info("read model (MongoDB) at %s is reachable", where)
            healthy = True
            for plan in list(pending):
                name = plan[0].name
                index_errors[name] = await _ensure_indexes(plan, where, index_errors.get(name))
                if index_errors[name] is None:
                    pending.remove(plan)
        await readiness.set(READ_MODEL_CONDITION, healthy)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def _ensure_indexes(plan: IndexPlan, where: str, previous_error: str | None) -> str | None:
    """Creates one collection's indexes; returns None on success, else the error (logged when it changed)."""
    # Queries work without the indexes (only slower), so a failure here is a warning, retried next round.
    collection, indexes = plan
    try:
        created = await ensure_indexes(collection, indexes)
    except Exception as exc:
        error = describe_error(exc)
        if error != previous_error:
            log.warning("could not create %s indexes at %s (will retry): %s", collection.name, where, error)
        return error
    if not created:
        error = f"the {collection.name} collection does not exist yet"
        if error != previous_error:
            log.info("read-model indexes at %s: %s (the projector creates it); will retry", where, error)
        return error
    log.info("read-model indexes of %s are in place at %s", collection.name, where)
    return None
