"""Per-RPC Prometheus metrics for the grpc.aio servers: calls by method and status code, and handling time.

`cqrs_grpc_server_handled_total{method,code}` counts finished calls; `cqrs_grpc_server_handling_seconds{method}`
is the time from the handler's start to its end (for a server stream: the stream's whole life). Calls that gRPC
rejects before any handler runs (RESOURCE_EXHAUSTED from the concurrency limit, unknown methods) are not
counted here. Put this interceptor first, so that calls rejected by authentication are counted too.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from core.grpc_server import CallEnded, ServerInterceptorBase, final_code, observed

# From 1 ms (a cached query) to 30 s (a long read-your-writes wait); streams land in +Inf.
LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RpcMetrics:
    """The two metric families, registered in a process's registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            "cqrs_grpc_server_handled_total",
            "gRPC calls finished by the server, by full method name and status code",
            ["method", "code"],
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "cqrs_grpc_server_handling_seconds",
            "Time from the start to the end of a gRPC call's handler, by full method name",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def observe(self, method: str, code: grpc.StatusCode, seconds: float) -> None:
        self.handled.labels(method=method, code=code.name).inc()
        self.handling_seconds.labels(method=method).observe(seconds)


class RpcMetricsInterceptor(ServerInterceptorBase):
    """Wraps each method handler (unary or streaming) to time it and count its final status code."""

    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:  # unknown method: not counted (its name is whatever the caller sent)
            return handler
        method = handler_call_details.method
        metrics = self._metrics

        def begin() -> CallEnded:
            start = time.perf_counter()
            return lambda context, error: metrics.observe(
                method, final_code(context, error), time.perf_counter() - start
            )

        return observed(handler, begin)
