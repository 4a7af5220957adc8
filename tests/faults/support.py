"""Building blocks of the fault-injection scenarios: dedicated servers, service subprocesses, gRPC load, waits
and the end-of-scenario assertions.

Every scenario follows the same shape: start dedicated servers and the services as real subprocesses (`python -m
...`, configured by environment only), run load through the gRPC API recording every reply, inject the fault, heal
it, wait for quiescence (outbox empty, read model and checkpoints caught up; bounded polling that says what it
waited for), then check that (a) every command that got OK is in the event store at the version it was told, (b)
failed commands got only retryable statuses (UNAVAILABLE / ABORTED, and CANCELLED from a replica being stopped),
never INTERNAL/UNKNOWN or a hang past the deadline, (c) the end-to-end audit is clean.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
from cqrs.orders.v1 import (
    command_service_pb2,
    command_service_pb2_grpc,
    customer_service_pb2,
    customer_service_pb2_grpc,
    order_pb2,
    query_service_pb2,
    query_service_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pymongo import AsyncMongoClient

from core.customer_events import CUSTOMER_STREAM_TYPE
from core.generations import read_active
from core.order_events import ORDER_STREAM_TYPE
from core.read_model import CHECKPOINTS_COLLECTION
from core.subjects import SUBJECT_PREFIX
from cqrsctl.status import metrics_text
from cqrsctl.status import parse as parse_metrics
from cqrsctl.verify import VerifyConfig, run_verify
from localservers import (
    MongoServer,
    NodePorts,
    PostgresServer,
    ServerProcess,
    ServiceProcess,
    free_port,
    log_tail,
    with_parent_death_signal,
)

REPO_ROOT = Path(__file__).resolve().parents[2]

# Short timeouts everywhere: a scenario must fail fast and the whole suite must stay within minutes on 2 cores.
RPC_TIMEOUT = 5.0  # the client's deadline per command; a service must answer (even UNAVAILABLE) well before it
POSTGRES_TIMEOUT = 2.0  # CQRS_POSTGRES_TIMEOUT_SECONDS of command_service
MONGO_TIMEOUT_MS = 1000  # CQRS_MONGO_TIMEOUT_MS of projector and query_service
ACK_WAIT = 3.0  # CQRS_PROJECTOR_ACK_WAIT_SECONDS: redelivery after a projector dies holding messages
# Quiescence (outbox drained, read model caught up) fails once nothing moved for this long; a backlog that keeps
# shrinking (a long soak leaves one) is waited out up to QUIESCE_LIMIT.
QUIESCE_TIMEOUT = 45.0
QUIESCE_LIMIT = 600.0
# The share of the time the read model's catch-up probe may keep the MongoDB-wire server busy.
READ_MODEL_PROBE_DUTY = 0.2
SERVING_TIMEOUT = 30.0

T = TypeVar("T")
F = TypeVar("F")

# The statuses a failed command may end with when a dependency or the service itself is gone.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ABORTED})
# A replica told to stop cancels the calls it had received but not yet handed to a handler (grpc/grpc#41785): a
# CANCELLED is retryable (the typed client retries it) only from a replica being stopped, ending within this long
# of its stop.
STOP_CANCEL_MARGIN_SECONDS = 1.0

CHANNEL_OPTIONS = [
    # Reconnect quickly after a restarted server (gRPC's default backoff grows to two minutes).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.enable_retries", 0),  # a transparent retry would hide what the service answered
]

ADDRESS = order_pb2.Address(
    recipient="Fault Tester", line1="1 Chaos Lane", city="Berlin", postal_code="10115", country="DE"
)


# --------------------------------------------------------------------------------------------- waiting


async def _probe_once(probe: Callable[[], Awaitable[tuple[T, str]]], failed: F) -> tuple[T | F, str]:
    """One call of `probe`; an error of a dependency that may be restarting gives `failed`, the error the detail."""
    try:
        return await probe()
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError, grpc.aio.AioRpcError) as exc:
        return failed, f"probe failed: {exc!r}"


async def wait_until(
    probe: Callable[[], Awaitable[tuple[bool, str]]], *, what: str, timeout: float, interval: float = 0.1
) -> float:
    """Polls `probe` (returning (done, detail)) until done; returns the seconds it took.

    Fails after `timeout` seconds saying what it waited for and the probe's last detail. A probe that raises is
    treated as "not yet" (a dependency may be restarting), its error becoming the detail.
    """
    started = time.monotonic()
    detail = "never probed"
    while True:
        done, detail = await _probe_once(probe, False)
        if done:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last: {detail}")
        await asyncio.sleep(interval)


async def wait_drained(
    probe: Callable[[], Awaitable[tuple[int, str]]],
    *,
    what: str,
    stall: float,
    limit: float,
    interval: float = 0.25,
    report_every: float | None = None,
    max_duty: float = 1.0,
) -> float:
    """Polls `probe` (returning (what is left, detail)) until nothing is left; returns the seconds it took.

    Fails once what is left has not shrunk for `stall` seconds (stuck: nothing would ever move it), or after
    `limit`, saying what it waited for and the probe's last detail. A probe that raises counts as no progress.
    `report_every`: prints what is left this often (a long soak's backlog: draining steadily, or in jumps).
    `max_duty`: the share of the time a probe may take at most (it waits longer between probes that take long), so
    that a probe reading whole collections does not starve the server the system under test is draining into."""
    started = time.monotonic()
    best: int | None = None
    moved = reported = started
    detail = "never probed"
    while True:
        probed_at = time.monotonic()
        left, detail = await _probe_once(probe, None)
        now = time.monotonic()
        if left == 0:
            return now - started
        if report_every is not None and now - reported >= report_every:
            print(f"  {now - started:.0f}s: {detail[:300]}")
            reported = now
        if left is not None and (best is None or left < best):
            best, moved = left, now
        if now - moved > stall:
            raise AssertionError(f"nothing moved for {stall:.0f}s while waiting for {what}; last: {detail}")
        if now - started > limit:
            raise AssertionError(f"timed out after {limit:.0f}s waiting for {what}; last: {detail}")
        await asyncio.sleep(max(interval, (now - probed_at) * (1 / max_duty - 1)))


# --------------------------------------------------------------------------------------------- names


@dataclass(frozen=True)
class Names:
    """Per-scenario names: database, stream, subjects, durable consumer, Mongo database."""

    name: str

    @property
    def stream(self) -> str:
        return self.name.upper()

    @property
    def prefix(self) -> str:
        return f"{self.name}.events"

    @property
    def durable(self) -> str:
        return f"{self.name}-projector"


# --------------------------------------------------------------------------------------------- services


class Service:
    """One of our services as a real subprocess (`python -m module`, started by `localservers.ServiceProcess`), output
    appended to a log file; the scenario's async API over it."""

    def __init__(
        self, module: str, env: dict[str, str], log_path: Path, address: str = "", metrics_port: int | None = None
    ) -> None:
        self.module = module
        self.env = env
        self.log_path = log_path
        self.address = address
        self.metrics_port = metrics_port
        # SIGKILL if pytest dies: a scenario's services are thrown away, a clean stop would only cost time.
        self.process = ServiceProcess(
            module, listen=address or None, log_path=log_path, cwd=REPO_ROOT, death_signal=signal.SIGKILL
        )

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.running

    @property
    def starts(self) -> int:
        return self.process.starts

    async def start(self, *, extra_env: dict[str, str] | None = None) -> Service:
        """Starts it (again); `extra_env` applies to this start only (e.g. `CQRS_FAILPOINTS`)."""
        assert not self.alive, f"{self.module} is already running"
        env = {**os.environ, **self.env, **(extra_env or {})}
        if not extra_env or "CQRS_FAILPOINTS" not in extra_env:
            env.pop("CQRS_FAILPOINTS", None)
        self.process.start(env, note=str(extra_env or ""))
        return self

    async def wait_serving(self, timeout: float = SERVING_TIMEOUT) -> float:
        """Waits for grpc health SERVING (overall status); fails early if the process exits."""
        assert self.address, f"{self.module} serves no gRPC"

        async def probe() -> tuple[bool, str]:
            if not self.alive:
                raise AssertionError(f"{self.module} exited with {self.returncode} while starting: {self.tail()}")
            status = await health_status(self.address)
            return status == "SERVING", status

        return await wait_until(probe, what=f"{self.module} at {self.address} to report SERVING", timeout=timeout)

    @property
    def metrics_url(self) -> str:
        assert self.metrics_port is not None, f"{self.module} serves no /metrics here"
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def metrics(self) -> dict[str, float]:
        """Its unlabelled /metrics samples (raises OSError when the page cannot be read)."""
        return parse_metrics(self.metrics_url, metrics_text(self.metrics_url, 3.0)).values

    async def wait_projector_serving(self, timeout: float = SERVING_TIMEOUT) -> float:
        """Waits until a projector reports SERVING on /metrics (its loops run), so that a scenario's kill or pause
        hits a working replica rather than an interpreter still importing (seconds, on a busy machine)."""

        async def probe() -> tuple[bool, str]:
            if not self.alive:
                raise AssertionError(f"{self.module} exited with {self.returncode} while starting: {self.tail()}")
            serving = (await asyncio.to_thread(self.metrics)).get("cqrs_projector_serving", 0.0)
            return serving == 1.0, f"cqrs_projector_serving {serving:g}"

        return await wait_until(probe, what=f"the projector (pid {self.pid}) to report SERVING", timeout=timeout)

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    async def kill(self) -> None:
        """SIGKILL (continuing it first would not matter: SIGKILL ends a stopped process too)."""
        self.process.kill()
        await self.wait_exit(10, "SIGKILL")

    def pause(self) -> None:
        self.process.pause()

    def resume(self) -> None:
        self.process.resume()

    async def wait_exit(self, timeout: float, why: str) -> int:
        try:
            return await self.process.async_wait(timeout)
        except TimeoutError:
            raise AssertionError(f"{self.module} (pid {self.pid}) did not exit within {timeout}s of {why}") from None

    async def stop_gracefully(self, timeout: float) -> None:
        """SIGTERM, as a rolling restart sends it: fails unless it ends by itself within `timeout` with exit 0."""
        self.process.terminate()
        code = await self.wait_exit(timeout, "SIGTERM")
        assert code == 0, f"{self.module} (pid {self.pid}) exited with {code} after SIGTERM: {self.tail()}"

    async def terminate(self, timeout: float = 15.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time (teardown only)."""
        await self.process.async_stop(timeout)

    def tail(self, max_bytes: int = 3000) -> str:
        return self.process.tail(max_bytes)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


async def health_status(address: str, service: str = "", timeout: float = 1.0) -> str:
    """`SERVING`, `NOT_SERVING`, ... or `UNREACHABLE (<code>)` when the health RPC itself fails."""
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            return f"UNREACHABLE ({exc.code().name})"
    return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))


# --------------------------------------------------------------------------------------------- the stack


class FaultStack:
    """Dedicated PostgreSQL, NATS and MongoDB servers for one scenario (free ports, data in a temp dir) plus the
    services it starts. Scenarios kill and pause these servers, so they are never the shared session servers.

    The servers are owned by a launcher subprocess (`tests.faults.launcher`, see there why); the `ServerProcess`
    objects here describe them (URLs, log files) and are never started in this process.
    """

    def __init__(self, base_dir: Path, name: str, *, nats_nodes: int = 1) -> None:
        """`nats_nodes` > 1: a JetStream cluster of that many nodes (`self.nats_nodes`) instead of one nats-server;
        `self.nats` is then its first node and `nats_url` lists them all."""
        from tests.faults.launcher import servers_for

        self.base_dir = base_dir
        self.names = Names(name)
        self._ports = (free_port(), free_port(), free_port())
        self._node_ports = [NodePorts.free() for _ in range(nats_nodes)] if nats_nodes > 1 else []
        described = servers_for(base_dir, *self._ports, self._node_ports)
        postgres = described["postgres"]
        assert isinstance(postgres, PostgresServer)
        self.postgres = postgres
        self.nats_nodes: list[ServerProcess] = [s for kind, s in described.items() if kind.startswith("nats")]
        self.nats = self.nats_nodes[0]
        self.mongo = described["mongo"]
        self.servers: tuple[ServerProcess, ...] = (self.postgres, *self.nats_nodes, self.mongo)
        self._pids: dict[str, int] = {}
        self._launcher: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self.services: list[Service] = []

    # ---- addresses

    @property
    def dsn(self) -> str:
        return self.postgres.dsn

    @property
    def nats_url(self) -> str:
        """The NATS server's URL, or every cluster node's, comma-separated (`CQRS_NATS_URL`)."""
        return ",".join(node.url for node in self.nats_nodes)

    @property
    def mongo_url(self) -> str:
        return self.mongo.url

    # ---- servers

    async def _request(self, timeout: float, **request: Any) -> dict[str, Any]:
        assert self._launcher is not None and self._launcher.stdin and self._launcher.stdout
        async with self._lock:
            self._launcher.stdin.write((json.dumps(request) + "\n").encode())
            await self._launcher.stdin.drain()
            try:
                line = await asyncio.wait_for(self._launcher.stdout.readline(), timeout=timeout)
            except TimeoutError:
                raise AssertionError(f"server launcher did not answer {request} within {timeout}s") from None
        if not line:
            raise AssertionError(f"server launcher exited: {log_tail(self.base_dir / 'launcher.log')}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise AssertionError(f"server launcher: {request} failed: {reply.get('error')}")
        return reply

    async def start_servers(self) -> None:
        from tests.faults.launcher import encode_nats_nodes

        with (self.base_dir / "launcher.log").open("ab") as log:
            self._launcher = await asyncio.create_subprocess_exec(
                *with_parent_death_signal(
                    [
                        sys.executable,
                        "-m",
                        "tests.faults.launcher",
                        str(self.base_dir),
                        *map(str, self._ports),
                        *([encode_nats_nodes(self._node_ports)] if self._node_ports else []),
                    ],
                    signal.SIGTERM,
                ),
                cwd=REPO_ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        await self._request(180, op="start_all")
        for server in self.servers:
            self._pids[server.name] = int((await self._request(10, op="status", kind=server.name))["pid"])
        from command_service.migrate import migrate

        await migrate(self.dsn)

    async def kill_server(self, server: ServerProcess) -> None:
        """SIGKILL the server's whole process group (PostgreSQL's backends too), as an OOM kill would."""
        await self._request(20, op="kill", kind=server.name)

    async def restart_server(self, server: ServerProcess) -> float:
        """Starts the server again on its port and data; returns the seconds it took to become ready."""
        started = time.monotonic()
        reply = await self._request(70, op="start", kind=server.name)
        self._pids[server.name] = int(reply["pid"])
        return time.monotonic() - started

    def pause_server(self, server: ServerProcess) -> None:
        os.killpg(self._pids[server.name], signal.SIGSTOP)

    def resume_server(self, server: ServerProcess) -> None:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.killpg(self._pids[server.name], signal.SIGCONT)

    # ---- services

    def _log(self, stem: str) -> Path:
        return self.base_dir / f"{stem}-{len(self.services)}.log"

    def command_env(
        self, port: int, *, dsn: str | None = None, nats_url: str | None = None, **extra: str
    ) -> dict[str, str]:
        n = self.names
        return {
            "CQRS_POSTGRES_DSN": dsn or self.dsn,
            "CQRS_NATS_URL": nats_url or self.nats_url,
            "CQRS_STREAM_NAME": n.stream,
            "CQRS_SUBJECT_PREFIX": n.prefix,
            "CQRS_COMMAND_LISTEN": f"127.0.0.1:{port}",
            "CQRS_GRACE_SECONDS": "1",
            "CQRS_RELAY_POLL_SECONDS": "0.2",
            "CQRS_RELAY_BATCH_SIZE": "50",
            "CQRS_POSTGRES_TIMEOUT_SECONDS": str(POSTGRES_TIMEOUT),
            "CQRS_POSTGRES_POOL_MAX": "8",
            "CQRS_LOG_LEVEL": "INFO",
            **extra,
        }

    def projector_env(
        self, *, mongo_url: str | None = None, nats_url: str | None = None, **extra: str
    ) -> dict[str, str]:
        n = self.names
        return {
            "CQRS_NATS_URL": nats_url or self.nats_url,
            "CQRS_MONGO_URL": mongo_url or self.mongo_url,
            "CQRS_MONGO_DATABASE": n.name,
            "CQRS_MONGO_TIMEOUT_MS": str(MONGO_TIMEOUT_MS),
            "CQRS_STREAM_NAME": n.stream,
            "CQRS_SUBJECT_PREFIX": n.prefix,
            "CQRS_PROJECTOR_DURABLE": n.durable,
            "CQRS_PROJECTOR_ACK_WAIT_SECONDS": str(ACK_WAIT),
            "CQRS_PROJECTOR_BATCH_SIZE": "50",
            "CQRS_PROJECTOR_FETCH_TIMEOUT_SECONDS": "0.2",
            "CQRS_PROJECTOR_MAX_BACKOFF_SECONDS": "1",
            # Partition leases: a killed replica's partitions are taken over within about this long.
            "CQRS_PROJECTOR_LEASE_SECONDS": "3",
            "CQRS_GRACE_SECONDS": "1",
            "CQRS_LOG_LEVEL": "INFO",
            # As `make dev` and the benchmarks run it against this server: a batch's calls one after the other (the
            # in-process pipeline tests send them together, the production default).
            **MongoServer.CLIENT_ENV,
            **extra,
        }

    def query_env(self, port: int, *, mongo_url: str | None = None) -> dict[str, str]:
        return {
            "CQRS_MONGO_URL": mongo_url or self.mongo_url,
            "CQRS_MONGO_DATABASE": self.names.name,
            "CQRS_MONGO_TIMEOUT_MS": str(MONGO_TIMEOUT_MS),
            "CQRS_QUERY_LISTEN": f"127.0.0.1:{port}",
            "CQRS_GRACE_SECONDS": "1",
            "CQRS_LOG_LEVEL": "INFO",
        }

    async def command_service(
        self, *, wait: bool = True, failpoints: str | None = None, **env_overrides: Any
    ) -> Service:
        port = free_port()
        service = Service(
            "command_service",
            self.command_env(port, **env_overrides),
            self._log("command_service"),
            f"127.0.0.1:{port}",
        )
        self.services.append(service)
        await service.start(extra_env={"CQRS_FAILPOINTS": failpoints} if failpoints else None)
        if wait:
            await service.wait_serving()
        return service

    async def projector(self, *, failpoints: str | None = None, **env_overrides: Any) -> Service:
        """A projector replica with /metrics on a port of its own, once it reports SERVING."""
        metrics_port = int(env_overrides.pop("CQRS_PROJECTOR_METRICS_PORT", 0)) or free_port()
        env = self.projector_env(CQRS_PROJECTOR_METRICS_PORT=str(metrics_port), **env_overrides)
        service = Service("projector", env, self._log("projector"), metrics_port=metrics_port)
        self.services.append(service)
        await service.start(extra_env={"CQRS_FAILPOINTS": failpoints} if failpoints else None)
        await service.wait_projector_serving()
        return service

    async def query_service(self, *, wait: bool = True, **env_overrides: Any) -> Service:
        port = free_port()
        service = Service(
            "query_service", self.query_env(port, **env_overrides), self._log("query_service"), f"127.0.0.1:{port}"
        )
        self.services.append(service)
        await service.start()
        if wait:
            await service.wait_serving()
        return service

    # ---- operator commands

    async def rebuild_and_cut_over(self, timeout: float) -> dict[str, Any]:
        """`cqrs rebuild --cutover` as an operator runs it, while the system runs: a new generation of the read
        model built from PostgreSQL, caught up, compared on a sample with the live one, and the projectors switched
        to it. Returns its `--json` result; fails the scenario unless it switched within `timeout`.

        No `--accept-differences`: the comparison must find the two equal under the load and the faults, as the
        deployment Job needs it to (each load client keeps one customer busy: its statistics and the day's report
        are hot keys, settled on their own sources). The audit at the end checks the generation switched to
        against every event in PostgreSQL."""
        args = ["--cutover", "--sample", "200"]
        result = await self._rebuild(args, timeout, "cqrs rebuild --cutover")
        assert result.get("cutover"), f"cqrs rebuild --cutover did not switch: {result}"
        return result

    async def activate(self, generation: int, timeout: float) -> dict[str, Any]:
        """`cqrs rebuild --activate <generation>` while the system runs: a rollback to a retired generation (the
        event store replayed into it, then the same switch). Returns its `--json` result (the switch)."""
        return await self._rebuild(["--activate", str(generation)], timeout, f"cqrs rebuild --activate {generation}")

    async def _rebuild(self, args: list[str], timeout: float, what: str) -> dict[str, Any]:
        """Runs `cqrs rebuild` (`python -m cqrsctl.main`, a subprocess, its log beside the scenario's) with `--json`;
        returns its result, or fails the scenario unless it exits 0 within `timeout`."""
        log_path = self.base_dir / f"rebuild-{int(time.time() * 1000)}.log"
        env = {
            **os.environ,
            "CQRS_POSTGRES_DSN": self.dsn,
            "CQRS_MONGO_URL": self.mongo_url,
            "CQRS_MONGO_DATABASE": self.names.name,
            "CQRS_LOG_LEVEL": "INFO",
        }
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cqrsctl.main", "rebuild", *args, "--no-progress", "--json", cwd=REPO_ROOT,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
            try:
                out, _ = await asyncio.wait_for(process.communicate(), timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise AssertionError(f"{what} did not end within {timeout:.0f}s: {log_tail(log_path)}") from None
        if process.returncode != 0:  # 1: documents differ, listed in its output
            raise AssertionError(f"{what} exited {process.returncode}: {out.decode()[:4000]}\n{log_tail(log_path)}")
        result: dict[str, Any] = json.loads(out)
        return result

    # ---- teardown

    async def close(self) -> None:
        """SIGKILL everything: the scenario is over and its data is thrown away (a clean stop only costs time)."""
        for server in self.servers:  # a stopped process still dies of SIGKILL, but resume anyway for the logs
            self.resume_server(server)
        await asyncio.gather(*(s.kill() for s in self.services), return_exceptions=True)
        launcher = self._launcher
        if launcher is not None and launcher.returncode is None:
            with contextlib.suppress(AssertionError, OSError):
                await self._request(30, op="kill_all")
            assert launcher.stdin is not None
            launcher.stdin.close()  # EOF: the launcher exits
            try:
                await asyncio.wait_for(launcher.wait(), timeout=30)
            except TimeoutError:
                launcher.kill()
                await launcher.wait()

    def diagnostics(self) -> str:
        """The tail of every log, for a failing scenario's report."""
        parts = []
        for service in self.services:
            parts.append(f"--- {service.log_path.name} (rc={service.returncode})\n{service.tail(2500)}")
        for server in self.servers:
            parts.append(f"--- {server.log_path}\n{log_tail(server.log_path, 1200)}")
        return "\n".join(parts)


# --------------------------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Ack:
    """A command that got OK: where the reply says its event is."""

    rpc: str
    request_id: str
    stream_id: str
    version: int


@dataclass(frozen=True)
class Failure:
    rpc: str
    request_id: str
    code: grpc.StatusCode
    details: str
    seconds: float  # how long the call took
    at: float  # time.monotonic() when it ended
    address: str  # the command_service replica it was sent to


@dataclass(frozen=True)
class Stopping:
    """A command_service replica being stopped gracefully, from the signal to its exit (time.monotonic())."""

    address: str
    since: float
    until: float

    def cancelled(self, failure: Failure) -> bool:
        """Whether `failure` is a CANCELLED this stop explains (see STOP_CANCEL_MARGIN_SECONDS)."""
        return (
            failure.code == grpc.StatusCode.CANCELLED
            and failure.address == self.address
            and self.since <= failure.at <= self.until + STOP_CANCEL_MARGIN_SECONDS
        )


@dataclass
class Load:
    """Concurrent clients issuing RegisterCustomer / CreateOrder / AddOrderItem / PlaceOrder / CancelOrder.

    Each client works on its own customer and orders (no write conflicts between clients), never retries a call
    (a failed call is recorded and its order abandoned, since the command may or may not have been applied), and
    paces itself a little so that the load stays modest on two cores.
    """

    addresses: Sequence[str]
    workers: int = 4
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))
    pause: float = 0.02
    acks: list[Ack] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    stops: list[Stopping] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._worker(i), name=f"load-{i}") for i in range(self.workers)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=RPC_TIMEOUT + 5)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # a bug in the load itself
        assert not pending, f"{len(pending)} load workers did not stop within {RPC_TIMEOUT + 5}s"

    async def progress(self, count: int, *, timeout: float = 30.0, what: str = "") -> None:
        """Waits until `count` more commands got OK (proof that the system accepts commands right now)."""
        target = len(self.acks) + count
        await wait_until(
            lambda: _now(len(self.acks) >= target, f"{len(self.acks)}/{target} acked; {self.failure_summary()}"),
            what=f"{count} more acknowledged commands{' ' + what if what else ''}",
            timeout=timeout,
            interval=0.05,
        )

    def failure_summary(self) -> str:
        counts = Counter(f.code.name for f in self.failures)
        return ", ".join(f"{code}: {n}" for code, n in sorted(counts.items())) or "no failures"

    def failures_since(self, since: float) -> list[Failure]:
        return [f for f in self.failures if f.at >= since]

    async def stop_gracefully(self, service: Service, timeout: float) -> None:
        """`service.stop_gracefully`, recorded so that the CANCELLED calls of its stop count as retryable."""
        since = time.monotonic()
        try:
            await service.stop_gracefully(timeout)
        finally:
            self.stops.append(Stopping(service.address, since, time.monotonic()))

    async def _worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        address = self.addresses[index % len(self.addresses)]
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            orders = command_service_pb2_grpc.OrderCommandServiceStub(channel)
            customers = customer_service_pb2_grpc.CustomerCommandServiceStub(channel)
            customer_id: str | None = None
            while not self._stop.is_set():
                if customer_id is None:
                    rid = _rid()
                    reply = await self._call(
                        address,
                        "RegisterCustomer",
                        rid,
                        customers.RegisterCustomer(
                            customer_service_pb2.RegisterCustomerRequest(
                                request_id=rid, name=f"Fault client {index}", email=f"{rid}@example.com"
                            ),
                            timeout=RPC_TIMEOUT,
                        ),
                    )
                    if reply is not None:
                        customer_id = reply.result.customer_id
                        self._ack("RegisterCustomer", rid, reply.result.customer_id, reply.result.version)
                    continue
                await self._order_lifecycle(address, orders, customer_id, rng)

    async def _order_lifecycle(
        self,
        address: str,
        stub: command_service_pb2_grpc.OrderCommandServiceAsyncStub,
        customer_id: str,
        rng: random.Random,
    ) -> None:
        rid = _rid()
        created = await self._call(
            address,
            "CreateOrder",
            rid,
            stub.CreateOrder(
                command_service_pb2.CreateOrderRequest(
                    request_id=rid, customer_id=customer_id, currency="EUR", shipping_address=ADDRESS
                ),
                timeout=RPC_TIMEOUT,
            ),
        )
        if created is None:
            return
        order_id = created.result.order_id
        self._ack("CreateOrder", rid, order_id, created.result.version)
        for line in range(rng.randint(1, 3)):
            if self._stop.is_set():
                return
            rid = _rid()
            added = await self._call(
                address,
                "AddOrderItem",
                rid,
                stub.AddOrderItem(
                    command_service_pb2.AddOrderItemRequest(
                        request_id=rid, order_id=order_id, sku=f"SKU-{line}", name=f"Item {line}",
                        quantity=rng.randint(1, 4), unit_price_minor=rng.randint(100, 5000),
                    ),
                    timeout=RPC_TIMEOUT,
                ),
            )  # fmt: skip
            if added is None:
                return
            self._ack("AddOrderItem", rid, order_id, added.result.version)
        steps = ["PlaceOrder"] if rng.random() < 0.7 else ["CancelOrder"]
        if steps == ["PlaceOrder"] and rng.random() < 0.3:
            steps.append("CancelOrder")
        for step in steps:
            if self._stop.is_set():
                return
            rid = _rid()
            call: Awaitable[Any]
            if step == "PlaceOrder":
                call = stub.PlaceOrder(
                    command_service_pb2.PlaceOrderRequest(request_id=rid, order_id=order_id), timeout=RPC_TIMEOUT
                )
            else:
                call = stub.CancelOrder(
                    command_service_pb2.CancelOrderRequest(request_id=rid, order_id=order_id, reason="fault test"),
                    timeout=RPC_TIMEOUT,
                )
            reply = await self._call(address, step, rid, call)
            if reply is None:
                return
            self._ack(step, rid, order_id, reply.result.version)

    def _ack(self, rpc: str, rid: str, stream_id: str, version: int) -> None:
        self.acks.append(Ack(rpc, rid, stream_id, int(version)))

    async def _call(self, address: str, rpc: str, rid: str, call: Awaitable[Any]) -> Any:
        started = time.monotonic()
        try:
            reply = await call
        except grpc.aio.AioRpcError as exc:
            now = time.monotonic()
            self.failures.append(Failure(rpc, rid, exc.code(), exc.details() or "", now - started, now, address))
            await asyncio.sleep(0.1)  # pacing after a failure: no hot loop against a server that is down
            return None
        if self.pause:
            await asyncio.sleep(self.pause)
        return reply


def _rid() -> str:
    return str(uuid.uuid4())


async def _now(done: bool, detail: str) -> tuple[bool, str]:
    return done, detail


# --------------------------------------------------------------------------------------------- quiescence


async def pg_scalar(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await conn.fetchval(sql, *args, timeout=5)
    finally:
        await conn.close()


async def outbox_rows(dsn: str) -> int:
    return int(await pg_scalar(dsn, "SELECT count(*) FROM outbox"))


async def wait_outbox_empty(dsn: str, *, stall: float = QUIESCE_TIMEOUT, limit: float = QUIESCE_LIMIT) -> float:
    async def probe() -> tuple[int, str]:
        rows = await outbox_rows(dsn)
        return rows, f"{rows} outbox rows left"

    what = "the outbox to drain (every event published and acked)"
    return await wait_drained(probe, what=what, stall=stall, limit=limit)


async def wait_outbox_older_than_drained(dsn: str, since_wallclock: float, *, timeout: float, what: str) -> float:
    """Waits until no outbox row enqueued before `since_wallclock` (epoch seconds) is left: the relay publishes."""

    async def probe() -> tuple[bool, str]:
        rows = int(
            await pg_scalar(dsn, "SELECT count(*) FROM outbox WHERE enqueued_at < to_timestamp($1)", since_wallclock)
        )
        total = await outbox_rows(dsn)
        return rows == 0, f"{rows} rows from before still in the outbox ({total} in all)"

    return await wait_until(probe, what=what, timeout=timeout, interval=0.2)


async def stream_versions(dsn: str) -> dict[tuple[str, str], int]:
    """(stream_type, stream_id) -> the stream's last version in the event store."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT stream_type, stream_id, max(version) AS v FROM events GROUP BY 1, 2", timeout=10
        )
    finally:
        await conn.close()
    return {(r["stream_type"], r["stream_id"]): int(r["v"]) for r in rows}


_COLLECTIONS = {ORDER_STREAM_TYPE: "orders", CUSTOMER_STREAM_TYPE: "customers"}


def _collection_names() -> dict[str, str]:
    """stream type -> read-model collection, from the projection registry when it can be imported."""
    try:
        from core.projections.customers import CUSTOMERS
        from core.projections.orders import ORDERS

        return {ORDERS.stream_type: ORDERS.collection, CUSTOMERS.stream_type: CUSTOMERS.collection}
    except ImportError:  # pragma: no cover - the registry moved; the names are the documented ones
        return dict(_COLLECTIONS)


async def active_database_name(mongo_url: str, base: str) -> str:
    """The database of the read model's active generation (`base` until a cutover records another)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_url, serverSelectionTimeoutMS=3000, timeoutMS=10000
    )
    try:
        active = await read_active(client[base])
        return base if active is None else active.database
    finally:
        await client.close()


async def read_model_versions(mongo_url: str, database: str) -> dict[tuple[str, str], int]:
    """(stream_type, stream_id) -> `version` of its read-model document."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_url, serverSelectionTimeoutMS=3000, timeoutMS=10000
    )
    try:
        versions: dict[tuple[str, str], int] = {}
        for stream_type, collection in _collection_names().items():
            async for doc in client[database][collection].find({}, {"version": 1}):
                versions[(stream_type, str(doc["_id"]))] = int(doc.get("version", 0))
        return versions
    finally:
        await client.close()


async def checkpoint_versions(mongo_url: str, database: str) -> tuple[dict[str, int], int]:
    """stream_id -> the version its checkpoint says every view reflects; and how many streams are parked."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_url, serverSelectionTimeoutMS=3000, timeoutMS=10000
    )
    try:
        versions: dict[str, int] = {}
        parked = 0
        async for doc in client[database][CHECKPOINTS_COLLECTION].find({}, {"version": 1, "parked.kind": 1}):
            versions[str(doc["_id"])] = int(doc.get("version", 0))
            parked += 1 if doc.get("parked") else 0
        return versions, parked
    finally:
        await client.close()


def checkpoint_lag(expected: dict[tuple[str, str], int], checkpoints: dict[str, int]) -> list[str]:
    """Every stream whose checkpoint is not at its last version in the event store."""
    return [
        f"{stream_type} {stream_id}: event store v{version}, checkpoint v{checkpoints.get(stream_id, 0)}"
        for (stream_type, stream_id), version in sorted(expected.items())
        if checkpoints.get(stream_id, 0) != version
    ]


def read_model_lag(expected: dict[tuple[str, str], int], actual: dict[tuple[str, str], int]) -> list[str]:
    """Every stream whose document is missing, behind, ahead, or has no stream in the event store."""
    problems = []
    for key, version in sorted(expected.items()):
        have = actual.get(key)
        if have != version:
            problems.append(
                f"{key[0]} {key[1]}: event store v{version}, read model {'missing' if have is None else f'v{have}'}"
            )
    for key in sorted(set(actual) - set(expected)):
        problems.append(f"{key[0]} {key[1]}: document v{actual[key]} without events in the event store")
    return problems


async def wait_read_model_caught_up(
    stack: FaultStack, *, stall: float = QUIESCE_TIMEOUT, limit: float = QUIESCE_LIMIT, report_every: float = 15.0
) -> float:
    async def probe() -> tuple[int, str]:
        expected = await stream_versions(stack.dsn)
        database = await active_database_name(stack.mongo_url, stack.names.name)  # after a cutover: the new one
        actual = await read_model_versions(stack.mongo_url, database)
        # The checkpoints too: a projector killed between a batch's documents and its checkpoints leaves them
        # behind until its unacked messages are redelivered (after the ack wait).
        checkpoints, parked = await checkpoint_versions(stack.mongo_url, database)
        problems = read_model_lag(expected, actual) + checkpoint_lag(expected, checkpoints)
        # Progress is counted in events, not streams: a stream many events behind differs until the last of them.
        behind = sum(abs(version - actual.get(key, 0)) + abs(version - checkpoints.get(key[1], 0))
                     for key, version in expected.items())  # fmt: skip
        left = max(behind, 1) if problems else 0
        differ = f"{len(problems)} of {len(expected)} streams differ ({behind} versions apart, {parked} parked)"
        return left, f"{differ}, e.g. {problems[:3]}"

    what = "the read model (MongoDB: documents and checkpoints) to reach every stream's last version"
    # The probe reads every document and checkpoint: after a long soak (~20,000 streams) the local MongoDB-wire
    # server spent most of its CPU serving it, and the projectors' catch-up crawled (tens of events a second).
    return await wait_drained(
        probe, what=what, stall=stall, limit=limit, report_every=report_every, max_duty=READ_MODEL_PROBE_DUTY
    )


async def wait_quiescent(stack: FaultStack) -> None:
    """Outbox empty, then every read-model document and checkpoint at its stream's last version (each waited for
    as long as it keeps moving: `wait_drained`)."""
    outbox = await wait_outbox_empty(stack.dsn)
    read_model = await wait_read_model_caught_up(stack)
    print(f"quiescent: outbox drained in {outbox:.1f}s, read model caught up {read_model:.1f}s later")


# --------------------------------------------------------------------------------------------- assertions


async def assert_acked_commands_stored(dsn: str, acks: Sequence[Ack]) -> None:
    """(a) Every command that got OK is in the request log and its event is at the replied (stream, version)."""
    assert acks, "the scenario acknowledged no command at all: the load never ran"
    rids = [a.request_id for a in acks]
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        logged = {
            r["request_id"]: r["stream_id"]
            for r in await conn.fetch("SELECT request_id, stream_id FROM request_log WHERE request_id = ANY($1)", rids)
        }
        events = {
            (r["stream_id"], r["version"]): r["rid"]
            for r in await conn.fetch(
                """SELECT e.stream_id, e.version, e.metadata->>'request_id' AS rid
                     FROM events e JOIN unnest($1::text[], $2::int[]) AS k(sid, v)
                       ON e.stream_id = k.sid AND e.version = k.v""",
                [a.stream_id for a in acks],
                [a.version for a in acks],
            )
        }
    finally:
        await conn.close()
    lost = []
    for ack in acks:
        problems = []
        if logged.get(ack.request_id) != ack.stream_id:
            problems.append(f"request log: {logged.get(ack.request_id, 'missing')!r}")
        event_rid = events.get((ack.stream_id, ack.version))
        if event_rid != ack.request_id:
            problems.append(f"event at v{ack.version}: {'missing' if event_rid is None else f'request {event_rid}'}")
        if problems:
            lost.append(f"{ack.rpc} {ack.request_id} -> {ack.stream_id} v{ack.version}: {'; '.join(problems)}")
    assert not lost, f"{len(lost)} of {len(acks)} acknowledged commands are not in the event store: {lost[:5]}"


def assert_failures_retryable(load: Load) -> None:
    """(b) Failed commands got only UNAVAILABLE / ABORTED, or CANCELLED from a replica being stopped (`Load.stops`):
    never INTERNAL/UNKNOWN, never a hang past the deadline."""
    bad = [f for f in load.failures if f.code not in RETRYABLE and not any(s.cancelled(f) for s in load.stops)]
    if bad:
        examples = [f"{f.rpc}: {f.code.name} after {f.seconds:.1f}s: {f.details[:200]}" for f in bad[:5]]
        raise AssertionError(
            f"{len(bad)} of {len(load.failures)} failed commands got a non-retryable status "
            f"({Counter(f.code.name for f in bad)}); e.g. {examples}"
        )


async def assert_audit_clean(
    *,
    postgres_dsn: str,
    nats_url: str,
    mongo_url: str,
    mongo_database: str,
    stream_name: str,
    subject_prefix: str | None = None,
    settle_seconds: float = 2.0,
) -> None:
    """(c) The end-to-end audit (`cqrs verify`, i.e. `cqrsctl.verify.run_verify`) finds nothing.

    First a narrow check of our own that needs nothing but the two databases (every order/customer document in
    MongoDB is at its PostgreSQL stream's max version and every stream has its document), then the real audit. Both
    read the active generation of `mongo_database` (the base database; after a cutover, the generation switched to).
    """
    expected = await stream_versions(postgres_dsn)
    actual = await read_model_versions(mongo_url, await active_database_name(mongo_url, mongo_database))
    problems = read_model_lag(expected, actual)
    assert not problems, f"audit (versions): {len(problems)} streams differ: {problems[:10]}"
    config = VerifyConfig(
        postgres_dsn=postgres_dsn,
        nats_url=nats_url,
        mongo_url=mongo_url,
        mongo_database=mongo_database,
        stream_name=stream_name,
        settle_seconds=settle_seconds,
        subject_prefix=SUBJECT_PREFIX if subject_prefix is None else subject_prefix,
    )
    try:
        result = await run_verify(config)
    except Exception as exc:  # reported as what it is: the audit tool failed, not the scenario
        raise AssertionError(
            f"cqrs verify itself failed (bug in cqrsctl/verify?): {exc!r}; the version check before it had passed"
        ) from exc
    findings = list(result.findings)
    assert result.clean, f"cqrs verify found {len(findings)} problems: {[str(f) for f in findings[:10]]}"


async def assert_stack_clean(stack: FaultStack, acks: Sequence[Ack]) -> None:
    """Quiescence, then (a) for these acknowledged commands and (c) on the scenario's own servers."""
    await wait_quiescent(stack)
    await assert_acked_commands_stored(stack.dsn, acks)
    n = stack.names
    await assert_audit_clean(
        postgres_dsn=stack.dsn, nats_url=stack.nats_url, mongo_url=stack.mongo_url, mongo_database=n.name,
        stream_name=n.stream, subject_prefix=n.prefix,
    )  # fmt: skip


async def assert_scenario_clean(stack: FaultStack, load: Load) -> None:
    """Quiescence, then (a), (b) and (c), with the load's seed in every failure message."""
    try:
        assert_failures_retryable(load)
        await assert_stack_clean(stack, load.acks)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n[load seed {load.seed}: {len(load.acks)} acked, failures: {load.failure_summary()}]"
        ) from None


# --------------------------------------------------------------------------------------------- query side


async def get_order_status(address: str, order_id: str, timeout: float = RPC_TIMEOUT) -> tuple[str, float]:
    """Calls GetOrder; returns (status code name, seconds taken)."""
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        try:
            await query_service_pb2_grpc.OrderQueryServiceStub(channel).GetOrder(
                query_service_pb2.GetOrderRequest(order_id=order_id), timeout=timeout
            )
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
    return code, time.monotonic() - started


def failpoint_in_source(name: str, package: str) -> bool:
    """True when some module of `package` calls `failpoint("<name>")` (another engineer may not have added it)."""
    needle = f'failpoint("{name}")'
    return any(needle in path.read_text(errors="replace") for path in (REPO_ROOT / package).rglob("*.py"))
