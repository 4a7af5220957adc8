"""SIGTERM under load: each service stops gracefully (exit 0), no accepted command or event is lost, and no command
is half-written. The services run as real subprocesses (`python -m ...`), configured by environment only."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import asyncpg
import grpc
import nats
import pytest
from cqrs.orders.v1 import customer_service_pb2, customer_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import AsyncMongoClient

from command_service.domain.customer_commands import RegisterCustomer, RenameCustomer
from command_service.event_store import EventStore
from command_service.handlers import CommandContext, customer_handler
from command_service.migrate import migrate
from command_service.relay import OutboxRelay, RelaySettings
from localservers import free_port
from projector.config import ProjectorSettings
from projector.runner import Projector
from tests.support import create_database, eventually

GRACE_SECONDS = 5.0
EXIT_SLACK_SECONDS = 10.0  # beyond the grace: the relay's last batch, closing pools, interpreter exit
REFUSED = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}


async def _spawn(module: str, env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        module,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def _wait_serving(address: str, proc: asyncio.subprocess.Process) -> None:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)

        async def serving() -> bool:
            assert proc.returncode is None, f"service exited early with {proc.returncode}"
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
            except grpc.aio.AioRpcError:
                return False
            return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

        await eventually(serving, what=f"health SERVING at {address}", timeout=30, interval=0.1)


async def _terminate(proc: asyncio.subprocess.Process, timeout: float) -> tuple[int, float, str]:
    """SIGTERM; returns (exit status, seconds to exit, stderr tail)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, stderr = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        proc.kill()
        _, stderr = await proc.communicate()
        raise AssertionError(f"process did not exit within {timeout}s of SIGTERM: {stderr.decode()[-3000:]}") from None
    assert proc.returncode is not None
    return proc.returncode, time.monotonic() - started, stderr.decode()[-3000:]


@dataclass
class Outcomes:
    ok: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    other: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Env:
    dsn: str
    nats_url: str
    mongo_url: str
    name: str

    @property
    def stream(self) -> str:
        return self.name.upper()

    def command_env(self, port: int) -> dict[str, str]:
        return {
            "CQRS_POSTGRES_DSN": self.dsn,
            "CQRS_NATS_URL": self.nats_url,
            "CQRS_STREAM_NAME": self.stream,
            "CQRS_SUBJECT_PREFIX": f"{self.name}.events",
            "CQRS_COMMAND_LISTEN": f"127.0.0.1:{port}",
            "CQRS_GRACE_SECONDS": str(GRACE_SECONDS),
            "CQRS_RELAY_POLL_SECONDS": "0.2",
        }

    def projector_settings(self, **overrides: object) -> ProjectorSettings:
        values: dict[str, object] = dict(
            nats_url=self.nats_url, mongo_url=self.mongo_url, mongo_database=self.name, stream_name=self.stream,
            subject_prefix=f"{self.name}.events", projector_durable=f"{self.name}-projector",
            projector_fetch_timeout_seconds=0.2, projector_max_backoff_seconds=0.5,
        )  # fmt: skip
        values.update(overrides)
        return ProjectorSettings(**values)  # type: ignore[arg-type]


@pytest.fixture
async def env(postgres_dsn: str, nats_url: str, mongo_url: str, unique_name: str) -> AsyncIterator[Env]:
    dsn = await create_database(postgres_dsn, unique_name)
    await migrate(dsn)
    yield Env(dsn, nats_url, mongo_url, unique_name)


async def _load(address: str, stop: asyncio.Event, outcomes: Outcomes, worker: int) -> None:
    """Registers customers back to back until `stop` (or the server is gone), recording each request_id."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = customer_service_pb2_grpc.CustomerCommandServiceStub(channel)
        while not stop.is_set():
            request_id = str(uuid.uuid4())
            try:
                await stub.RegisterCustomer(
                    customer_service_pb2.RegisterCustomerRequest(
                        request_id=request_id, name=f"Load {worker}", email=f"{request_id}@example.com"
                    ),
                    timeout=GRACE_SECONDS + 5,
                )
                outcomes.ok.append(request_id)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in REFUSED:
                    outcomes.refused.append(request_id)
                    return  # the server is going away: stop this worker
                outcomes.other.append((request_id, f"{exc.code().name}: {exc.details()}"))


async def _written(dsn: str, request_ids: list[str]) -> dict[str, tuple[bool, int]]:
    """Per request_id: (request_log row present, number of events carrying it)."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        logged = {
            r["request_id"]
            for r in await conn.fetch("SELECT request_id FROM request_log WHERE request_id = ANY($1)", request_ids)
        }
        counts = {
            r["rid"]: r["n"]
            for r in await conn.fetch(
                """SELECT metadata->>'request_id' AS rid, count(*) AS n FROM events
                    WHERE metadata->>'request_id' = ANY($1) GROUP BY 1""",
                request_ids,
            )
        }
    finally:
        await conn.close()
    return {rid: (rid in logged, counts.get(rid, 0)) for rid in request_ids}


async def _pg_count(dsn: str, sql: str) -> int:
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        return int(await conn.fetchval(sql))
    finally:
        await conn.close()


async def test_command_service_sigterm_under_load_loses_nothing(env: Env) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = await _spawn("command_service", env.command_env(port))
    try:
        await _wait_serving(address, proc)
        outcomes = Outcomes()
        stop_load = asyncio.Event()
        workers = [asyncio.create_task(_load(address, stop_load, outcomes, i)) for i in range(16)]
        await eventually(lambda: _true_if(len(outcomes.ok) >= 50), what="50 accepted commands before SIGTERM")
        code, seconds, stderr = await _terminate(proc, GRACE_SECONDS + EXIT_SLACK_SECONDS)
        stop_load.set()
        await asyncio.wait_for(asyncio.gather(*workers), timeout=GRACE_SECONDS + 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    assert code == 0, f"exit status {code}; stderr: {stderr}"
    assert seconds < GRACE_SECONDS + EXIT_SLACK_SECONDS
    assert not outcomes.other, f"calls cut off with other codes: {outcomes.other[:5]}"

    # Every accepted command is in the event store; refused ones are all or nothing, never half-written.
    written = await _written(env.dsn, outcomes.ok + outcomes.refused)
    lost = [rid for rid in outcomes.ok if written[rid] != (True, 1)]
    assert not lost, f"accepted commands missing from PostgreSQL: {lost[:5]}"
    half = [rid for rid in outcomes.refused if written[rid] not in {(True, 1), (False, 0)}]
    assert not half, f"half-written commands: {half[:5]}"

    # A new call after shutdown began is refused (the process is gone: nothing listens any more).
    late_id = str(uuid.uuid4())
    async with grpc.aio.insecure_channel(address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await customer_service_pb2_grpc.CustomerCommandServiceStub(channel).RegisterCustomer(
                customer_service_pb2.RegisterCustomerRequest(request_id=late_id, name="Late", email="late@example.com"),
                timeout=2,
            )
    assert refused.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert (await _written(env.dsn, [late_id]))[late_id] == (False, 0)

    # The outbox drains: either the relay published everything, or the next instance does.
    if await _pg_count(env.dsn, "SELECT count(*) FROM outbox"):
        port2 = free_port()
        proc2 = await _spawn("command_service", env.command_env(port2))
        try:
            await eventually(
                lambda: _outbox_empty(env.dsn), what="the outbox to drain after a restart", timeout=30, interval=0.2
            )
            code2, _, stderr2 = await _terminate(proc2, GRACE_SECONDS + EXIT_SLACK_SECONDS)
            assert code2 == 0, stderr2
        finally:
            if proc2.returncode is None:
                proc2.kill()
                await proc2.wait()
    events = await _pg_count(env.dsn, "SELECT count(*) FROM events")
    nc = await nats.connect(env.nats_url)
    try:
        info = await nc.jetstream().stream_info(env.stream)
    finally:
        await nc.close()
    assert info.state.messages == events, f"JetStream has {info.state.messages} messages, PostgreSQL {events} events"


async def _true_if(value: bool) -> bool:
    return value


async def _outbox_empty(dsn: str) -> bool:
    return await _pg_count(dsn, "SELECT count(*) FROM outbox") == 0


async def test_projector_sigterm_while_consuming_loses_nothing(env: Env) -> None:
    # A backlog in JetStream: customers with a few versions each, published by an in-process relay.
    pool = await asyncpg.create_pool(env.dsn, min_size=1, max_size=10, timeout=10, command_timeout=10)
    store = EventStore(pool)
    handler = customer_handler(store)
    customer_ids = [str(uuid.uuid4()) for _ in range(60)]
    try:

        async def history(customer_id: str) -> None:
            for version, command in enumerate(
                [RegisterCustomer(customer_id, "A", f"{customer_id}@example.com")]
                + [RenameCustomer(customer_id, f"Name {n}") for n in range(3)],
                start=1,
            ):
                rid = f"{customer_id}-{version}"
                await handler.handle(command, CommandContext(request_id=rid, request_hash=rid))

        await asyncio.gather(*(history(c) for c in customer_ids))
    finally:
        await store.close()
        await pool.close()
    relay = OutboxRelay(env.dsn, env.nats_url, RelaySettings(env.stream, f"{env.name}.events", poll_interval=0.2))
    relay_task = asyncio.create_task(relay.run())
    try:
        await eventually(lambda: _outbox_empty(env.dsn), what="the relay to publish the backlog", timeout=30)
    finally:
        relay.stop()
        await asyncio.wait_for(relay_task, timeout=10)

    mongo: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(env.mongo_url, tz_aware=True)
    customers = mongo[env.name]["customers"]
    try:
        proc = await _spawn(
            "projector",
            {
                "CQRS_NATS_URL": env.nats_url,
                "CQRS_MONGO_URL": env.mongo_url,
                "CQRS_MONGO_DATABASE": env.name,
                "CQRS_STREAM_NAME": env.stream,
                "CQRS_SUBJECT_PREFIX": f"{env.name}.events",
                "CQRS_PROJECTOR_DURABLE": f"{env.name}-projector",
                "CQRS_PROJECTOR_BATCH_SIZE": "10",  # small batches: SIGTERM lands while it is consuming
                "CQRS_GRACE_SECONDS": str(GRACE_SECONDS),
            },
        )
        try:

            async def started() -> bool:
                assert proc.returncode is None, "projector exited early"
                return await customers.count_documents({}) > 0

            await eventually(started, what="the projector to apply its first events", timeout=30)
            code, _, stderr = await _terminate(proc, GRACE_SECONDS + EXIT_SLACK_SECONDS)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert code == 0, f"exit status {code}; stderr: {stderr}"

        # A restarted projector brings every document to its final version: nothing was lost in the stop.
        projector = Projector(env.projector_settings())
        await projector.start()
        try:

            async def complete() -> bool:
                docs = await customers.find({}, {"version": 1}).to_list()
                return len(docs) == len(customer_ids) and all(d.get("version") == 4 for d in docs)

            await eventually(complete, what="every customer at version 4 after the restart", timeout=60)
        finally:
            await projector.stop()
    finally:
        await mongo.close()


async def test_query_service_sigterm_exits_zero(env: Env) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    proc = await _spawn(
        "query_service",
        {
            "CQRS_MONGO_URL": env.mongo_url,
            "CQRS_MONGO_DATABASE": env.name,
            "CQRS_QUERY_LISTEN": address,
            "CQRS_GRACE_SECONDS": str(GRACE_SECONDS),
        },
    )
    try:
        await _wait_serving(address, proc)
        code, seconds, stderr = await _terminate(proc, GRACE_SECONDS + EXIT_SLACK_SECONDS)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert code == 0, f"exit status {code}; stderr: {stderr}"
    assert seconds < GRACE_SECONDS + EXIT_SLACK_SECONDS
