"""Measurements of the running system: `cqrs load` runs (a subprocess, its JSON report parsed), the projector's
catch-up rate, and a small order generator used to build a projector backlog."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import nats
from cqrs.orders.v1 import command_service_pb2 as cpb
from cqrs.orders.v1 import command_service_pb2_grpc as cgrpc
from cqrs.orders.v1 import customer_service_pb2 as custpb
from cqrs.orders.v1 import customer_service_pb2_grpc as custgrpc
from cqrs.orders.v1 import order_pb2
from nats.js import JetStreamContext

from bench import cpu
from core.subjects import DEFAULT_STREAM_NAME
from projector.consumer import group_consumers

COMMAND_MIX = "create=1,add=3,change=1,place=1"
QUERY_MIX = "get=1,list=1"
# The time-to-queryable steps' load (issue 12: "with queries running at the same time"): the command mix and as
# many queries, half GetOrder (orders the run created) and half ListOrders; the command weights sum to 6.
COMMANDS_WITH_QUERIES_MIX = f"{COMMAND_MIX},get=3,list=3"
QUERIES_PER_COMMAND = 1.0
P99_LIMIT_MS = 25.0
PROJECTOR_DURABLE = "orders-projector"


def with_queries(command_rate: float) -> tuple[float, str]:
    """The open-loop rate and mix that send `command_rate` commands a second and as many queries beside them."""
    return command_rate * (1 + QUERIES_PER_COMMAND), COMMANDS_WITH_QUERIES_MIX


class LoadError(RuntimeError):
    """`cqrs load` is missing, failed, or wrote no readable report."""


def load_command() -> list[str]:
    """How to run `cqrs load` with this interpreter (the console script's module, so no PATH is needed)."""
    return [sys.executable, "-m", "cqrsctl.main", "load"]


def load_available() -> bool:
    result = subprocess.run([*load_command(), "--help"], capture_output=True, timeout=60, check=False)
    return result.returncode == 0


def run_load(
    command_addr: str,
    query_addr: str,
    *,
    mode: str,
    duration: float,
    workers: int,
    mix: str,
    rate: float | None = None,
    concurrency: int | None = None,
    ttq_sample: float | None = None,
    log: Path | None = None,
    cpu_pids: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Any]:
    """Runs `cqrs load` once and returns its JSON report; with `cpu_pids` (name -> PIDs of local processes) the
    report's `cpu` section holds what each of them and the load generator used while the load ran."""
    with tempfile.TemporaryDirectory(prefix="cqrs-load-") as out:
        args = [
            *load_command(),
            "--command-addr", command_addr,
            "--query-addr", query_addr,
            "--mode", mode,
            "--duration", f"{duration:g}",
            "--workers", str(workers),
            "--mix", mix,
            "--out", out,
            "--no-charts",
            "--quiet",
        ]  # fmt: skip
        if rate is not None:
            args += ["--rate", f"{rate:.0f}"]
        if concurrency is not None:
            args += ["--concurrency", str(concurrency)]
        if ttq_sample is not None:
            args += ["--ttq-sample", f"{ttq_sample:g}"]
        if cpu_pids:
            args += ["--cpu-pids", ",".join(f"{name}={pid}" for name, pids in cpu_pids.items() for pid in pids)]
        try:
            result = subprocess.run(args, capture_output=True, timeout=duration + 120, check=False)
        except subprocess.TimeoutExpired as exc:
            raise LoadError(f"`{' '.join(args[2:])}` did not finish within {duration + 120:.0f}s") from exc
        if log is not None:
            with log.open("ab") as f:
                f.write(f"\n=== {' '.join(args[2:])} -> exit {result.returncode}\n".encode())
                f.write(result.stdout[-4000:] + result.stderr[-4000:])
        report = _find_report(Path(out))
        if report is None:
            tail = (result.stderr or result.stdout).decode(errors="replace")[-1500:]
            raise LoadError(f"`cqrs load` exited {result.returncode} without a JSON report: {tail}")
        return report


def _find_report(out: Path) -> dict[str, Any] | None:
    for path in sorted(out.rglob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "totals" in data:
            return data
    return None


def _num(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


@dataclass
class Step:
    rate: float
    achieved: float
    p99_ms: float
    errors: int
    count: int
    dropped: int
    ok: bool
    why: str = ""
    cpu: dict[str, Any] | None = None  # bench.cpu figure of the step, per command


def judge_step(rate: float, report: dict[str, Any]) -> Step:
    """Did this open-loop step sustain `rate` with p99 <= 25 ms and (almost) no errors or dropped arrivals?"""
    commands = report.get("commands", {})
    count = int(commands.get("count", 0) or 0)
    errors = int(sum((commands.get("errors_by_code") or {}).values()))
    achieved = _num(commands.get("throughput_rps"))
    p99 = _num((commands.get("latency_ms") or {}).get("p99"))
    dropped = int((report.get("totals") or {}).get("dropped", 0) or 0)
    reasons = []
    if not p99 <= P99_LIMIT_MS:
        reasons.append(f"p99 {p99:.1f} ms > {P99_LIMIT_MS:g}")
    if count == 0 or errors > max(1, 0.001 * count):
        reasons.append(f"{errors} errors of {count}")
    if not achieved >= 0.95 * rate:
        reasons.append(f"achieved {achieved:.0f}/s < 95% of {rate:.0f}/s")
    if dropped > 0.01 * max(1, count):
        reasons.append(f"{dropped} dropped")
    step_cpu = cpu.from_load_report(report, "commands", "commands")
    return Step(rate, achieved, p99, errors, count, dropped, not reasons, "; ".join(reasons), step_cpu)


@dataclass
class RateSearch:
    best: Step | None = None
    steps: list[Step] = field(default_factory=list)


def search_command_rate(
    command_addr: str,
    query_addr: str,
    *,
    step_seconds: float,
    workers: int,
    start_rate: float,
    max_steps: int,
    refine_steps: int,
    log: Path | None = None,
    cpu_pids: Callable[[], Mapping[str, Sequence[int]]] | None = None,
) -> RateSearch:
    """x1.5 open-loop steps up to the first failure, then `refine_steps` bisections (geometric) in between.

    A failing step is run once more and counts as a failure only if it fails again: on a shared 2-core machine a
    single stall of another process decides the p99 of a few hundred samples. `cpu_pids` gives the processes whose
    CPU each step records.
    """
    search = RateSearch()

    def run(rate: float) -> bool:
        for _attempt in range(2):
            # Commands only: time-to-queryable probes are queries, measured in a run of their own.
            report = run_load(command_addr, query_addr, mode="open", rate=rate, duration=step_seconds,
                              workers=workers, mix=COMMAND_MIX, ttq_sample=0.0, log=log,
                              cpu_pids=cpu_pids() if cpu_pids else None)  # fmt: skip
            step = judge_step(rate, report)
            search.steps.append(step)
            if step.ok:
                if search.best is None or step.achieved > search.best.achieved:
                    search.best = step
                return True
        return False

    rate = start_rate
    failed: float | None = None
    for _ in range(max_steps):
        if not run(rate):
            failed = rate
            break
        rate *= 1.5
    if search.best is None:
        # Even the first rate failed: step down until one passes (bounded), then bisect upwards from there.
        for _ in range(3):
            rate /= 2
            if run(rate):
                break
            failed = rate
    if search.best is not None and failed is not None:
        low, high = search.best.rate, failed
        for _ in range(refine_steps):
            middle = math.sqrt(low * high)
            if run(middle):
                low = middle
            else:
                high = middle
    return search


# ---------------------------------------------------------------------------------------------- order generator

ADDRESS = order_pb2.Address(recipient="Ada Lovelace", line1="12 Analytical St", city="London",
                            postal_code="N1 9GU", country="GB")  # fmt: skip


async def generate_orders(command_addr: str, duration: float, max_events: int, callers: int = 32) -> tuple[int, float]:
    """Runs order lifecycles (create, 3 adds, change, place: 6 commands, 6 events) from `callers` tasks in a
    closed loop; returns (events, seconds)."""
    async with grpc.aio.insecure_channel(command_addr) as channel:
        customers = custgrpc.CustomerCommandServiceStub(channel)
        orders = cgrpc.OrderCommandServiceStub(channel)
        customer_ids = []
        for i in range(8):
            reply = await customers.RegisterCustomer(
                custpb.RegisterCustomerRequest(request_id=str(uuid.uuid4()), name=f"Bench Customer {i}",
                                               email=f"bench-{uuid.uuid4().hex[:12]}@example.com"),
                timeout=10,
            )  # fmt: skip
            customer_ids.append(reply.result.customer_id)
        events = 0
        deadline = time.monotonic() + duration

        def rid() -> str:
            return str(uuid.uuid4())

        async def lifecycle(k: int) -> None:
            nonlocal events
            n = 0
            while time.monotonic() < deadline and events < max_events:
                created = await orders.CreateOrder(
                    cpb.CreateOrderRequest(request_id=rid(), customer_id=customer_ids[(k + n) % len(customer_ids)],
                                           currency="EUR", shipping_address=ADDRESS), timeout=10)  # fmt: skip
                order_id = created.result.order_id
                for s in range(3):
                    await orders.AddOrderItem(
                        cpb.AddOrderItemRequest(request_id=rid(), order_id=order_id, sku=f"SKU-{s}",
                                                name="A thing worth buying", quantity=1 + s, unit_price_minor=1999),
                        timeout=10,
                    )  # fmt: skip
                await orders.ChangeItemQuantity(
                    cpb.ChangeItemQuantityRequest(request_id=rid(), order_id=order_id, sku="SKU-0", quantity=5),
                    timeout=10,
                )
                await orders.PlaceOrder(cpb.PlaceOrderRequest(request_id=rid(), order_id=order_id), timeout=10)
                events += 6
                n += 1

        started = time.monotonic()
        await asyncio.gather(*(lifecycle(k) for k in range(callers)))
        return events, time.monotonic() - started


# ---------------------------------------------------------------------------------------------- projector


async def outbox_empty(dsn: str, timeout: float) -> None:
    """Waits until the relay has published (and deleted) every outbox row."""
    conn = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + timeout
        while True:
            left = await conn.fetchval("SELECT count(*) FROM outbox")
            if left == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the outbox still holds {left} rows after {timeout:.0f}s")
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def group_backlog(js: JetStreamContext) -> tuple[int, int]:
    """(num_pending, num_ack_pending) summed over the projector's durable consumers (one per partition)."""
    infos = await group_consumers(js, DEFAULT_STREAM_NAME, PROJECTOR_DURABLE)
    return sum(int(i.num_pending or 0) for i in infos), sum(int(i.num_ack_pending or 0) for i in infos)


async def consumer_backlog(nats_url: str) -> tuple[int, int]:
    """(num_pending, num_ack_pending) of the projector's durable consumers."""
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        return await group_backlog(nc.jetstream())
    finally:
        await nc.close()


def wait_projected(nats_url: str, timeout: float) -> tuple[int, float]:
    """Waits until the projector's consumers have nothing pending or un-acked, so that a measurement does not pay
    (in projector and MongoDB CPU, in time-to-queryable) for the backlog an earlier one left. Returns the backlog
    found (pending + un-acked events) and the seconds it took; raises TimeoutError."""
    started = time.monotonic()
    found: int | None = None
    while True:
        pending, ack_pending = asyncio.run(consumer_backlog(nats_url))
        found = pending + ack_pending if found is None else found
        if pending == 0 and ack_pending == 0:
            return found, time.monotonic() - started
        if time.monotonic() - started > timeout:
            raise TimeoutError(f"the projector did not catch up within {timeout:.0f}s (pending {pending})")
        time.sleep(0.5)


async def time_drain(nats_url: str, backlog: int, timeout: float, on_start: Callable[[], None] | None = None) -> float:
    """Seconds from the projector's first delivery until the consumer has nothing pending or un-acked; `on_start`
    is called when the first delivery is seen (to start measuring CPU then, after the projector's start-up)."""
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        js = nc.jetstream()
        started: float | None = None
        deadline = time.monotonic() + timeout
        while True:
            pending, ack_pending = await group_backlog(js)
            now = time.monotonic()
            if started is None and (pending < backlog or ack_pending > 0):
                started = now
                if on_start is not None:
                    on_start()
            if started is not None and pending == 0 and ack_pending == 0:
                return max(now - started, 1e-3)
            if now > deadline:
                raise TimeoutError(
                    f"projector did not drain {backlog} events within {timeout:.0f}s "
                    f"(pending {pending}, ack pending {ack_pending})"
                )
            await asyncio.sleep(0.02)
    finally:
        await nc.close()
