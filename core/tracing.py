"""OpenTelemetry tracing: opt-in setup from the standard `OTEL_*` environment, W3C context propagation through the
outbox and JetStream headers, and the gRPC / asyncpg / PyMongo spans of OpenTelemetry's own instrumentations.

Off by default: unless the environment asks for an exporter, no SDK is installed, no database client is
instrumented, and every span below is the OpenTelemetry API's no-op span (a few attribute look-ups, no allocation
of span data, nothing exported). The gRPC servers then skip the instrumentation's interceptor and only make a
caller's `traceparent` current in the handler, so that it still reaches the event metadata.

One command is one trace:

    gRPC server span (`server_interceptor`, opentelemetry-instrumentation-grpc) -> `command <Type>`
      -> `eventstore.append` (with asyncpg's query spans under the command)
      -> `jetstream.publish` (relay, later, in another task: the context travels in the event metadata)
      -> `projector.apply` (another process: the context travels in the message's `traceparent` header)
      -> `mongodb.bulk_write` -> PyMongo's command spans

The relay runs after the command's RPC has returned, so the append stores its `traceparent` in the event's
metadata; the relay continues the trace from there and puts its own context into the JetStream headers. No
instrumentation exists for nats-py: those two hops are ours (`inject_headers` / `extract_context`).
"""

from __future__ import annotations

import asyncio
import contextvars
import importlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping, MutableMapping
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from core.grpc_server import CallEnded, final_code, observed

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
    clients = instrument_clients()
    log.info(
        "OpenTelemetry tracing on for %s (exporters: %s; client spans: %s)",
        service_name,
        ", ".join(names),
        ", ".join(clients) or "none",
    )
    return True


def shutdown_tracing() -> None:
    """Flushes and stops the exporter installed by `configure_tracing` (no-op when tracing is off)."""
    global _provider
    uninstrument_clients()
    if _provider is not None:
        try:
            _provider.shutdown()
        except Exception as exc:  # exporting is best effort; shutting down must not fail because of it
            log.warning("flushing traces failed: %r", exc)
        _provider = None


# ---- database client spans ---------------------------------------------------------------------------------

# The client libraries with an OpenTelemetry instrumentation, by the top-level module they instrument.
_CLIENT_INSTRUMENTORS: dict[str, tuple[str, str]] = {
    "asyncpg": ("opentelemetry.instrumentation.asyncpg", "AsyncPGInstrumentor"),
    "pymongo": ("opentelemetry.instrumentation.pymongo", "PymongoInstrumentor"),
}
_instrumented: list[Any] = []  # the instrumentors `instrument_clients` turned on


def instrument_clients() -> list[str]:
    """Turns on OpenTelemetry's asyncpg and PyMongo instrumentations (a CLIENT span per query / command); returns
    the names of the libraries instrumented. `configure_tracing` calls it; tests that install their own SDK too.

    Only libraries this process has already imported are instrumented, so that turning tracing on never loads
    a driver the process does not use (query_service must not import asyncpg). Call it before the clients are
    created: PyMongo's command listener applies to clients made after it is registered.
    """
    done = []
    for library, (module, name) in _CLIENT_INSTRUMENTORS.items():
        if library not in sys.modules:
            continue
        instrumentor = getattr(importlib.import_module(module), name)()  # each instrumentor is a singleton
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
            _instrumented.append(instrumentor)
        done.append(library)
    return done


def uninstrument_clients() -> None:
    """Turns off what `instrument_clients` turned on (a no-op when it did nothing)."""
    while _instrumented:
        _instrumented.pop().uninstrument()


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


def server_interceptor(traced: bool | None = None) -> grpc.aio.ServerInterceptor[Any, Any]:
    """The grpc.aio server interceptor that traces every RPC: a SERVER span per call named after the full method
    (`/package.Service/Method`), continuing the caller's trace from its `traceparent` metadata.

    The span comes from opentelemetry-instrumentation-grpc's aio interceptor (unary and streaming handlers; the
    servicer context it passes on forwards abort, trailing metadata and status details unchanged). Inside it,
    `_StatusRecorder` records the call's final status on that span, which the instrumentation misses when a
    handler ends with `abort_with_status` (our error path: `google.rpc.Status` with BadRequest details) and
    would otherwise leave at OK. Both servers put this interceptor first (outermost).

    With tracing off (`traced` False; by default: no SDK TracerProvider installed when the server is assembled,
    so call `configure_tracing` first, as `run_service` does) every one of those spans would be a no-op, yet the
    instrumentation still costs a few percent of a busy server's CPU. Then only `_ContextPropagator` runs: it
    keeps the one effect the no-op span had, the caller's `traceparent` being current in the handler (the command
    service stores it in the event metadata, so a trace that passes through an untraced replica stays whole).
    """
    if not (tracing_active() if traced is None else traced):
        return _ContextPropagator()
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return _StatusRecorder(aio_server_interceptor())


def tracing_active() -> bool:
    """Whether spans would record: a real TracerProvider is installed (not the API's proxy or no-op default).
    Per-call tracing work (interceptors, per-message spans) is skipped when not."""
    return not isinstance(trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider))


class _ContextPropagator(_ServerInterceptor):
    """Tracing off: makes the caller's W3C trace context current while the handler runs, and nothing else.

    A call without `traceparent` metadata gets its handler back untouched (no wrapper, no per-call cost).
    """

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        metadata = handler_call_details.invocation_metadata or ()
        carrier = {key: value for key, value in metadata if key in _W3C_HEADERS}
        if TRACEPARENT not in carrier:
            return handler
        # Extracted onto the current context (as the instrumentation does), attached in the handler's own run so
        # that the detach happens in the same context, streaming handlers included.
        return observed(handler, lambda: _attached(_propagator.extract(carrier)))


_W3C_HEADERS = frozenset({TRACEPARENT, "tracestate"})  # what the W3C propagator reads (gRPC keys are lowercase)


def _attached(context: otel_context.Context) -> CallEnded:
    token = otel_context.attach(context)
    return lambda _context, _error: otel_context.detach(token)


class _StatusRecorder(_ServerInterceptor):
    """Runs the instrumentation's interceptor over handlers wrapped to record their final status code."""

    def __init__(self, instrumentation: grpc.aio.ServerInterceptor[Any, Any]) -> None:
        self._instrumentation = instrumentation

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        async def recorded(details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any]:
            return observed(await continuation(details), _span_recorder)

        return await self._instrumentation.intercept_service(recorded, handler_call_details)


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


def _record(span: trace.Span, context: Any, error: BaseException | None) -> None:
    if not span.is_recording():  # tracing off: nothing to record, nothing to compute
        return
    try:
        code = final_code(context, error)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_ERRORS:
            span.set_status(Status(StatusCode.ERROR, f"{code}:{context.details() or code.value[1]}"))
    except Exception as exc:  # runs in a `finally`: tracing must never replace the call's own outcome
        log.debug("could not record the status of an RPC on its span: %r", exc)


def _span_recorder() -> CallEnded:
    """Records the call's final status on the current (the server) span when the call ends."""
    span = trace.get_current_span()
    return lambda context, error: _record(span, context, error)


T = TypeVar("T")


def detached_task(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """A background task that belongs to no caller's trace (nor any other context variable of the caller).

    A task copies the context of whoever creates it: a long-lived worker started on demand by the first RPC would
    otherwise put every later database call it makes into that first RPC's trace, forever.
    """
    return asyncio.create_task(coro, name=name, context=contextvars.Context())
