"""TLS, mutual TLS, bearer-token auth, the concurrency limit and RPC metrics, on the real in-process servers.

Certificates come from `trustme` and signing keys from `cryptography`, all made here.
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import trustme
from cqrs.orders.v1 import customer_service_pb2, customer_service_pb2_grpc, query_service_pb2, query_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from command_service.config import CommandServiceSettings
from command_service.migrate import migrate
from command_service.server import RunningCommandServer, start_command_server
from core.log_throttle import per_request
from query_service.config import QuerySettings
from query_service.server import RunningServer, start_query_server
from tests.support import create_database, eventually, with_database
from tests.unit.test_auth import AUDIENCE, ISSUER, Signer, hs256_with_public_key, unsigned_token

GET_ORDER = "/cqrs.orders.v1.OrderQueryService/GetOrder"
LIST_ORDERS = "/cqrs.orders.v1.OrderQueryService/ListOrders"
REGISTER = "/cqrs.orders.v1.CustomerCommandService/RegisterCustomer"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"


# --- certificates and keys ---------------------------------------------------------------------------------------


@dataclass
class Certs:
    ca_pem: bytes
    server_cert: Path
    server_key: Path
    client_ca: Path  # the CA that signs client certificates (another one than the server's)
    client_cert_pem: bytes
    client_key_pem: bytes
    stranger_cert_pem: bytes  # signed by a CA the server does not trust
    stranger_key_pem: bytes


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    base = tmp_path_factory.mktemp("certs")
    server_ca, client_ca, other_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("127.0.0.1", "localhost")
    server.cert_chain_pems[0].write_to_path(str(base / "server.pem"))
    for blob in server.cert_chain_pems[1:]:
        blob.write_to_path(str(base / "server.pem"), append=True)
    server.private_key_pem.write_to_path(str(base / "server.key"))
    client_ca.cert_pem.write_to_path(str(base / "client-ca.pem"))
    client = client_ca.issue_cert("client@cqrs.test")
    stranger = other_ca.issue_cert("stranger@cqrs.test")
    return Certs(
        ca_pem=server_ca.cert_pem.bytes(),
        server_cert=base / "server.pem",
        server_key=base / "server.key",
        client_ca=base / "client-ca.pem",
        client_cert_pem=client.cert_chain_pems[0].bytes(),
        client_key_pem=client.private_key_pem.bytes(),
        stranger_cert_pem=stranger.cert_chain_pems[0].bytes(),
        stranger_key_pem=stranger.private_key_pem.bytes(),
    )


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


@pytest.fixture(scope="module")
def jwt_key_file(tmp_path_factory: pytest.TempPathFactory, signer: Signer) -> Path:
    path = tmp_path_factory.mktemp("jwt") / "public.pem"
    path.write_bytes(signer.public_pem)
    return path


def auth_settings(key_file: Path) -> dict[str, Any]:
    return {
        "auth_enabled": True,
        "auth_jwt_key_file": key_file,
        "auth_issuer": ISSUER,
        "auth_audience": AUDIENCE,
    }


# --- servers -----------------------------------------------------------------------------------------------------


@asynccontextmanager
async def query_server(mongo_url: str, database: str, **settings: Any) -> AsyncIterator[RunningServer]:
    running = await start_query_server(
        QuerySettings(mongo_url=mongo_url, mongo_database=database, query_listen="127.0.0.1:0", grace_seconds=1,
                      **settings),
        health_interval=0.3,
    )  # fmt: skip
    try:
        yield running
    finally:
        await running.stop()


@asynccontextmanager
async def command_server(postgres_dsn: str, name: str, **settings: Any) -> AsyncIterator[RunningCommandServer]:
    dsn = await create_database(postgres_dsn, name)
    await migrate(dsn)
    running = await start_command_server(
        CommandServiceSettings(postgres_dsn=dsn, command_listen="127.0.0.1:0", grace_seconds=1,
                               **{"relay_enabled": False, **settings})
    )  # fmt: skip
    try:
        yield running
    finally:
        await running.stop()


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


async def status_of(call: Awaitable[Any]) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def rejection(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value.code(), caught.value.details() or ""


async def health_check(channel: grpc.aio.Channel, timeout: float = 5) -> Any:
    return await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)


# --- TLS ---------------------------------------------------------------------------------------------------------


async def test_tls_works_with_the_ca_and_refuses_plaintext(mongo_url: str, unique_name: str, certs: Certs) -> None:
    async with query_server(
        mongo_url, unique_name, tls_cert_file=certs.server_cert, tls_key_file=certs.server_key
    ) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca_pem)
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
            await health_check(channel)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            assert await status_of(health_check(channel, timeout=3)) == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_requires_a_client_certificate_from_the_client_ca(
    mongo_url: str, unique_name: str, certs: Certs
) -> None:
    async with query_server(
        mongo_url, unique_name,
        tls_cert_file=certs.server_cert, tls_key_file=certs.server_key, tls_client_ca_file=certs.client_ca,
    ) as server:  # fmt: skip
        address = f"127.0.0.1:{server.port}"
        without = grpc.ssl_channel_credentials(root_certificates=certs.ca_pem)
        async with grpc.aio.secure_channel(address, without) as channel:
            assert await status_of(health_check(channel, timeout=3)) == grpc.StatusCode.UNAVAILABLE
        stranger = grpc.ssl_channel_credentials(certs.ca_pem, certs.stranger_key_pem, certs.stranger_cert_pem)
        async with grpc.aio.secure_channel(address, stranger) as channel:
            assert await status_of(health_check(channel, timeout=3)) == grpc.StatusCode.UNAVAILABLE
        client = grpc.ssl_channel_credentials(certs.ca_pem, certs.client_key_pem, certs.client_cert_pem)
        async with grpc.aio.secure_channel(address, client) as channel:
            await health_check(channel)


async def test_command_server_serves_tls_too(postgres_dsn: str, unique_name: str, certs: Certs) -> None:
    async with command_server(
        postgres_dsn, unique_name, tls_cert_file=certs.server_cert, tls_key_file=certs.server_key
    ) as server:
        credentials = grpc.ssl_channel_credentials(root_certificates=certs.ca_pem)
        async with grpc.aio.secure_channel(f"127.0.0.1:{server.port}", credentials) as channel:
            await health_check(channel)


# --- authentication and authorization ----------------------------------------------------------------------------


async def test_query_auth(
    mongo_url: str, unique_name: str, signer: Signer, jwt_key_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="core.auth")
    per_request.clear()  # lines other tests of this process logged must not count against this one's
    async with (
        query_server(mongo_url, unique_name, **auth_settings(jwt_key_file)) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        queries = query_service_pb2_grpc.OrderQueryServiceStub(channel)
        get = query_service_pb2.GetOrderRequest(order_id=str(uuid.uuid4()))

        def get_with(token: str) -> Awaitable[Any]:
            return queries.GetOrder(get, metadata=bearer(token), timeout=5)

        # probes need no token
        await health_check(channel)
        assert await rejection(queries.GetOrder(get, timeout=5)) == (
            grpc.StatusCode.UNAUTHENTICATED, "missing bearer token"
        )  # fmt: skip
        expired = signer.token(scope="orders:read", exp=1_600_000_000)
        assert await rejection(get_with(expired)) == (grpc.StatusCode.UNAUTHENTICATED, "token expired")
        wrong_audience = signer.token(scope="orders:read", aud="another-api")
        assert await rejection(get_with(wrong_audience)) == (grpc.StatusCode.UNAUTHENTICATED, "wrong audience")
        wrong_issuer = signer.token(scope="orders:read", iss="https://evil.test")
        assert await rejection(get_with(wrong_issuer)) == (grpc.StatusCode.UNAUTHENTICATED, "wrong issuer")
        code, details = await rejection(get_with(unsigned_token()))
        assert (code, details.split(":")[0]) == (grpc.StatusCode.UNAUTHENTICATED, "algorithm not allowed")
        code, details = await rejection(get_with(hs256_with_public_key(signer.public_pem)))
        assert (code, details.split(":")[0]) == (grpc.StatusCode.UNAUTHENTICATED, "algorithm not allowed")
        assert await rejection(get_with(signer.token(scope="orders:write"))) == (
            grpc.StatusCode.PERMISSION_DENIED, "needs scope orders:read"
        )  # fmt: skip

        # server streaming is guarded too
        watch = queries.WatchOrder(query_service_pb2.WatchOrderRequest(order_id=str(uuid.uuid4())), timeout=5)
        assert await rejection(watch.read()) == (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")

        # the right scope gets through (to the read model: an unknown order is NOT_FOUND, not an auth error)
        reader = signer.token(scope="orders:read")
        await eventually(lambda: _serving(channel), what="query service SERVING")
        listed = await queries.ListOrders(query_service_pb2.ListOrdersRequest(), metadata=bearer(reader), timeout=5)
        assert list(listed.orders) == []
        assert await status_of(get_with(reader)) == grpc.StatusCode.NOT_FOUND
        scp_reader = signer.token(scope=None, scp=["orders:read"])
        assert await status_of(get_with(scp_reader)) == grpc.StatusCode.NOT_FOUND

        # and every outcome is counted by method and code
        def handled(method: str, code: str) -> float:
            value = server.registry.get_sample_value("cqrs_grpc_server_handled_total", {"method": method, "code": code})
            return value or 0.0

        assert handled(GET_ORDER, "UNAUTHENTICATED") == 6
        # each refused, but logged once per method and code (and window): a client with a bad token cannot flood it
        refusals = [r.getMessage() for r in caplog.records if r.name == "core.auth"]
        assert refusals == [
            f"rejected {GET_ORDER}: missing bearer token (UNAUTHENTICATED)",
            f"rejected {GET_ORDER}: needs scope orders:read (PERMISSION_DENIED)",
            "rejected /cqrs.orders.v1.OrderQueryService/WatchOrder: missing bearer token (UNAUTHENTICATED)",
        ], refusals
        assert handled("/cqrs.orders.v1.OrderQueryService/WatchOrder", "UNAUTHENTICATED") == 1
        assert handled(GET_ORDER, "PERMISSION_DENIED") == 1
        assert handled(GET_ORDER, "NOT_FOUND") == 2
        assert handled(LIST_ORDERS, "OK") == 1
        assert handled(HEALTH_CHECK, "OK") >= 1
        count = server.registry.get_sample_value("cqrs_grpc_server_handling_seconds_count", {"method": GET_ORDER})
        assert count == 9
        # and so are the MongoDB calls behind them
        for operation in ("get_order", "list_orders"):
            labels = {"dependency": "mongodb", "operation": operation}
            assert (server.registry.get_sample_value("cqrs_dependency_call_seconds_count", labels) or 0) >= 1, labels


async def _serving(channel: grpc.aio.Channel) -> bool:
    reply = await health_check(channel)
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


async def test_command_auth_needs_the_write_scope(
    postgres_dsn: str, unique_name: str, signer: Signer, jwt_key_file: Path
) -> None:
    async with (
        command_server(postgres_dsn, unique_name, **auth_settings(jwt_key_file)) as server,
        grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel,
    ):
        customers = customer_service_pb2_grpc.CustomerCommandServiceStub(channel)

        def register(metadata: Any = None) -> Awaitable[Any]:
            request = customer_service_pb2.RegisterCustomerRequest(
                request_id=str(uuid.uuid4()), name="Grace Hopper", email=f"{uuid.uuid4().hex}@example.com"
            )
            return customers.RegisterCustomer(request, metadata=metadata, timeout=10)

        await health_check(channel)
        assert await rejection(register()) == (grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        reader = bearer(signer.token(scope="orders:read"))
        assert await rejection(register(reader)) == (grpc.StatusCode.PERMISSION_DENIED, "needs scope orders:write")
        writer = bearer(signer.token(scope="orders:read orders:write"))
        await eventually(lambda: _serving(channel), what="command service SERVING")
        reply = await register(writer)
        assert reply.result.customer_id
        # Who made the change is recorded with the event (order history shows it): the token's subject.
        conn = await asyncpg.connect(with_database(postgres_dsn, unique_name), timeout=10)
        try:
            recorded = await conn.fetchval(
                "SELECT metadata->>'subject' FROM events WHERE stream_id = $1", reply.result.customer_id
            )
        finally:
            await conn.close()
        assert recorded == "svc-a"
        assert server.registry is not None
        labels = {"method": REGISTER, "code": "OK"}
        assert server.registry.get_sample_value("cqrs_grpc_server_handled_total", labels) == 1
        # the PostgreSQL call behind it is timed (group commit is on by default: one batch transaction); a new
        # stream is not read first (the stream cache takes a creating command's stream as new, the append checks)
        labels = {"dependency": "postgres", "operation": "append_batch"}
        assert (server.registry.get_sample_value("cqrs_dependency_call_seconds_count", labels) or 0) >= 1, labels


# --- limits and metrics exporter ---------------------------------------------------------------------------------


async def test_beyond_max_concurrent_rpcs_is_resource_exhausted(mongo_url: str, unique_name: str) -> None:
    async with (
        query_server(mongo_url, unique_name, grpc_max_concurrent_rpcs=2) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        health = health_pb2_grpc.HealthStub(channel)
        # Two Watch streams stay open and hold both slots (each has sent its first status, so it is running).
        watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=20) for _ in range(2)]
        try:
            for watch in watches:
                await watch.read()
            assert await status_of(health_check(channel)) == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for watch in watches:
                watch.cancel()

        async def slot_freed() -> bool:
            return await status_of(health_check(channel)) == grpc.StatusCode.OK

        await eventually(slot_freed, what="a free slot after the streams ended")


async def test_query_service_exports_rpc_metrics_over_http(mongo_url: str, unique_name: str) -> None:
    async with (
        query_server(mongo_url, unique_name, query_metrics_port=0) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        await health_check(channel)
        assert server.metrics is not None
        url = f"http://127.0.0.1:{server.metrics.port}/metrics"
        fetch: Callable[[], bytes] = lambda: urllib.request.urlopen(url, timeout=5).read()  # noqa: E731
        text = (await asyncio.to_thread(fetch)).decode()
        assert f'cqrs_grpc_server_handled_total{{code="OK",method="{HEALTH_CHECK}"}} 1.0' in text
        assert f'cqrs_grpc_server_handling_seconds_bucket{{le="+Inf",method="{HEALTH_CHECK}"}} 1.0' in text


async def test_a_watch_stream_ends_unauthenticated_when_its_bearer_token_expires(
    mongo_url: str, unique_name: str, signer: Signer, jwt_key_file: Path
) -> None:
    from pymongo import AsyncMongoClient

    from tests.integration.test_query_service import T0, make_order

    order = make_order(created_at=T0)
    client: AsyncMongoClient[Any] = AsyncMongoClient(mongo_url)
    try:
        await client[unique_name]["orders"].insert_one(order)
    finally:
        await client.close()
    settings = {**auth_settings(jwt_key_file), "auth_leeway_seconds": 0}
    async with (
        query_server(mongo_url, unique_name, **settings) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        await eventually(lambda: _serving(channel), what="query service SERVING")
        queries = query_service_pb2_grpc.OrderQueryServiceStub(channel)
        short_lived = signer.token(scope="orders:read", exp=int(time.time()) + 2)
        started = time.monotonic()
        call = queries.WatchOrder(
            query_service_pb2.WatchOrderRequest(order_id=order["_id"]), metadata=bearer(short_lived), timeout=30
        )
        first = await call.read()
        assert isinstance(first, query_service_pb2.WatchOrderResponse), first
        assert first.order.order_id == order["_id"]  # the stream was open and working
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
        assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in (ended.value.details() or "")
        assert time.monotonic() - started < 10, "the stream outlived its token"
