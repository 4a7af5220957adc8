"""Building blocks of the fault-injection scenarios. Here: the shared timeouts, bounded waits, and one service
subprocess (`Service`); `stack` starts the dedicated servers and services, `load` drives gRPC load, `audit` waits
for quiescence and makes the end-of-scenario assertions.

Every scenario follows the same shape: start dedicated servers and the services as real subprocesses (`python -m
...`, configured by environment only), run load through the gRPC API recording every reply, inject the fault, heal
it, wait for quiescence (outbox empty, read model and checkpoints caught up; bounded polling that says what it
waited for), then check that (a) every command that got OK is in the event store at the version it was told, (b)
failed commands got only retryable statuses (UNAVAILABLE / ABORTED, and CANCELLED from a replica being stopped),
never INTERNAL/UNKNOWN or a hang past the deadline, (c) the end-to-end audit is clean.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import asyncpg
import grpc
from cqrs.orders.v1 import (
    order_pb2,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cqrsctl.status import metrics_text
from cqrsctl.status import parse as parse_metrics
from localservers import (
    ServiceProcess,
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
