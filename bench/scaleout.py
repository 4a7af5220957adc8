"""Scale-out figures of `make bench`: the projector with 1, 2 and 4 partition owners, and the command path with 1
and 2 command_service replicas, each beside the single-owner (single-replica) figure of the same run.

Projector: every run consumes the whole stream through a durable of its own (each partition consumer starts at the
first message), so every run has the same input, and writes into a MongoDB-wire server of its own (fresh data, a
new port, stopped afterwards). That server is started only once the run's K projectors are up and waiting for it:
all K then start together, and their interpreters' start-up is in neither the time nor the CPU. A run ends when
every partition consumer of its durable exists and has nothing pending or un-acked; its time includes the replicas
agreeing on who owns which partition, as a scale-out does.

Command path: closed-loop order lifecycles (`bench.system.generate_orders`) against one replica, then, split over
both addresses, against two; the second is a standby for the relay lease (`command_service.relay_lease`), so one
replica relays the outbox of both. A run ends when the outbox is empty, so its CPU includes the relaying.

Both run while the stack's own projector is stopped (`projector_stopped`): nothing else competes. On 2 shared cores
another replica adds no CPU, so each run records, per process group, CPU seconds per 1,000 operations and the cores
it kept busy, and how busy the whole machine was: the table shows where the limit is rather than only a rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import asyncpg
import nats

from bench import cpu
from bench.report import Row, cost_row, versus_row
from bench.stack import SERVER_START_TIMEOUT, BenchStack, StackError
from bench.system import generate_orders, outbox_empty
from command_service.relay_lease import RELAY_LOCK_KEY
from core.jetstream import stream_partitions
from core.subjects import DEFAULT_STREAM_NAME
from localservers import LOOPBACK, MongoServer, ServiceProcess, free_port, stop_services
from projector.consumer import STRAYS, group_consumers, partition_durable

SECTION: Final = "scale-out"
OWNERS: Final = (1, 2, 4)
REPLICAS: Final = (1, 2)
PROJECTORS: Final = "projectors"
COMMAND_SERVICES: Final = "command_services"
# Group name -> label in rows and the table.
LABELS: Final = {
    PROJECTORS: "projectors (summed)",
    COMMAND_SERVICES: "command services (summed)",
    "mongo": "MongoDB-wire server",
    "postgres": "PostgreSQL",
    "nats": "nats-server",
    cpu.CLIENT: "client (bench process)",
}
PROJECTOR_GROUPS: Final = (PROJECTORS, "mongo", "nats")
COMMAND_GROUPS: Final = (COMMAND_SERVICES, "postgres", "nats", cpu.CLIENT)
# The runs' projectors renew leases every third of this: owners agree on the partitions within ~2 s of starting
# (the default 10 s would put up to ~7 s of rebalancing into a catch-up of a few seconds).
LEASE_SECONDS: Final = 3.0
# While they wait for their MongoDB-wire server, the projectors retry at least this often.
MONGO_BACKOFF_SECONDS: Final = 0.5
POLL_SECONDS: Final = 0.1  # consumer info polls (each lists the stream's consumers: nats-server CPU, in the run)
# `generate_orders` registers this many customers (one command each) before its clock starts.
CUSTOMERS_PER_GENERATOR: Final = 8
# The stream is topped up to this many events (whatever earlier steps wrote counts) before the projector runs.
MIN_EVENTS: Final = 5000
QUICK_MIN_EVENTS: Final = 500
SATURATED: Final = 0.9  # a machine busy on this share of its CPUs has none to give another replica


# ------------------------------------------------------------------------------------------------ measuring


def machine_ticks(stat: str | None = None) -> tuple[int, int]:
    """(busy, total) clock ticks of all CPUs together from /proc/stat's `cpu` line (idle and iowait are not busy)."""
    text = Path("/proc/stat").read_text() if stat is None else stat
    line = next(row for row in text.splitlines() if row.startswith("cpu "))
    ticks = [int(v) for v in line.split()[1:9]]  # user nice system idle iowait irq softirq steal
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def busy_cores(before: tuple[int, int], after: tuple[int, int], cpus: int) -> float | None:
    """How many of `cpus` were busy on average between two `machine_ticks` readings."""
    busy, total = after[0] - before[0], after[1] - before[1]
    return None if total <= 0 else cpus * busy / total


@dataclass
class Window:
    """`cpu.CpuWindow` of some process groups plus how busy the whole machine was (other engineers' runs too)."""

    groups: Mapping[str, Sequence[int]]
    client: bool = False
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    _cpu: cpu.CpuWindow = field(init=False)
    _machine: tuple[int, int] = (0, 0)
    _busy: float | None = None

    def __post_init__(self) -> None:
        self._cpu = cpu.CpuWindow(self.groups, self.client)

    def start(self) -> None:
        self._machine = machine_ticks()
        self._cpu.start()

    def stop(self) -> None:
        self._cpu.stop()
        self._busy = busy_cores(self._machine, machine_ticks(), self.cpus)

    def figures(self, operations: int, unit: str) -> dict[str, Any]:
        return {**self._cpu.figures(operations, unit), "machine_busy_cores": self._busy, "cpus": self.cpus}


@contextlib.contextmanager
def projector_stopped(stack: BenchStack) -> Iterator[None]:
    """The stack's projector stopped for the block (it would compete for the cores), started again after it."""
    was_running = stack.services["projector"].running
    stack.stop_service("projector")
    try:
        yield
    finally:
        if was_running:
            try:
                stack.start_service("projector")
            except StackError as exc:
                print(f"[bench] the projector did not start again: {exc}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ projector


def group_names(durable: str, partitions: int) -> set[str]:
    """The consumers a projector group of `durable` has once every partition is owned (the shared one without)."""
    if partitions <= 0:
        return {partition_durable(durable, None)}
    return {partition_durable(durable, p) for p in [*range(partitions), STRAYS]}


def backlog_left(counts: Mapping[str, tuple[int, int]], expected: set[str]) -> str | None:
    """What is left of a group's catch-up, from each consumer's (pending, ack pending); None once it is done."""
    missing = sorted(expected - set(counts))
    pending = sum(p for p, _ in counts.values())
    ack_pending = sum(a for _, a in counts.values())
    if not missing and pending == 0 and ack_pending == 0:
        return None
    return f"{len(missing)} consumers not created yet, {pending} pending, {ack_pending} un-acked"


async def stream_facts(nats_url: str) -> tuple[int, int]:
    """(messages, partitions) of the event stream."""
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        info = await nc.jetstream().stream_info(DEFAULT_STREAM_NAME)
        return int(info.state.messages), stream_partitions(info.config)
    finally:
        await nc.close()


async def wait_caught_up(nats_url: str, durable: str, partitions: int, timeout: float) -> float:
    """Seconds until every consumer of `durable`'s group exists and has nothing pending or un-acked."""
    expected = group_names(durable, partitions)
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        js = nc.jetstream()
        began = time.monotonic()
        while True:
            infos = await group_consumers(js, DEFAULT_STREAM_NAME, durable)
            left = backlog_left({i.name: (int(i.num_pending or 0), int(i.num_ack_pending or 0)) for i in infos},
                                expected)  # fmt: skip
            elapsed = time.monotonic() - began
            if left is None:
                return elapsed
            if elapsed > timeout:
                raise TimeoutError(f"{durable} did not catch up within {timeout:.0f}s: {left}")
            await asyncio.sleep(POLL_SECONDS)
    finally:
        await nc.close()


async def delete_group(nats_url: str, durable: str) -> None:
    """Removes a finished run's consumers (later runs' polls list fewer, nats-server tracks fewer)."""
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        js = nc.jetstream()
        for info in await group_consumers(js, DEFAULT_STREAM_NAME, durable):
            await js.delete_consumer(DEFAULT_STREAM_NAME, info.name)
    finally:
        await nc.close()


async def fill_stream(stack: BenchStack, min_events: int, seconds: float, callers: int) -> int:
    """Generates orders (at most `seconds`) while the stream holds fewer than `min_events` messages, then waits until
    the relay has published everything; returns the events generated."""
    held, _ = await stream_facts(stack.nats.url)
    events = 0
    if held < min_events:
        events, _ = await generate_orders(stack.command_addr, seconds, max_events=min_events - held, callers=callers)
    await outbox_empty(stack.postgres.dsn, timeout=120)
    return events


def owners_run(stack: BenchStack, owners: int, events: int, partitions: int, timeout: float) -> dict[str, Any]:
    """K projectors (a new durable) catch up the whole stream into a fresh MongoDB-wire server."""
    tag = f"k{owners}-{uuid.uuid4().hex[:6]}"
    durable = f"bench-scaleout-{tag}"
    folder = stack.workdir / f"scaleout-{tag}"
    mongo = MongoServer(folder / "mongo", free_port())
    ports = [free_port() for _ in range(owners)]
    projectors = [
        ServiceProcess(f"projector-{i}", "projector", listen=f"{LOOPBACK}:{port}",
                       log_path=folder / f"projector-{i}.log")
        for i, port in enumerate(ports)
    ]  # fmt: skip
    env = stack.service_env()
    env.update({"CQRS_MONGO_URL": mongo.url, "CQRS_PROJECTOR_DURABLE": durable,
                "CQRS_PROJECTOR_LEASE_SECONDS": f"{LEASE_SECONDS:g}",
                "CQRS_PROJECTOR_MAX_BACKOFF_SECONDS": f"{MONGO_BACKOFF_SECONDS:g}"})  # fmt: skip
    marks = [time.monotonic()]  # spawned, projectors ready, MongoDB-wire server ready, caught up, stopped
    try:
        for projector, port in zip(projectors, ports, strict=True):
            projector.start({**env, "CQRS_PROJECTOR_METRICS_PORT": str(port)})
        for projector in projectors:
            projector.wait_ready()  # /metrics listens: imported and started, waiting for MongoDB
        marks.append(time.monotonic())
        mongo.start(timeout=SERVER_START_TIMEOUT)
        marks.append(time.monotonic())
        assert mongo.pid is not None and stack.nats.pid is not None
        pids = tuple(p.pid for p in projectors if p.pid is not None)
        window = Window({PROJECTORS: pids, "mongo": (mongo.pid,), "nats": (stack.nats.pid,)})
        window.start()
        seconds = asyncio.run(wait_caught_up(stack.nats.url, durable, partitions, timeout))
        window.stop()
        marks.append(time.monotonic())
        dead = [f"{p.name} exited {p.returncode}:\n{p.tail()}" for p in projectors if not p.running]
        if dead:
            raise RuntimeError("; ".join(dead))
    finally:
        stop_services(projectors)  # first: they leave their leases in a server that still answers (fast)
        mongo.stop()
        with contextlib.suppress(Exception):
            asyncio.run(delete_group(stack.nats.url, durable))
    marks.append(time.monotonic())
    return {"owners": owners, "operations": events, "seconds": seconds, "rate": events / max(seconds, 1e-3),
            "cpu": window.figures(events, "events"), "overhead_s": overhead(marks)}  # fmt: skip


def overhead(marks: Sequence[float]) -> dict[str, float]:
    """The parts of a projector run besides the catch-up itself (seconds), from its time marks."""
    names = ("projectors_start", "mongo_start", "catch_up", "stop")
    return {name: round(b - a, 2) for name, a, b in zip(names, marks, marks[1:], strict=False)}


def projector_scaleout(
    stack: BenchStack, quick: bool, seconds: float, callers: int, owners: Sequence[int] = OWNERS
) -> dict[str, Any]:
    """The catch-up of the whole stream by 1, 2, 4 partition owners, each against a MongoDB-wire server of its own,
    after topping the stream up to a few thousand events (a few hundred when `quick`) with at most 3 x `seconds` of
    orders; run with the stack's projector stopped."""
    min_events = QUICK_MIN_EVENTS if quick else MIN_EVENTS
    generated = asyncio.run(fill_stream(stack, min_events, 3 * seconds, callers))
    events, partitions = asyncio.run(stream_facts(stack.nats.url))
    if events <= 0:
        raise RuntimeError("the event stream is empty")
    timeout = max(60.0, events / 50)
    runs = [owners_run(stack, k, events, partitions, timeout) for k in owners]
    return {"events": events, "partitions": partitions, "generated": generated, "runs": runs}


# ------------------------------------------------------------------------------------------------ commands


def split(callers: int, parts: int) -> list[int]:
    """`callers` spread over `parts` addresses as evenly as they go."""
    count, extra = divmod(callers, parts)
    return [count + (1 if i < extra else 0) for i in range(parts)]


async def generate_split(addresses: Sequence[str], seconds: float, callers: int) -> tuple[int, float]:
    """Closed-loop order lifecycles with the callers split over `addresses`; (events, seconds)."""
    shares = zip(addresses, split(callers, len(addresses)), strict=True)
    results = await asyncio.gather(*(generate_orders(a, seconds, max_events=10**8, callers=n) for a, n in shares))
    return sum(events for events, _ in results), max(elapsed for _, elapsed in results)


async def relay_lease_holders(dsn: str) -> int:
    """Sessions holding the relay's advisory lock (1 when exactly one replica relays)."""
    conn = await asyncpg.connect(dsn)
    try:
        count = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND classid = $1::bigint::oid "
            "AND objid = $2::bigint::oid AND objsubid = 1",
            RELAY_LOCK_KEY >> 32,
            RELAY_LOCK_KEY & 0xFFFFFFFF,
        )
        return int(count)
    finally:
        await conn.close()


def replicas_run(stack: BenchStack, services: Sequence[ServiceProcess], seconds: float, callers: int) -> dict[str, Any]:
    """One closed-loop run over the `services`' addresses, measured until the outbox is empty."""
    addresses = [s.listen for s in services if s.listen is not None]
    assert stack.postgres.pid is not None and stack.nats.pid is not None
    window = Window({COMMAND_SERVICES: tuple(s.pid for s in services if s.pid is not None),
                     "postgres": (stack.postgres.pid,), "nats": (stack.nats.pid,)}, client=True)  # fmt: skip
    window.start()
    events, elapsed = asyncio.run(generate_split(addresses, seconds, callers))
    asyncio.run(outbox_empty(stack.postgres.dsn, timeout=120))
    window.stop()
    commands = events + CUSTOMERS_PER_GENERATOR * len(addresses)  # the customers registered are commands too
    return {"replicas": len(services), "operations": events, "seconds": elapsed, "rate": events / max(elapsed, 1e-3),
            "cpu": window.figures(commands, "commands")}  # fmt: skip


def command_scaleout(stack: BenchStack, seconds: float, callers: int) -> dict[str, Any]:
    """Closed-loop command throughput, `seconds` per run, with the stack's command_service alone, then beside a second
    replica (same environment, its own listen address and metrics port); run with the stack's projector stopped."""
    warmup_seconds = min(2.0, seconds / 2)
    first = stack.services["command_service"]
    one = replicas_run(stack, [first], seconds, callers)
    second = ServiceProcess("command_service_2", "command_service", listen=f"{LOOPBACK}:{free_port()}",
                            log_path=stack.workdir / "command_service_2.log")  # fmt: skip
    try:
        assert second.listen is not None
        second.start({**stack.service_env(), "CQRS_COMMAND_LISTEN": second.listen})
        second.wait_ready()
        # Warm-up (not measured): the new replica's pools, caches and first-use imports.
        asyncio.run(generate_split([second.listen], warmup_seconds, max(1, callers // 4)))
        asyncio.run(outbox_empty(stack.postgres.dsn, timeout=120))
        two = replicas_run(stack, [first, second], seconds, callers)
        holders = asyncio.run(relay_lease_holders(stack.postgres.dsn))
        if not second.running:
            raise RuntimeError(f"the second command_service exited {second.returncode}:\n{second.tail()}")
    finally:
        second.stop()
    if holders > 1:
        raise RuntimeError(f"{holders} sessions hold the relay lease: more than one replica relays")
    return {"callers": callers, "relay_lease_holders": holders, "runs": [one, two]}


# ------------------------------------------------------------------------------------------------ the rows


def cores(figure: Mapping[str, Any] | None) -> dict[str, float]:
    """Cores each measured group kept busy on average (CPU seconds per second of the run)."""
    if not figure or not float(figure.get("window_s") or 0):
        return {}
    window = float(figure["window_s"])
    return {name: spent / window for name, spent in figure["cpu_s"].items() if spent is not None}


def bottleneck(figure: Mapping[str, Any] | None) -> str:
    """Where a run's limit is, from its numbers: the busiest process group and how busy the whole machine was."""
    used = cores(figure)
    if not figure or not used:
        return ""
    name, top = max(used.items(), key=lambda item: item[1])
    text = f"busiest: {LABELS.get(name, name)} at {top:.2f} cores"
    busy, cpus = figure.get("machine_busy_cores"), figure.get("cpus")
    if busy is not None and cpus:
        text += f"; machine {busy:.2f} of {cpus} cores busy"
        if busy >= SATURATED * cpus:
            text += " (saturated)"
    return text


def _runs(figures: Mapping[str, Any], key: str, by: str) -> dict[int, Mapping[str, Any]]:
    entry = figures.get(key)
    runs = entry.get("runs") if isinstance(entry, Mapping) else None
    return {int(run[by]): run for run in runs or []}


def _scaling_rows(runs: Mapping[int, Mapping[str, Any]], counts: Sequence[int], what: str, unit: str,
                  ops: str, groups: Sequence[str], who: str) -> list[Row]:  # fmt: skip
    """A rate row per count of `who` (the first count's beside none, the others beside it) whose note says where
    the limit was, then each group's CPU per 1,000 `ops` per count."""
    first = counts[0]
    base = runs.get(first) or {}
    base_name = f"{first} {_plural(who, first)}"
    rows = []
    for n in counts:
        run = runs.get(n) or {}
        note = f"{int(run['operations']):,} {ops} in {float(run['seconds']):.1f}s; {bottleneck(run.get('cpu'))}" \
            if run else ""  # fmt: skip
        baseline = ("", None) if n == first else (base_name, base.get("rate"))
        rows.append(versus_row(SECTION, what.format(n=n, who=_plural(who, n)), run.get("rate"), unit, *baseline,
                               note=note))  # fmt: skip
    for n in counts:
        figure = (runs.get(n) or {}).get("cpu")
        for group in groups:
            name = f"CPU per 1,000 {ops} with {n} {_plural(who, n)}: {LABELS[group]}"
            baseline = ("", None) if n == first else (base_name, cpu.cost(base.get("cpu"), group))
            rows.append(cost_row(SECTION, name, cpu.cost(figure, group), cpu.UNIT, *baseline, cpu.UNIT))
    return rows


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def rows(figures: Mapping[str, Any]) -> list[Row]:
    """The scale-out rows: throughput with 1, 2, 4 projector owners and 1, 2 command_service replicas, each beside
    the single one's, and every process group's CPU per 1,000 operations in each run."""
    return [
        *_scaling_rows(_runs(figures, "scaleout_projector", "owners"), OWNERS,
                       "projector catch-up with {n} partition {who} (whole stream, fresh MongoDB-wire server)",
                       "events/s", "events", PROJECTOR_GROUPS, "owner"),
        *_scaling_rows(_runs(figures, "scaleout_commands", "replicas"), REPLICAS,
                       "command throughput, closed loop, {n} command_service {who} (load split, one relays)",
                       "cmds/s", "commands", COMMAND_GROUPS, "replica"),
    ]  # fmt: skip


def render_table(figures: Mapping[str, Any]) -> str:
    """Per run: CPU seconds per 1,000 operations of each group, with the cores it kept busy in brackets."""
    columns = [PROJECTORS, COMMAND_SERVICES, "mongo", "postgres", "nats", cpu.CLIENT]
    lines = [
        "Scale-out runs: CPU seconds per 1,000 operations of each process group (in brackets: the cores it kept "
        "busy, CPU seconds per second of the run); machine: cores busy with anything (/proc/stat), neighbours "
        "included.",
        "",
        "| run | operations | seconds | rate | " + " | ".join(LABELS[c] for c in columns) + " | machine busy |",
        "|---|---:|---:|---:|" + "---:|" * (len(columns) + 1),
    ]
    for key, by, who in (("scaleout_projector", "owners", "owner"), ("scaleout_commands", "replicas", "replica")):
        for n, run in sorted(_runs(figures, key, by).items()):
            figure = run.get("cpu") or {}
            used = cores(figure)
            cells = [
                "" if c not in figure.get("cpu_s", {}) else f"{cpu.cost(figure, c) or 0:.3g} ({used.get(c, 0):.2f})"
                for c in columns
            ]
            busy = figure.get("machine_busy_cores")
            lines.append(
                f"| {n} {_plural(who, n)} | {int(figure.get('operations', 0)):,} | {float(run['seconds']):.1f} | "
                f"{float(run['rate']):,.0f}/s | " + " | ".join(cells) + f" | {'' if busy is None else f'{busy:.2f}'} |"
            )
    return "\n".join(lines) + "\n"
