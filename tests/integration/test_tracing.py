"""One command is one trace: RPC -> command handler -> PostgreSQL append -> JetStream publish -> projector apply ->
MongoDB write, checked with the SDK's in-memory exporter against the real servers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import pytest
from cqrs.orders.v1 import customer_service_pb2, customer_service_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from command_service.api.customers import CustomerCommandServicer
from command_service.event_store import EventStore
from command_service.handlers import customer_handler
from command_service.relay import OutboxRelay, RelaySettings
from core.tracing import (
    configure_tracing,
    context_from_traceparent,
    current_traceparent,
    extract_context,
    inject_headers,
    server_interceptor,
    tracing_requested,
)
from projector.config import ProjectorSettings
from projector.runner import Projector
from tests.support import eventually

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """An SDK provider with the in-memory exporter (the global provider can be set once per process)."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(trace.get_tracer_provider(), TracerProvider), "another global TracerProvider is installed"
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    yield _EXPORTER


def test_tracing_is_off_by_default() -> None:
    assert not tracing_requested({})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317"})
    assert not tracing_requested({"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "otlp"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert configure_tracing("test", environ={}) is False


def test_traceparent_round_trip(exporter: InMemorySpanExporter) -> None:
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("outer") as span:
        headers = inject_headers({})
        assert headers["traceparent"] == current_traceparent()
    remote = trace.get_current_span(extract_context({"Traceparent": headers["traceparent"]})).get_span_context()
    assert remote.trace_id == span.get_span_context().trace_id
    assert remote.span_id == span.get_span_context().span_id
    assert not trace.get_current_span(context_from_traceparent("")).get_span_context().is_valid


@pytest.fixture
async def pool(event_store_dsn: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(event_store_dsn, min_size=1, max_size=5, timeout=10, command_timeout=10)
    try:
        yield pool
    finally:
        await pool.close()


def _by_name(spans: list[ReadableSpan], trace_id: int, name: str) -> ReadableSpan:
    matching = [s for s in spans if s.context is not None and s.context.trace_id == trace_id and s.name == name]
    assert matching, f"no span {name!r} in trace {trace_id:032x}: {[s.name for s in spans]}"
    return matching[0]


async def test_one_trace_links_rpc_append_publish_apply_and_mongo_write(
    exporter: InMemorySpanExporter,
    event_store_dsn: str,
    pool: asyncpg.Pool,
    nats_url: str,
    mongo_url: str,
    unique_name: str,
) -> None:
    stream, prefix = unique_name.upper(), f"{unique_name}.events"
    store = EventStore(pool)
    server = grpc.aio.server(interceptors=[server_interceptor()])
    customer_service_pb2_grpc.add_CustomerCommandServiceServicer_to_server(
        CustomerCommandServicer(customer_handler(store)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    relay = OutboxRelay(event_store_dsn, nats_url, RelaySettings(stream, prefix, poll_interval=0.2))
    relay_task = asyncio.create_task(relay.run())
    projector = Projector(
        ProjectorSettings(
            nats_url=nats_url, mongo_url=mongo_url, mongo_database=unique_name, stream_name=stream,
            subject_prefix=prefix, projector_durable=f"{unique_name}-projector",
            projector_fetch_timeout_seconds=0.2, projector_max_backoff_seconds=0.5,
        )
    )  # fmt: skip
    await projector.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        # The caller's own span: the server span must continue its trace from the `traceparent` metadata.
        with trace.get_tracer("test").start_as_current_span("client call", kind=SpanKind.CLIENT) as client_span:
            metadata = tuple(inject_headers({}).items())
            reply = await customer_service_pb2_grpc.CustomerCommandServiceStub(channel).RegisterCustomer(
                customer_service_pb2.RegisterCustomerRequest(
                    request_id=str(uuid.uuid4()), name="Grace Hopper", email=f"{unique_name}@example.com"
                ),
                metadata=metadata,
                timeout=10,
            )
        trace_id = client_span.get_span_context().trace_id

        def finished() -> list[ReadableSpan]:
            spans = list(exporter.get_finished_spans())
            names = {s.name for s in spans if s.context is not None and s.context.trace_id == trace_id}
            return spans if "mongodb.bulk_write" in names and "projector.apply" in names else []

        async def probe() -> list[ReadableSpan]:
            return finished()

        spans = await eventually(probe, what="the projector's spans in the command's trace", timeout=20)
    finally:
        await channel.close(None)
        await projector.stop()
        relay.stop()
        await asyncio.wait_for(relay_task, timeout=10)
        await server.stop(1)

    rpc = _by_name(spans, trace_id, "cqrs.orders.v1.CustomerCommandService/RegisterCustomer")
    command = _by_name(spans, trace_id, "command RegisterCustomer")
    append = _by_name(spans, trace_id, "eventstore.append")
    publish = _by_name(spans, trace_id, "jetstream.publish")
    apply = _by_name(spans, trace_id, "projector.apply")
    write = _by_name(spans, trace_id, "mongodb.bulk_write")

    chain = [(rpc, client_span.get_span_context().span_id)]
    chain += [(command, rpc.context.span_id), (append, command.context.span_id)]
    chain += [(publish, append.context.span_id), (apply, publish.context.span_id)]
    chain += [(write, apply.context.span_id)]
    for span, parent_id in chain:
        assert span.parent is not None and span.parent.span_id == parent_id, f"{span.name} has the wrong parent"

    assert rpc.kind is SpanKind.SERVER and rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    assert command.attributes is not None
    assert command.attributes["cqrs.stream_id"] == reply.result.customer_id
    assert command.attributes["cqrs.stream_type"] == "customer"
    assert command.attributes["cqrs.request_id"]
    assert publish.kind is SpanKind.PRODUCER and apply.kind is SpanKind.CONSUMER
    assert write.attributes is not None and write.attributes["db.system"] == "mongodb"
