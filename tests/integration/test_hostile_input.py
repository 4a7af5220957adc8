"""Hostile input, generated: every request of every RPC, built from its descriptor, against real servers.

The requests are not hand-picked: `request_messages` walks `DESCRIPTOR.services_by_name` -> methods ->
input type -> fields (recursively) of every proto module in `protos/cqrs/orders/v1`, so a new RPC or field is
fuzzed without touching this file. Strings mix any Unicode (RTL, emoji, NUL and other control characters,
escaped surrogates as text, very long text) with values the servers know (real ids, tokens, codes), numbers
reach their type's extremes, fields are missing, repeated or sent twice (concatenated encodings merge).

The command server (PostgreSQL, relay to NATS) and the query server (MongoDB) are the real ones, started in
process as the other integration tests do. Every answer must be one of the documented codes (never UNKNOWN or
INTERNAL; UNAVAILABLE only while a dependency is really down), an error must write nothing (the event and request
counts in PostgreSQL stay the same), and both servers must still be SERVING and answer a valid call afterwards.

Hypothesis runs in a worker thread with blocking gRPC clients while the servers run on the test's event loop;
examples are random on every run (no fixed seed) and a failure prints the falsifying draws.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import importlib
import pkgutil
import uuid
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import asyncpg
import cqrs.orders.v1 as orders_v1
import grpc
import pytest
from cqrs.orders.v1 import command_service_pb2, customer_service_pb2, order_pb2, query_service_pb2
from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument as HypothesisInvalidArgument
from pymongo import AsyncMongoClient

from command_service.config import CommandServiceSettings
from command_service.migrate import migrate
from command_service.server import RunningCommandServer, start_command_server
from core.grpc_errors import field_violations
from query_service.config import QuerySettings
from query_service.server import RunningServer, start_query_server
from tests.integration.test_query_service import T0, make_order
from tests.support import create_database

T = TypeVar("T")
Code = grpc.StatusCode

# Every generated module of the package, so that a new service is fuzzed without touching this file.
PROTO_MODULES = [
    importlib.import_module(f"{orders_v1.__name__}.{info.name}")
    for info in pkgutil.iter_modules(orders_v1.__path__)
    if info.name.endswith("_pb2")
]
METHODS: list[MethodDescriptor] = [
    method
    for module in PROTO_MODULES
    for service in module.DESCRIPTOR.services_by_name.values()
    for method in service.methods
]
COMMAND_SERVICES = frozenset({"cqrs.orders.v1.OrderCommandService", "cqrs.orders.v1.CustomerCommandService"})
# Architecture, guarantee 7: the statuses a caller may see. UNAVAILABLE is checked separately (dependency down).
DOCUMENTED = frozenset(
    {Code.OK, Code.INVALID_ARGUMENT, Code.NOT_FOUND, Code.ALREADY_EXISTS, Code.FAILED_PRECONDITION, Code.ABORTED}
)
CALL_TIMEOUT = 10.0
WATCH_TIMEOUT = 0.3  # a watch streams until its deadline; DEADLINE_EXCEEDED is how a healthy one ends here
MAX_DEPTH = 3


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def method_id(method: MethodDescriptor) -> str:
    return method.name


# ------------------------------------------------------------------------------------------ the servers


@dataclass
class Hostile:
    """The running servers, what they were seeded with, and blocking helpers usable from a worker thread."""

    loop: asyncio.AbstractEventLoop
    command: RunningCommandServer
    query: RunningServer
    pool: asyncpg.Pool
    mongo: AsyncMongoClient[dict[str, Any]]
    command_channel: grpc.Channel = field(init=False)
    query_channel: grpc.Channel = field(init=False)
    known: list[str] = field(default_factory=list)  # strings the servers know: ids, tokens, codes
    order_id: str = ""
    customer_id: str = ""

    def __post_init__(self) -> None:
        self.command_channel = grpc.insecure_channel(f"127.0.0.1:{self.command.port}")
        self.query_channel = grpc.insecure_channel(f"127.0.0.1:{self.query.port}")

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Runs a coroutine on the servers' loop from the hypothesis thread."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=30)

    def channel_for(self, method: MethodDescriptor) -> grpc.Channel:
        is_command = method.containing_service.full_name in COMMAND_SERVICES
        return self.command_channel if is_command else self.query_channel

    def written(self) -> tuple[int, int]:
        """(events, request log entries) in PostgreSQL: what a failed command must not change."""

        async def count() -> tuple[int, int]:
            row = await self.pool.fetchrow(
                "SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM request_log) AS requests"
            )
            assert row is not None
            return int(row["events"]), int(row["requests"])

        return self.run(count())

    def dependency_down(self, method: MethodDescriptor) -> bool:
        """Whether the dependency behind `method` (PostgreSQL or MongoDB) is really unreachable right now."""

        async def probe() -> bool:
            try:
                if method.containing_service.full_name in COMMAND_SERVICES:
                    await self.pool.fetchval("SELECT 1")
                else:
                    await self.mongo.admin.command("ping")
            except Exception:
                return True
            return False

        return self.run(probe())


async def _seed(hostile: Hostile, database: str) -> None:
    """A customer and an order through the real command server, and matching read-model documents."""
    commands = hostile.command_channel
    register = commands.unary_unary(
        "/cqrs.orders.v1.CustomerCommandService/RegisterCustomer",
        request_serializer=customer_service_pb2.RegisterCustomerRequest.SerializeToString,
        response_deserializer=customer_service_pb2.RegisterCustomerResponse.FromString,
    )
    create = commands.unary_unary(
        "/cqrs.orders.v1.OrderCommandService/CreateOrder",
        request_serializer=command_service_pb2.CreateOrderRequest.SerializeToString,
        response_deserializer=command_service_pb2.CreateOrderResponse.FromString,
    )
    customer = (
        await asyncio.to_thread(
            register,
            customer_service_pb2.RegisterCustomerRequest(
                request_id=str(uuid.uuid4()), name="Ada Lovelace", email="ada@example.com"
            ),
            timeout=CALL_TIMEOUT,
        )
    ).result
    address = order_pb2.Address(recipient="Ada", line1="1 Way", city="London", postal_code="N1", country="GB")
    order = (
        await asyncio.to_thread(
            create,
            command_service_pb2.CreateOrderRequest(
                request_id=str(uuid.uuid4()),
                customer_id=customer.customer_id,
                currency="EUR",
                shipping_address=address,
            ),
            timeout=CALL_TIMEOUT,
        )
    ).result
    db = hostile.mongo[database]
    docs = [make_order(created_at=T0 + dt.timedelta(seconds=i), customer_id=customer.customer_id) for i in range(3)]
    docs[0] |= {"_id": order.order_id, "order_id": order.order_id}
    await db["orders"].insert_many(docs)
    await db["customers"].insert_one(
        {"_id": customer.customer_id, "customer_id": customer.customer_id, "name": "Ada Lovelace",
         "email": "ada@example.com", "status": "ACTIVE", "version": 1, "position": 1}
    )  # fmt: skip
    for stream_id, stream_type in ((order.order_id, "order"), (customer.customer_id, "customer")):
        await db["checkpoints"].insert_one({"_id": stream_id, "stream_type": stream_type, "version": 1_000})
    page = await asyncio.to_thread(
        hostile.query_channel.unary_unary(
            "/cqrs.orders.v1.OrderQueryService/ListOrders",
            request_serializer=query_service_pb2.ListOrdersRequest.SerializeToString,
            response_deserializer=query_service_pb2.ListOrdersResponse.FromString,
        ),
        query_service_pb2.ListOrdersRequest(page_size=1),
        timeout=CALL_TIMEOUT,
    )
    hostile.order_id, hostile.customer_id = order.order_id, customer.customer_id
    hostile.known += [
        customer.customer_id,
        customer.consistency_token,
        order.order_id,
        order.consistency_token,
        order.order_id.upper(),
        page.next_page_token,
        "EUR",
        "GB",
        "ada@example.com",
        "SKU-1",
        "",
    ]


@pytest.fixture(scope="module")
async def hostile(postgres_dsn: str, nats_url: str, mongo_url: str) -> AsyncIterator[Hostile]:
    name = f"h{uuid.uuid4().hex[:12]}"
    dsn = await create_database(postgres_dsn, name)
    await migrate(dsn)
    command = await start_command_server(
        CommandServiceSettings(
            postgres_dsn=dsn, nats_url=nats_url, stream_name=name.upper(), subject_prefix=f"{name}.events",
            command_listen="127.0.0.1:0", relay_poll_seconds=0.2, grace_seconds=1,
        )
    )  # fmt: skip
    query = await start_query_server(
        QuerySettings(mongo_url=mongo_url, mongo_database=name, query_listen="127.0.0.1:0", grace_seconds=1),
        health_interval=0.2,
    )
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=2)
    mongo: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True)
    hostile = Hostile(asyncio.get_running_loop(), command, query, pool, mongo)
    try:
        await _seed(hostile, name)
        yield hostile
    finally:
        hostile.command_channel.close()
        hostile.query_channel.close()
        await asyncio.gather(command.stop(), query.stop())
        await pool.close()
        await mongo.drop_database(name)
        await mongo.close()


# ---------------------------------------------------------------------------------- requests from descriptors


HOSTILE_PIECES = [
    "\x00", "\x01", "\x07", "\x1b[2J", "\x7f", "\x85", "\u2028", "\ufeff", "\ufffe", "\u202e", "\u200f",
    "\\ud800", "\\udfff", "\\u0000", '"', "'", "\\", "{", "$gt", "$where", ".*", "%s", "../", "\U0001f600",
    "\u05e9\u05dc\u05d5\u05dd", "\u0645\u0631\u062d\u0628\u0627", "e\u0301", " ", "\t", "\n",
]  # fmt: skip
_ANY_TEXT = st.text(st.characters(exclude_categories=["Cs"]), max_size=40)


def strings(known: list[str]) -> st.SearchStrategy[str]:
    """Any text, hostile pieces inside otherwise normal text, values the servers know, and very long text."""
    around = st.sampled_from(known) | _ANY_TEXT
    hostile = st.builds(lambda a, b, c: a + b + c, around, st.sampled_from(HOSTILE_PIECES), _ANY_TEXT)
    long = st.sampled_from([1_000, 70_000]).flatmap(lambda n: st.sampled_from(["x" * n, "\U0001f600" * n, "\x00" * n]))
    return st.one_of(_ANY_TEXT, st.sampled_from(known), hostile, st.uuids().map(str), long)


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [low, high, -1, 0, 1, 2, 10_000, 10_001, 100_000_000_000]
    return st.one_of(st.sampled_from([e for e in edges if low <= e <= high]), st.integers(low, high))


_INT32 = (-(2**31), 2**31 - 1)
_INT64 = (-(2**63), 2**63 - 1)
_SCALARS: dict[int, st.SearchStrategy[Any]] = {
    FieldDescriptor.TYPE_INT32: _integers(*_INT32),
    FieldDescriptor.TYPE_SINT32: _integers(*_INT32),
    FieldDescriptor.TYPE_SFIXED32: _integers(*_INT32),
    FieldDescriptor.TYPE_INT64: _integers(*_INT64),
    FieldDescriptor.TYPE_SINT64: _integers(*_INT64),
    FieldDescriptor.TYPE_SFIXED64: _integers(*_INT64),
    FieldDescriptor.TYPE_UINT32: _integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: _integers(0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: _integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: _integers(0, 2**64 - 1),
    FieldDescriptor.TYPE_BOOL: st.booleans(),
    FieldDescriptor.TYPE_DOUBLE: st.floats(),
    FieldDescriptor.TYPE_FLOAT: st.floats(width=32),
    FieldDescriptor.TYPE_BYTES: st.binary(max_size=64),
}


def field_values(fd: FieldDescriptor, known: list[str], depth: int) -> st.SearchStrategy[Any]:
    """Values for one (non-repeated view of a) field."""
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        assert fd.message_type is not None
        return messages(fd.message_type, known, depth + 1)
    if fd.type == FieldDescriptor.TYPE_STRING:
        return strings(known)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        assert fd.enum_type is not None
        return st.sampled_from([v.number for v in fd.enum_type.values]) | _integers(*_INT32)  # open enums
    return _SCALARS[fd.type]


def messages(descriptor: Descriptor, known: list[str], depth: int = 0) -> st.SearchStrategy[Message]:
    """Messages of `descriptor`: each field missing, set, or (repeated) a short or a long list."""
    parts: dict[str, st.SearchStrategy[Any]] = {}
    for fd in descriptor.fields:
        if fd.type == FieldDescriptor.TYPE_MESSAGE and depth >= MAX_DEPTH:
            continue
        value = field_values(fd, known, depth)
        if fd.is_repeated:
            value = st.lists(value, max_size=3) | st.lists(st.sampled_from(known), min_size=99, max_size=110)
        parts[fd.name] = st.none() | value
    cls = message_factory.GetMessageClass(descriptor)

    def build(values: dict[str, Any]) -> Message:
        message = cls()
        for name, value in values.items():
            if value is None:
                continue
            fd = descriptor.fields_by_name[name]
            target: Any = getattr(message, name)
            if fd.is_repeated and fd.type == FieldDescriptor.TYPE_MESSAGE:
                for item in value:
                    target.add().CopyFrom(item)
            elif fd.is_repeated:
                target.extend(value)
            elif fd.type == FieldDescriptor.TYPE_MESSAGE:
                target.CopyFrom(value)
            else:
                setattr(message, name, value)
        return message

    return st.fixed_dictionaries(parts).map(build)


def wire_requests(method: MethodDescriptor, known: list[str]) -> st.SearchStrategy[bytes]:
    """Encoded requests: one message, or two concatenated (fields sent twice: the parser merges them)."""
    one = messages(method.input_type, known).map(lambda m: m.SerializeToString())
    return one | st.tuples(one, one).map(lambda pair: pair[0] + pair[1])


# -------------------------------------------------------------------------------------------------- calling


def call(hostile: Hostile, method: MethodDescriptor, raw: bytes) -> tuple[grpc.StatusCode, str, list[str]]:
    """Sends raw request bytes; returns the status code, its details and the BadRequest field paths."""
    channel = hostile.channel_for(method)
    try:
        if method.server_streaming:
            for _ in channel.unary_stream(path_of(method), None, None)(raw, timeout=WATCH_TIMEOUT):
                pass
        else:
            channel.unary_unary(path_of(method), None, None)(raw, timeout=CALL_TIMEOUT)
    except grpc.RpcError as error:
        assert isinstance(error, grpc.Call)
        fields = [f for f, _ in field_violations(error)]
        return error.code(), error.details() or "", fields
    return Code.OK, "", []


def check_answer(hostile: Hostile, method: MethodDescriptor, raw: bytes) -> grpc.StatusCode:
    """Calls `method` with `raw` and checks the guarantees; returns the status code."""
    is_command = method.containing_service.full_name in COMMAND_SERVICES
    before = hostile.written() if is_command else None
    code, details, fields = call(hostile, method, raw)
    with contextlib.suppress(HypothesisInvalidArgument):  # outside a property test there is nothing to note
        note(f"{path_of(method)} -> {code.name}: {details[:300]!r} {fields}")
    assert code not in (Code.UNKNOWN, Code.INTERNAL), f"{code.name}: {details[:500]!r}"
    assert "Traceback" not in details and "Exception" not in details, details[:500]
    if code == Code.UNAVAILABLE:
        assert hostile.dependency_down(method), f"UNAVAILABLE while its dependency is up: {details[:300]!r}"
    elif method.server_streaming and code == Code.DEADLINE_EXCEEDED:
        pass  # a watch that was streaming until our short deadline
    else:
        assert code in DOCUMENTED, f"undocumented status {code.name}: {details[:300]!r}"
    if code == Code.INVALID_ARGUMENT:
        assert fields, f"INVALID_ARGUMENT without field violations: {details[:300]!r}"
    if before is not None and code != Code.OK:
        assert hostile.written() == before, f"{code.name} but something was written to PostgreSQL"
    return code


def assert_still_serving(hostile: Hostile) -> None:
    """Both servers report SERVING and answer a valid call."""
    for channel in (hostile.command_channel, hostile.query_channel):
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT)
        assert status.status == health_pb2.HealthCheckResponse.SERVING
    hostile.query_channel.unary_unary(
        "/cqrs.orders.v1.OrderQueryService/ListOrders",
        request_serializer=query_service_pb2.ListOrdersRequest.SerializeToString,
        response_deserializer=query_service_pb2.ListOrdersResponse.FromString,
    )(query_service_pb2.ListOrdersRequest(page_size=1), timeout=CALL_TIMEOUT)
    hostile.command_channel.unary_unary(
        "/cqrs.orders.v1.CustomerCommandService/RegisterCustomer",
        request_serializer=customer_service_pb2.RegisterCustomerRequest.SerializeToString,
        response_deserializer=customer_service_pb2.RegisterCustomerResponse.FromString,
    )(
        customer_service_pb2.RegisterCustomerRequest(
            request_id=str(uuid.uuid4()), name="Still Serving", email=f"{uuid.uuid4().hex}@example.com"
        ),
        timeout=CALL_TIMEOUT,
    )


_SETTINGS = settings(
    deadline=None,
    database=None,  # random examples on every run; a failure prints its draws
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example],
)


# ------------------------------------------------------------------------------------------------------ tests


def test_every_rpc_of_every_service_is_covered() -> None:
    services = {m.containing_service.full_name for m in METHODS}
    assert COMMAND_SERVICES < services
    assert {"cqrs.orders.v1.OrderQueryService", "cqrs.orders.v1.CustomerQueryService"} < services
    assert "/cqrs.orders.v1.OrderQueryService/WatchOrder" in {path_of(m) for m in METHODS}


@pytest.mark.parametrize("method", METHODS, ids=method_id)
async def test_generated_requests_get_documented_statuses_and_write_nothing_on_error(
    hostile: Hostile, method: MethodDescriptor
) -> None:
    @settings(_SETTINGS, max_examples=12)
    @given(raw=wire_requests(method, hostile.known))
    def generated(raw: bytes) -> None:
        check_answer(hostile, method, raw)

    await asyncio.to_thread(generated)  # blocking clients; the servers keep running on this loop
    await asyncio.to_thread(assert_still_serving, hostile)


def _string_fields(descriptor: Descriptor) -> list[FieldDescriptor]:
    return [fd for fd in descriptor.fields if fd.type == FieldDescriptor.TYPE_STRING]


def _invalid_utf8_field(method: MethodDescriptor) -> st.SearchStrategy[bytes]:
    """A valid encoding plus one string field whose bytes are not UTF-8 (a lone surrogate, or 0xFF)."""
    fields = _string_fields(method.input_type)
    payloads = st.sampled_from(["\ud800", "a\udfffb", "\udcff" * 3]).map(
        lambda text: text.encode("utf-8", "surrogatepass")
    ) | st.sampled_from([b"\xff", b"\xc0\x80", b"abc\xed\xa0\x80"])

    def encode(fd: FieldDescriptor, payload: bytes) -> bytes:
        tag = (fd.number << 3) | 2
        return bytes([tag]) + bytes([len(payload)]) + payload

    return st.tuples(st.sampled_from(fields), payloads).map(lambda pair: encode(*pair))


def raw_garbage(method: MethodDescriptor, known: list[str]) -> st.SearchStrategy[tuple[str, bytes]]:
    """Random bytes, truncated valid encodings, and encodings with invalid UTF-8 in a string field."""
    valid = messages(method.input_type, known).map(lambda m: m.SerializeToString())
    truncated = valid.filter(lambda raw: len(raw) > 1).flatmap(
        lambda raw: st.integers(1, len(raw) - 1).map(lambda cut: raw[:cut])
    )
    return st.one_of(
        st.binary(min_size=1, max_size=200).map(lambda raw: ("random", raw)),
        truncated.map(lambda raw: ("truncated", raw)),
        st.tuples(valid, _invalid_utf8_field(method)).map(lambda pair: ("bad utf-8", pair[0] + pair[1])),
    )


@pytest.mark.parametrize("method", METHODS, ids=method_id)
async def test_undecodable_bytes_are_invalid_argument_and_harmless(hostile: Hostile, method: MethodDescriptor) -> None:
    """grpcio itself answers a request its deserializer rejects with UNKNOWN and the parser's text
    (`Unexpected <class 'google.protobuf.message.DecodeError'>: ...`); both servers install
    `core.request_decoding.MalformedRequestInterceptor`, which turns that into INVALID_ARGUMENT on `request`.
    Random or truncated bytes may still happen to decode (then any documented status is fine); invalid UTF-8
    in a string field never does."""

    @settings(_SETTINGS, max_examples=10)
    @given(garbage=raw_garbage(method, hostile.known))
    def garbage_in(garbage: tuple[str, bytes]) -> None:
        kind, raw = garbage
        code = check_answer(hostile, method, raw)
        if kind == "bad utf-8":
            assert code == Code.INVALID_ARGUMENT, f"{kind}: {code.name}"

    await asyncio.to_thread(garbage_in)
    await asyncio.to_thread(assert_still_serving, hostile)


@pytest.mark.parametrize("direction", ["order command, customer id", "customer command, order id"])
async def test_a_command_addressed_to_another_aggregates_id_is_not_found(hostile: Hostile, direction: str) -> None:
    """Found by the generated requests: ids of both aggregates are UUIDs, so an order command can name a customer
    (and the other way round). Folding the other aggregate's events must not become INTERNAL."""
    by_name = {m.name: m for m in METHODS}
    if direction.startswith("order"):
        method = by_name["CancelOrder"]
        request: Message = command_service_pb2.CancelOrderRequest(
            request_id=str(uuid.uuid4()), order_id=hostile.customer_id, reason="wrong id"
        )
    else:
        method = by_name["RenameCustomer"]
        request = customer_service_pb2.RenameCustomerRequest(
            request_id=str(uuid.uuid4()), customer_id=hostile.order_id, name="Wrong Id"
        )

    code = await asyncio.to_thread(check_answer, hostile, method, request.SerializeToString())

    assert code == Code.NOT_FOUND
