"""Both gRPC servers supervise their background tasks: a task that dies makes the server NOT_SERVING (its health
says so) until the supervisor has restarted it, and the relay's own health name reports a stalled relay."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from command_service.server import RELAY_HEALTH_SERVICE
from core.supervisor import Supervisor
from tests.integration.test_security import command_server, query_server
from tests.support import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(port: int, service: str = "") -> Any:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2
        )
        return reply.status


class _Crashing:
    """A background loop that fails `times` times, then runs normally."""

    def __init__(self, times: int, release: asyncio.Event) -> None:
        self.runs = 0
        self._times = times
        self._release = release

    async def __call__(self) -> None:
        self.runs += 1
        if self.runs <= self._times:
            await self._release.wait()  # stays "down" between failures until the test has looked
            raise RuntimeError(f"injected failure {self.runs}")
        await asyncio.Event().wait()


async def _until(port: int, wanted: Any, what: str, service: str = "") -> None:
    async def reached() -> bool:
        return bool(await _status(port, service) == wanted)

    await eventually(reached, what=what, timeout=15, interval=0.05)


async def _not_serving_while_a_task_is_down(port: int, supervisor: Supervisor) -> None:
    await _until(port, SERVING, "the server SERVING")
    release = asyncio.Event()
    crashing = _Crashing(times=1, release=release)
    supervisor._base_backoff = 2.0  # a restart slow enough to observe the down state
    supervisor.start("injected", crashing)
    release.set()
    await _until(port, NOT_SERVING, "NOT_SERVING while the failed task waits for its restart")
    await _until(port, SERVING, "SERVING again once it is restarted")
    assert crashing.runs == 2 and supervisor.restarts("injected") == 1


async def test_command_server_is_not_serving_while_an_essential_task_is_down(
    postgres_dsn: str, unique_name: str
) -> None:
    async with command_server(postgres_dsn, unique_name) as running:
        await _not_serving_while_a_task_is_down(running.port, running.supervisor)


async def test_query_server_is_not_serving_while_an_essential_task_is_down(mongo_url: str, unique_name: str) -> None:
    async with query_server(mongo_url, unique_name) as running:
        await _not_serving_while_a_task_is_down(running.port, running.supervisor)


async def test_relay_health_is_serving_while_the_relay_relays(
    postgres_dsn: str, nats_url: str, unique_name: str
) -> None:
    async with command_server(
        postgres_dsn,
        unique_name,
        relay_enabled=True,
        nats_url=nats_url,
        stream_name=unique_name.upper(),
        subject_prefix=f"{unique_name}.events",
    ) as running:
        await _until(running.port, SERVING, "the relay's health SERVING", service=RELAY_HEALTH_SERVICE)
        assert running.relay is not None
        await eventually(lambda: _true(running.relay is not None and running.relay.is_leader), what="relay active")


async def _true(value: bool) -> bool:
    return value
