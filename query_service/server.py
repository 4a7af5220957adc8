"""Composition of the query service: gRPC server, health, reflection, MongoDB watcher, graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

import grpc
from cqrs.orders.v1 import query_service_pb2, query_service_pb2_grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pymongo import AsyncMongoClient

from query_service.config import QuerySettings
from query_service.grpc_api import OrderQueryServicer
from query_service.read_model import (
    Document,
    OrderReadModel,
    describe_mongo_error,
    ensure_order_indexes,
    make_client,
    redact_mongo_url,
)

log = logging.getLogger(__name__)

SERVICE_NAME: Final[str] = query_service_pb2.DESCRIPTOR.services_by_name["OrderQueryService"].full_name
HEALTH_INTERVAL_SECONDS: Final = 2.0
_SERVING: Final = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: Final = health_pb2.HealthCheckResponse.NOT_SERVING
# The overall status ("") and the service's own name report the same thing: can we answer from MongoDB?
_HEALTH_SERVICES: Final = ("", SERVICE_NAME)


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
    grace_seconds: float
    _watcher: asyncio.Task[None] = field(repr=False)
    _stop_watching: asyncio.Event = field(repr=False)
    _stopped: bool = field(default=False, repr=False)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful stop: report NOT_SERVING, let in-flight RPCs finish within `grace`, close MongoDB."""
        if self._stopped:
            return
        self._stopped = True
        # First tell load balancers / Kubernetes to send no more traffic; later health updates are ignored.
        await self.health.enter_graceful_shutdown()
        await _stop_task(self._watcher, self._stop_watching)
        await self.server.stop(self.grace_seconds if grace is None else grace)
        await self.client.close()
        log.info("query service stopped")


async def start_query_server(
    settings: QuerySettings, *, health_interval: float = HEALTH_INTERVAL_SECONDS
) -> RunningServer:
    """Builds and starts the server on `settings.query_listen` (port 0 picks a free port).

    Nothing here waits for MongoDB: the server starts even when MongoDB is down, then answers UNAVAILABLE
    and reports NOT_SERVING until a ping succeeds (checked every `health_interval` seconds).
    """
    client = make_client(settings)
    read_model = OrderReadModel.from_client(client, settings.mongo_database)
    # SO_REUSEPORT (gRPC's default on Linux) would let a second process bind the same port silently.
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    query_service_pb2_grpc.add_OrderQueryServiceServicer_to_server(OrderQueryServicer(read_model), server)
    health_servicer: _AsyncHealth = health.aio.HealthServicer()  # type: ignore[attr-defined]
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(settings.query_listen)
    except RuntimeError as exc:  # grpc raises on bind failure in recent versions, returned 0 in older ones
        await client.close()
        raise RuntimeError(f"query service cannot listen on {settings.query_listen}: {exc}") from exc
    if port == 0:
        await client.close()
        raise RuntimeError(f"query service cannot listen on {settings.query_listen}")
    for service in _HEALTH_SERVICES:  # the health servicer starts with "" SERVING; we know nothing yet
        await health_servicer.set(service, _NOT_SERVING)
    await server.start()
    stop_watching = asyncio.Event()
    watcher = asyncio.create_task(
        _watch_mongo(read_model, client, health_servicer, settings, health_interval, stop_watching),
        name="mongo-health",
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
        grace_seconds=settings.grace_seconds,
        _watcher=watcher,
        _stop_watching=stop_watching,
    )


async def serve(settings: QuerySettings) -> None:
    """Runs the query service until SIGTERM or SIGINT, then shuts down gracefully."""
    running = await start_query_server(settings)
    stop_requested = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, stop_requested.set)
    try:
        await stop_requested.wait()
        log.info("shutdown requested; draining for up to %ss", settings.grace_seconds)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await running.stop()


async def _watch_mongo(
    read_model: OrderReadModel,
    client: AsyncMongoClient[Document],
    health_servicer: _AsyncHealth,
    settings: QuerySettings,
    interval: float,
    stop: asyncio.Event,
) -> None:
    """Pings MongoDB until `stop` is set, mirrors reachability into the health status, creates the indexes."""
    where = f"{redact_mongo_url(settings.mongo_url)} (database {settings.mongo_database!r})"
    healthy: bool | None = None
    indexes_ready = False
    index_error: str | None = None  # last logged failure, so a lasting one is logged once, not every round
    while not stop.is_set():
        try:
            await client.admin.command("ping")
        except Exception as exc:
            if healthy is not False:
                log.warning("read model (MongoDB) at %s is unavailable: %s", where, describe_mongo_error(exc))
            healthy = False
        else:
            if healthy is not True:
                log.info("read model (MongoDB) at %s is reachable", where)
            healthy = True
            if not indexes_ready:
                index_error = await _ensure_indexes(read_model, where, index_error)
                indexes_ready = index_error is None
        status = _SERVING if healthy else _NOT_SERVING
        for service in _HEALTH_SERVICES:
            await health_servicer.set(service, status)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=interval)


async def _stop_task(task: asyncio.Task[None], stop: asyncio.Event, timeout: float = 10.0) -> None:
    """Stops a loop task that watches `stop`; cancellation alone is not enough.

    On Python 3.11, `asyncio.wait_for` (used inside PyMongo's async network layer) can swallow a cancellation
    when the awaited operation finishes at the same moment (CPython gh-86296, fixed in 3.12): the task then
    simply carries on. So the loop also checks an event, and we never wait for it without a bound.
    """
    stop.set()
    task.cancel()  # interrupts a slow ping at once, when the cancellation is not lost
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        log.error("background task %s did not stop within %ss", task.get_name(), timeout)
    elif not task.cancelled() and task.exception() is not None:
        log.error("background task %s failed", task.get_name(), exc_info=task.exception())


async def _ensure_indexes(read_model: OrderReadModel, where: str, previous_error: str | None) -> str | None:
    """Creates the indexes; returns None on success, else the error (logged when it differs from the last)."""
    # Queries work without the indexes (only slower), so a failure here is a warning, retried next round.
    try:
        created = await ensure_order_indexes(read_model.collection)
    except Exception as exc:
        error = describe_mongo_error(exc)
        if error != previous_error:
            log.warning("could not create read-model indexes at %s (will retry): %s", where, error)
        return error
    if not created:
        error = "the orders collection does not exist yet"
        if error != previous_error:
            log.info("read-model indexes at %s: %s (the projector creates it); will retry", where, error)
        return error
    log.info("read-model indexes are in place at %s", where)
    return None
