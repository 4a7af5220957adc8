"""The one assembly of a gRPC server, shared by the command and the query service.

Both servers get the same interceptor chain, limits, health (readiness conditions and a liveness service),
reflection and TLS; each service brings only its servicers, its auth role and its readiness conditions.

Interceptors, outermost first: tracing (a server span per RPC, rejected calls included; with tracing off only the
caller's trace context, see `core.tracing.server_interceptor`), RPC metrics (rejected calls counted too), auth (when
enabled), then request decoding (an undecodable request is INVALID_ARGUMENT, after auth so that it reveals nothing to
strangers).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import grpc
from grpc_health.v1 import _async as health_aio  # the asyncio HealthServicer (also exported as health.aio)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from core.auth import auth_interceptors
from core.grpc_server import LIVENESS_SERVICE, ServerSecurity, bind, build_server, tls_credentials
from core.health import Readiness
from core.request_decoding import MalformedRequestInterceptor
from core.rpc_metrics import RpcMetrics, RpcMetricsInterceptor
from core.tracing import server_interceptor as tracing_interceptor

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


@dataclass(frozen=True, slots=True)
class Service:
    """One gRPC service of the server: its full name and the function that adds its servicer."""

    name: str
    add_to: Callable[[grpc.aio.Server], None]


@dataclass(frozen=True, slots=True)
class AssembledServer:
    """A server bound to its port and not started yet; readiness starts NOT_SERVING until its conditions hold."""

    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    readiness: Readiness


async def assemble_server(
    settings: ServerSecurity,
    *,
    component: str,
    listen: str,
    services: Sequence[Service],
    access: Literal["read", "write"],
    conditions: Iterable[tuple[str, bool]],
    registry: CollectorRegistry,
) -> AssembledServer:
    """Builds and binds the server of `component` ("command service", "query service").

    `access` is what a caller's token must allow for these services; `conditions` are the readiness conditions with
    their initial truth. Raises RuntimeError naming the component for a bad TLS/auth configuration or a port that
    cannot be bound (the caller closes what it opened before).
    """
    names = tuple(service.name for service in services)
    interceptors: list[grpc.aio.ServerInterceptor[Any, Any]] = [
        tracing_interceptor(),
        RpcMetricsInterceptor(RpcMetrics(registry)),
    ]
    try:
        roles = {"read_services": names} if access == "read" else {"write_services": names}
        interceptors += auth_interceptors(settings, **roles)
        tls = tls_credentials(settings)
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"{component}: bad TLS/auth configuration: {exc}") from exc
    server = build_server(settings, [*interceptors, MalformedRequestInterceptor()])
    for service in services:
        service.add_to(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection((*names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    try:
        port = bind(server, listen, tls)
    except RuntimeError as exc:  # grpc raises on bind failure in recent versions, returned 0 in older ones
        raise RuntimeError(f"{component} cannot listen on {listen}: {exc}") from exc
    # The overall status ("") and the services' own names report the same thing: can this replica answer?
    readiness = Readiness(health, ("", *names), component)
    for condition, initially in conditions:
        readiness.declare(condition, initially)
    await readiness.publish()
    await health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    return AssembledServer(server, port, health, readiness)
