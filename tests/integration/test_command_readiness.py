"""command_service's readiness answers "is PostgreSQL reachable" on a connection of its own
(`command_service/event_store_probe.py`): commands holding every pooled connection (an overload) neither freeze
it nor fail it, and an outage that begins meanwhile still turns the service NOT_SERVING and `cqrs_postgres_up` 0
(what the `CqrsEventStoreDown` alert watches).

The outage here is a blackhole (half-open connections: nothing flows, nobody is told), the one a probe through the
pool cannot see while the pool is busy: the pooled connections it would wait for neither answer nor close, so it
waits in the pool's queue behind the commands (checked: with the probe on the pool this test fails). A reset, by
contrast, closes them, asyncpg hands them back, and a pooled probe notices too."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from urllib.parse import urlsplit

import grpc
import pytest
from cqrs.orders.v1 import customer_service_pb2, customer_service_pb2_grpc

from command_service.config import CommandServiceSettings
from command_service.migrate import migrate
from command_service.server import start_command_server
from tests.faults.proxy import FaultProxy
from tests.faults.support import health_status
from tests.support import create_database, eventually

POOL_SIZE = 2


async def _until(address: str, wanted: str, what: str) -> None:
    async def reached() -> bool:
        return await health_status(address) == wanted

    await eventually(reached, what=what, timeout=15, interval=0.05)


async def test_readiness_follows_postgres_while_commands_hold_every_pooled_connection(
    postgres_dsn: str, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = await create_database(postgres_dsn, unique_name)
    await migrate(dsn)
    upstream = urlsplit(dsn)
    assert upstream.hostname is not None and upstream.port is not None, "a TCP PostgreSQL DSN"
    proxy = await FaultProxy(upstream.hostname, upstream.port, "postgres-proxy").start()
    settings = CommandServiceSettings(
        postgres_dsn=dsn.replace(f":{upstream.port}/", f":{proxy.port}/"), command_listen="127.0.0.1:0",
        grace_seconds=1, relay_enabled=False, postgres_pool_max=POOL_SIZE, postgres_timeout_seconds=1,
        command_metrics_port=0,
    )  # fmt: skip
    caplog.set_level(logging.WARNING, logger="command_service.server")
    running = await start_command_server(settings, health_interval=0.05)
    address = f"127.0.0.1:{running.port}"
    try:
        await _until(address, "SERVING", "SERVING once PostgreSQL answers")
        assert running.registry is not None

        def up() -> float | None:
            return running.registry.get_sample_value("cqrs_postgres_up") if running.registry else None

        assert up() == 1
        async with contextlib.AsyncExitStack() as held:
            for _ in range(POOL_SIZE):  # what an overload looks like to the pool: no connection free
                await held.enter_async_context(running.pool.acquire())
            for _ in range(10):  # a busy pool is not an outage
                assert await health_status(address) == "SERVING" and up() == 1
                await asyncio.sleep(0.05)
            proxy.blackhole()  # PostgreSQL gone silent: the held connections neither answer nor close
            await _until(address, "NOT_SERVING", "NOT_SERVING with PostgreSQL blackholed and the pool held")
            assert up() == 0
            proxy.heal()
            await _until(address, "SERVING", "SERVING again once PostgreSQL is back, the pool still held")
            assert up() == 1
        warnings = [r.getMessage() for r in caplog.records if "event store (PostgreSQL) unavailable" in r.getMessage()]
        assert warnings == ["event store (PostgreSQL) unavailable: no answer within 1s"]  # once, saying why
        request = customer_service_pb2.RegisterCustomerRequest(
            request_id=str(uuid.uuid4()), name="Grace Hopper", email=f"{uuid.uuid4().hex}@example.com"
        )

        async def registered() -> int:
            """The customer's version once a command gets through: each pooled connection the blackhole left
            half-open fails one command (UNAVAILABLE within its budget) and is dropped, then the pool reconnects."""
            async with grpc.aio.insecure_channel(address) as channel:
                stub = customer_service_pb2_grpc.CustomerCommandServiceStub(channel)
                try:
                    reply = await stub.RegisterCustomer(request, timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
                    return 0
            return int(reply.result.version)

        assert await eventually(registered, what="a command to succeed after the heal", timeout=30) == 1
    finally:
        await running.stop()
        await proxy.close()
