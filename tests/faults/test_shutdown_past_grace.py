"""Shutdown is bounded even when the work in hand is not: with PostgreSQL blackholed (connections open, nothing
flows), a command in flight, the relay mid-pass and the pool's connections all hang; SIGTERM must still end the
command service with exit 0 shortly after its grace period, its pool closed (terminated) rather than waited for."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit

import grpc
import pytest
from cqrs.orders.v1 import customer_service_pb2, customer_service_pb2_grpc

from command_service.migrate import migrate
from localservers import free_port
from tests.e2e.test_graceful_shutdown import _spawn, _terminate, _wait_serving
from tests.faults.proxy import FaultProxy
from tests.support import create_database

pytestmark = pytest.mark.slow

GRACE_SECONDS = 1.0
# grace + the relay's drain (max(grace, 1)) + closing the store and the pool (5 s bounds each) + interpreter exit
EXIT_WITHIN_SECONDS = GRACE_SECONDS + 1.0 + 5.0 + 5.0 + 5.0


async def test_sigterm_exits_zero_when_postgres_hangs_past_the_grace_period(
    postgres_dsn: str, nats_url: str, unique_name: str
) -> None:
    dsn = await create_database(postgres_dsn, unique_name)
    await migrate(dsn)
    parts = urlsplit(dsn)
    assert parts.hostname is not None and parts.port is not None, f"a TCP DSN is needed: {dsn}"
    proxy = await FaultProxy(parts.hostname, parts.port, name="postgres").start()
    proxied = dsn.replace(f"{parts.hostname}:{parts.port}", f"127.0.0.1:{proxy.port}", 1)
    port = free_port()
    proc = await _spawn(
        "command_service",
        {
            "CQRS_POSTGRES_DSN": proxied,
            "CQRS_NATS_URL": nats_url,
            "CQRS_STREAM_NAME": unique_name.upper(),
            "CQRS_SUBJECT_PREFIX": f"{unique_name}.events",
            "CQRS_COMMAND_LISTEN": f"127.0.0.1:{port}",
            "CQRS_GRACE_SECONDS": str(GRACE_SECONDS),
            "CQRS_RELAY_POLL_SECONDS": "0.2",
        },
    )
    try:
        await _wait_serving(f"127.0.0.1:{port}", proc)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = customer_service_pb2_grpc.CustomerCommandServiceStub(channel)

            def register() -> grpc.aio.UnaryUnaryCall[
                customer_service_pb2.RegisterCustomerRequest, customer_service_pb2.RegisterCustomerResponse
            ]:
                email = f"{uuid.uuid4().hex}@example.com"
                request = customer_service_pb2.RegisterCustomerRequest(
                    request_id=str(uuid.uuid4()), name="Ada", email=email
                )
                return stub.RegisterCustomer(request, timeout=30)

            await register()  # the pool and the relay have live connections now
            proxy.blackhole()
            in_flight = asyncio.ensure_future(register())  # hangs on PostgreSQL
            await asyncio.sleep(0.5)
            code, took, stderr = await _terminate(proc, timeout=EXIT_WITHIN_SECONDS + 10)
            with_status = await asyncio.gather(in_flight, return_exceptions=True)
        assert code == 0, stderr
        assert took < EXIT_WITHIN_SECONDS, f"took {took:.1f}s to exit: {stderr}"
        assert isinstance(with_status[0], grpc.aio.AioRpcError)  # the hung command was ended, not answered OK
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await proxy.close()
