"""One command is one trace: RPC -> command handler -> PostgreSQL append -> JetStream publish -> projector apply ->
MongoDB write, with the asyncpg and PyMongo instrumentations' client spans inside it, checked with the SDK's
in-memory exporter against the real servers. Also: the gRPC instrumentation's interceptor keeps error statuses and
their details, records them on the server span, and traces server streams."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import grpc
import pytest
from cqrs.orders.v1 import customer_service_pb2, customer_service_pb2_grpc
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from command_service.api.customers import CustomerCommandServicer
from command_service.event_store import EventStore
from command_service.handlers import customer_handler
from command_service.relay import OutboxRelay, RelaySettings
from core.grpc_errors import field_violations
from core.tracing import (
    configure_tracing,
    context_from_traceparent,
    current_traceparent,
    extract_context,
    inject_headers,
    instrument_clients,
    server_interceptor,
    tracing_requested,
    uninstrument_clients,
)
from projector.config import ProjectorSettings
from projector.runner import Projector
from tests.support import eventually

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def exporter() -> Iterator[InMemorySpanExporter]:
    """An SDK provider with the in-memory exporter (the global provider can be set once per process), and the
    asyncpg / PyMongo instrumentations on, as `configure_tracing` turns them on."""
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    assert isinstance(trace.get_tracer_provider(), TracerProvider), "another global TracerProvider is installed"
    provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
    assert instrument_clients() == ["asyncpg", "pymongo"]
    try:
        yield _EXPORTER
    finally:
        uninstrument_clients()


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


def _children_by_scope(spans: list[ReadableSpan], parent: ReadableSpan, scope: str) -> list[ReadableSpan]:
    """The spans made by instrumentation `scope` whose parent is `parent`."""
    assert parent.context is not None
    return [
        s
        for s in spans
        if s.parent is not None
        and s.parent.span_id == parent.context.span_id
        and s.instrumentation_scope is not None
        and s.instrumentation_scope.name == scope
    ]


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

    rpc = _by_name(spans, trace_id, "/cqrs.orders.v1.CustomerCommandService/RegisterCustomer")
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

    # The instrumentations' client spans sit inside the same trace: asyncpg's queries under the command (the
    # stream load) and under the append (the insert), PyMongo's commands under the projector's bulk write.
    loads = _children_by_scope(spans, command, "opentelemetry.instrumentation.asyncpg")
    inserts = _children_by_scope(spans, append, "opentelemetry.instrumentation.asyncpg")
    assert loads and inserts, f"no asyncpg spans under the command: {[s.name for s in spans]}"
    for span in loads + inserts:
        assert span.kind is SpanKind.CLIENT and span.attributes is not None
        assert span.attributes["db.system"] == "postgresql"
    mongo = _children_by_scope(spans, write, "opentelemetry.instrumentation.pymongo")
    assert mongo, f"no PyMongo command span under {write.name}: {[s.name for s in spans]}"
    assert all(s.kind is SpanKind.CLIENT and s.attributes and s.attributes["db.system"] == "mongodb" for s in mongo)


def _spans_named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def test_an_error_keeps_its_status_and_details_and_is_recorded_on_the_server_span(
    exporter: InMemorySpanExporter, pool: asyncpg.Pool
) -> None:
    """Through the instrumentation's interceptor, INVALID_ARGUMENT still carries its google.rpc.BadRequest (in
    the trailing metadata), and the server span records the code (abort_with_status, which it does not see)."""
    server = grpc.aio.server(interceptors=[server_interceptor()])
    customer_service_pb2_grpc.add_CustomerCommandServiceServicer_to_server(
        CustomerCommandServicer(customer_handler(EventStore(pool))), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        with trace.get_tracer("test").start_as_current_span("bad call", kind=SpanKind.CLIENT) as client_span:
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await customer_service_pb2_grpc.CustomerCommandServiceStub(channel).RegisterCustomer(
                    customer_service_pb2.RegisterCustomerRequest(request_id=str(uuid.uuid4()), name="", email="x"),
                    metadata=tuple(inject_headers({}).items()),
                    timeout=10,
                )
    finally:
        await channel.close(None)
        await server.stop(1)

    assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert {field for field, _ in field_violations(raised.value)} == {"name", "email"}
    trace_id = client_span.get_span_context().trace_id
    rpc = _by_name(
        list(exporter.get_finished_spans()), trace_id, "/cqrs.orders.v1.CustomerCommandService/RegisterCustomer"
    )
    assert rpc.attributes is not None
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rpc.status.status_code is not trace.StatusCode.ERROR  # a client's mistake, not a server failure


async def test_a_server_stream_is_traced_until_the_client_leaves(exporter: InMemorySpanExporter) -> None:
    """A unary-stream RPC (Health.Watch, as WatchOrder: it never ends by itself) through the interceptor: the
    responses arrive, and the client's cancel ends the server span with CANCELLED (not a server error)."""
    health = health_aio.HealthServicer()
    await health.set("traced", health_pb2.HealthCheckResponse.SERVING)
    server = grpc.aio.server(interceptors=[server_interceptor()])
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    name = "/grpc.health.v1.Health/Watch"
    before = len(_spans_named(exporter, name))
    try:
        call = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service="traced"))
        first = await asyncio.wait_for(call.read(), timeout=10)
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        await health.set("traced", health_pb2.HealthCheckResponse.NOT_SERVING)
        second = await asyncio.wait_for(call.read(), timeout=10)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        call.cancel()

        async def ended() -> list[ReadableSpan]:
            return _spans_named(exporter, name)[before:]

        (watch,) = await eventually(ended, what=f"the server span of {name} to end", timeout=10)
    finally:
        await channel.close(None)
        await server.stop(1)
    assert watch.kind is SpanKind.SERVER and watch.attributes is not None
    assert watch.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert watch.status.status_code is not trace.StatusCode.ERROR


async def test_with_tracing_off_the_callers_traceparent_still_reaches_the_event_metadata(
    pool: asyncpg.Pool, unique_name: str
) -> None:
    """The interceptor used with tracing off creates no span but keeps the caller's trace context current, so the
    event carries the caller's trace on (to the relay and the projector, which may trace even when this replica
    does not). The trace id is compared: with an SDK installed in this process the command adds child spans."""
    trace_id = uuid.uuid4().hex
    caller = f"00-{trace_id}-b7ad6b7169203331-01"
    store = EventStore(pool)
    server = grpc.aio.server(interceptors=[server_interceptor(traced=False)])
    customer_service_pb2_grpc.add_CustomerCommandServiceServicer_to_server(
        CustomerCommandServicer(customer_handler(store)), server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        reply = await customer_service_pb2_grpc.CustomerCommandServiceStub(channel).RegisterCustomer(
            customer_service_pb2.RegisterCustomerRequest(
                request_id=str(uuid.uuid4()), name="Ada Lovelace", email=f"{unique_name}@example.com"
            ),
            metadata=(("traceparent", caller),),
            timeout=10,
        )
    finally:
        await channel.close(None)
        await server.stop(1)
    (event,) = await store.load_stream(reply.result.customer_id)
    assert event.metadata.traceparent.split("-")[1] == trace_id, event.metadata.traceparent
