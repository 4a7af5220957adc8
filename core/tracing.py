"""OpenTelemetry tracing: opt-in setup from the standard `OTEL_*` environment, W3C context propagation, and a
grpc.aio server interceptor.

Off by default: unless the environment asks for an exporter, no SDK is installed and every span below is the
OpenTelemetry API's no-op span (a few attribute look-ups, no allocation of span data, nothing exported).

One command is one trace:

    gRPC server span (`server_interceptor`) -> `command <Type>` -> `eventstore.append`
      -> `jetstream.publish` (relay, later, in another task: the context travels in the event metadata)
      -> `projector.apply` (another process: the context travels in the message's `traceparent` header)
      -> `mongodb.bulk_write`

The relay runs after the command's RPC has returned, so the append stores its `traceparent` in the event's
metadata; the relay continues the trace from there and puts its own context into the JetStream headers.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from core.grpc_server import responses_of

log = logging.getLogger(__name__)

TRACER_NAME = "cqrs"
TRACEPARENT = "traceparent"

_propagator = TraceContextTextMapPropagator()
_provider: Any = None  # the SDK TracerProvider installed by configure_tracing, if any


def tracer() -> trace.Tracer:
    """The project's tracer (a proxy: it follows whatever global TracerProvider is installed, also later)."""
    return trace.get_tracer(TRACER_NAME)


def tracing_requested(environ: Mapping[str, str] | None = None) -> bool:
    """True when the standard OTel environment asks for trace export (and the SDK is not disabled)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def configure_tracing(service_name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Installs a TracerProvider with a batching exporter when `OTEL_*` says so; returns whether it did.

    `OTEL_TRACES_EXPORTER` may be `otlp` (default when only an OTLP endpoint is set; protocol, endpoint,
    headers, timeouts and TLS come from the standard `OTEL_EXPORTER_OTLP_*` variables) or `console`.
    `OTEL_SERVICE_NAME` / `OTEL_RESOURCE_ATTRIBUTES` override or extend the resource; sampling follows
    `OTEL_TRACES_SAMPLER`. Call once, in `__main__`.
    """
    global _provider
    env = os.environ if environ is None else environ
    if not tracing_requested(env):
        return False
    # Imported here: a process without tracing never loads the SDK or the exporter.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    attributes: dict[str, str] = {}
    if not env.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = service_name  # Resource.create reads OTEL_SERVICE_NAME itself
    provider = TracerProvider(resource=Resource.create(attributes))
    names = [n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    for name in names:
        exporter: SpanExporter
        if name == "console":
            exporter = ConsoleSpanExporter()
        elif name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
            if protocol.strip().lower() != "grpc":
                log.warning("OTLP protocol %r is not supported here; exporting over grpc", protocol)
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter()  # endpoint, headers, TLS: from OTEL_EXPORTER_OTLP_* variables
        else:
            log.warning("unknown OTEL_TRACES_EXPORTER %r ignored", name)
            continue
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _provider = provider
    log.info("OpenTelemetry tracing on for %s (exporters: %s)", service_name, ", ".join(names))
    return True


def shutdown_tracing() -> None:
    """Flushes and stops the exporter installed by `configure_tracing` (no-op when tracing is off)."""
    global _provider
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception as exc:  # exporting is best effort; shutting down must not fail because of it
            log.warning("flushing traces failed: %r", exc)
        _provider = None


def inject_headers(
    headers: MutableMapping[str, str] | None = None, context: otel_context.Context | None = None
) -> MutableMapping[str, str]:
    """Writes the current (or given) span context into `headers` as W3C `traceparent`; returns `headers`."""
    carrier: MutableMapping[str, str] = {} if headers is None else headers
    _propagator.inject(carrier, context=context)
    return carrier


def extract_context(headers: Mapping[str, str] | None) -> otel_context.Context:
    """The context carried by a W3C `traceparent` header (an empty context when there is none)."""
    carrier = {k.lower(): v for k, v in (headers or {}).items()}
    return _propagator.extract(carrier, context=otel_context.Context())


def current_traceparent() -> str:
    """The current span's `traceparent`, or "" when there is no valid span (tracing off, no trace)."""
    return inject_headers({}).get(TRACEPARENT, "")


def context_from_traceparent(traceparent: str) -> otel_context.Context:
    return extract_context({TRACEPARENT: traceparent} if traceparent else None)


# ---- gRPC server interceptor -------------------------------------------------------------------------------


if TYPE_CHECKING:
    _ServerInterceptor = grpc.aio.ServerInterceptor[Any, Any]
else:  # the runtime class is not generic
    _ServerInterceptor = grpc.aio.ServerInterceptor


class _TracingInterceptor(_ServerInterceptor):
    """Starts a SERVER span per RPC, continuing the caller's trace from the `traceparent` metadata."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method)
        metadata = {str(k): str(v) for k, v in (handler_call_details.invocation_metadata or ()) if isinstance(v, str)}
        return _wrap_handler(handler, method, metadata)


def server_interceptor() -> grpc.aio.ServerInterceptor[Any, Any]:
    """A grpc.aio server interceptor that traces every RPC (span name = the full method name)."""
    return _TracingInterceptor()


def _rpc_attributes(method: str) -> dict[str, str]:
    service, _, name = method.lstrip("/").partition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}


# Codes that mean "the server failed", as the OTel gRPC conventions define them for server spans.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _finish(span: trace.Span, context: Any) -> None:
    code = None
    try:
        code = context.code()
    except Exception:  # not every context implementation exposes code()
        code = None
    if isinstance(code, grpc.StatusCode):
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, code.name))
    else:
        span.set_attribute("rpc.grpc.status_code", 0)


def _wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, metadata: Mapping[str, str]
) -> grpc.RpcMethodHandler[Any, Any]:
    parent = extract_context(metadata)
    attributes = _rpc_attributes(method)
    name = method.lstrip("/")

    def start() -> Any:
        return tracer().start_as_current_span(name, context=parent, kind=SpanKind.SERVER, attributes=attributes)

    def unary(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def traced(request: Any, context: Any) -> Any:
            with start() as span:
                result = behavior(request, context)
                if inspect.isawaitable(result):
                    result = await result
                _finish(span, context)
                return result

        return traced

    def streaming(behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def traced(request: Any, context: Any) -> AsyncIterator[Any]:
            with start() as span:
                async for item in responses_of(behavior(request, context)):
                    yield item
                _finish(span, context)

        return traced

    kwargs = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), **kwargs)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), **kwargs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), **kwargs)
    return handler
