"""The gRPC server interceptor with tracing off: no instrumentation, yet the caller's W3C trace context is current in
the handler (unary and streaming), exactly as the no-op span made it; and the choice follows the installed
TracerProvider. Against a real in-process grpc.aio server (no databases)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from core.tracing import _ContextPropagator, _StatusRecorder, current_traceparent, server_interceptor

CALLER = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNARY, STREAM = "/test.Trace/Unary", "/test.Trace/Stream"


async def _unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return current_traceparent().encode()


async def _stream(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> AsyncIterator[bytes]:
    for _ in range(2):
        yield current_traceparent().encode()


@pytest.fixture
async def channel() -> AsyncIterator[grpc.aio.Channel]:
    server = grpc.aio.server(interceptors=[server_interceptor(traced=False)])
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(_unary),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Trace", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield channel
    finally:
        await channel.close(None)
        await server.stop(None)


async def test_with_tracing_off_the_callers_traceparent_is_current_in_the_handler(channel: grpc.aio.Channel) -> None:
    """What the command service stores in the event metadata: the caller's trace must survive an untraced hop."""
    unary = channel.unary_unary(UNARY, None, None)
    metadata = (("traceparent", CALLER), ("tracestate", "vendor=1"))
    assert await unary(b"", metadata=metadata, timeout=10) == CALLER.encode()
    stream = channel.unary_stream(STREAM, None, None)
    assert [r async for r in stream(b"", metadata=metadata, timeout=10)] == [CALLER.encode()] * 2


async def test_with_tracing_off_a_call_without_a_valid_traceparent_has_no_trace(channel: grpc.aio.Channel) -> None:
    unary = channel.unary_unary(UNARY, None, None)
    assert await unary(b"", timeout=10) == b""
    assert await unary(b"", metadata=(("traceparent", "00-junk"),), timeout=10) == b""
    # A traced call before does not leave its context behind for the next one.
    assert await unary(b"", metadata=(("traceparent", CALLER),), timeout=10) == CALLER.encode()
    assert await unary(b"", timeout=10) == b""


def test_the_instrumentation_runs_only_when_a_tracer_provider_records(monkeypatch: pytest.MonkeyPatch) -> None:
    assert isinstance(server_interceptor(traced=True), _StatusRecorder)
    assert isinstance(server_interceptor(traced=False), _ContextPropagator)
    for untraced in (trace.ProxyTracerProvider(), trace.NoOpTracerProvider()):
        monkeypatch.setattr(trace, "get_tracer_provider", lambda p=untraced: p)
        assert isinstance(server_interceptor(), _ContextPropagator)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: TracerProvider())
    assert isinstance(server_interceptor(), _StatusRecorder)
