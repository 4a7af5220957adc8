"""CPU cost in `make bench`: the processes measured, CPU windows around the baselines, and the rows built from them.

Wall-clock ratios on a shared 2-core machine swing with the neighbours; the CPU a process spends per operation
does not (much). Every measurement records a `cpu` figure: the operations it made and the CPU seconds each
process (with its descendants, from /proc: `cqrsctl.load.procstat`) used meanwhile. `client` is whoever made the
calls: the load generator (`cqrs load` and its worker processes, which it measures itself), the echo client
processes, or this process for the raw PostgreSQL/NATS/MongoDB loops (`time.process_time()`: nothing else runs
in it then).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from bench.report import Row, cost_row
from bench.stack import BenchStack
from cqrsctl.load import procstat
from cqrsctl.load.cpu import SELF, per_thousand

SECTION: Final = "CPU cost"
UNIT: Final = "s/1k"  # CPU seconds per 1,000 operations (= CPU ms per operation)
CLIENT: Final = "client"
ECHO_SERVER: Final = "echo_server"
# Table columns: process name in the figures -> heading.
COLUMNS: Final = {
    "command_service": "command_service",
    "projector": "projector",
    "query_service": "query_service",
    "postgres": "PostgreSQL",
    "nats": "nats-server",
    "mongo": "MongoDB-wire",
    ECHO_SERVER: "echo server",
    CLIENT: "client",
}
# Cost targets of issue 12 (ratios in one run; lower is better).
COMMAND_VS_ECHO: Final = 3.0
PROJECTOR_VS_UPSERT: Final = 2.0
QUERY_VS_ECHO: Final = 2.0


def stack_groups(stack: BenchStack) -> dict[str, tuple[int, ...]]:
    """The running servers and services of the stack, by the names of COLUMNS."""
    processes = [*stack.services.values(), stack.postgres, stack.nats, stack.mongo]
    return {p.name: (p.pid,) for p in processes if p.running and p.pid is not None}


@dataclass
class CpuWindow:
    """The CPU seconds of some process groups (and of this process, as `client`) from `start()` to `stop()`."""

    groups: Mapping[str, Sequence[int]]
    client: bool = True
    window_s: float = 0.0
    cpu_s: dict[str, float | None] = field(default_factory=dict)
    _before: procstat.Snapshot | None = None
    _process_time: float = 0.0

    def start(self) -> None:
        self._before = procstat.snapshot(self.groups)
        self._process_time = time.process_time()

    def stop(self) -> None:
        spent = time.process_time() - self._process_time
        after = procstat.snapshot(self.groups)
        if self._before is None:
            raise RuntimeError("CpuWindow.stop() before start()")
        self.window_s = after.at - self._before.at
        self.cpu_s = procstat.used(self._before, after)
        if self.client:
            self.cpu_s[CLIENT] = spent

    def figures(self, operations: int, unit: str) -> dict[str, Any]:
        """The `cpu` figure of a measurement that made `operations` `unit`."""
        return {"operations": operations, "unit": unit, "window_s": round(self.window_s, 3), "cpu_s": self.cpu_s}


@contextlib.contextmanager
def window(groups: Mapping[str, Sequence[int]], *, client: bool = True) -> Iterator[CpuWindow]:
    """Measures the block: the groups from /proc and, with `client`, this process (all its threads)."""
    measured = CpuWindow(groups, client)
    measured.start()
    yield measured
    measured.stop()


def from_load_report(report: Mapping[str, Any], kind: str, unit: str) -> dict[str, Any] | None:
    """The `cpu` figure of a `cqrs load` run (run with --cpu-pids), per `kind` (commands, queries, requests)."""
    section = report.get("cpu")
    if not section:
        return None
    cpu_s = {CLIENT if name == SELF else name: entry["cpu_s"] for name, entry in section["processes"].items()}
    return {"operations": section["operations"][kind], "unit": unit, "window_s": section["window_s"], "cpu_s": cpu_s}


def cost(figure: Mapping[str, Any] | None, process: str) -> float | None:
    """CPU seconds `process` spent per 1,000 operations of a `cpu` figure (None when not measured)."""
    if not figure:
        return None
    return per_thousand(figure["cpu_s"].get(process), int(figure["operations"]))


# ------------------------------------------------------------------------------------------------ the figures


def _dig(figures: Mapping[str, Any], *path: str) -> Any:
    value: Any = figures
    for part in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def measurements(figures: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any] | None]]:
    """Every `cpu` figure of a run, named as in the CPU table, baselines first."""
    best = _dig(figures, "commands", "best") or {}
    rate = f" at {best['achieved']:.0f} cmds/s" if best.get("achieved") else ""
    ttq_rate = _dig(figures, "ttq", "rate")
    return [
        ("gRPC echo (per RPC)", _dig(figures, "echo", "cpu")),
        *(
            (f"gRPC echo, open loop{_echo_rate(figures, step)} (per RPC)", _dig(figures, "echo_at_rates", step, "cpu"))
            for step in ("commands", "queries")
        ),
        ("raw single-row commits (per commit)", _dig(figures, "pg_single", "cpu")),
        ("raw JetStream publishes (per message)", _dig(figures, "nats", "cpu")),
        ("raw JetStream consumer (per message)", _dig(figures, "nats_consume", "cpu")),
        ("raw MongoDB bulk upserts (per upsert)", _dig(figures, "mongo", "cpu_upsert")),
        ("raw MongoDB find_one (per find)", _dig(figures, "mongo", "cpu_find")),
        (f"system: sustained commands{rate} (per command)", best.get("cpu")),
        *(
            (
                f"system: commands, as many queries and time-to-queryable probes{_at(rate)} (per command)",
                _dig(figures, step, "cpu"),
            )
            for step, rate in (("ttq_fixed", _dig(figures, "ttq_fixed", "rate")), ("ttq", ttq_rate))
        ),
        ("system: projector catch-up (per event)", _dig(figures, "projector", "cpu")),
        ("system: queries, closed loop (per query)", _dig(figures, "queries", "cpu")),
    ]


def _at(rate: float | None) -> str:
    return f" at {rate:.0f} cmds/s" if rate else ""


def _echo_rate(figures: Mapping[str, Any], step: str) -> str:
    """ " at N req/s": the rate of the echo run matched to `step` (commands, queries), or nothing."""
    rate = _dig(figures, "echo_at_rates", step, "qps")
    return f" at {rate:,.0f} req/s" if rate else ""


def render_table(figures: Mapping[str, Any]) -> str:
    """The per-process table: CPU seconds per 1,000 operations of each process in each measurement."""
    lines = [
        "CPU seconds per 1,000 operations (= CPU ms per operation) of each process, user + system time from /proc "
        "(each process with its descendants: all of PostgreSQL's backends, `cqrs load`'s worker processes). "
        "`client`: the load generator, the echo client processes, or the bench process for the raw loops.",
        "",
        "| measurement | operations | seconds | " + " | ".join(COLUMNS.values()) + " |",
        "|---|---:|---:|" + "---:|" * len(COLUMNS),
    ]
    for name, figure in measurements(figures):
        if not figure:
            lines.append(f"| {name} | not measured | |" + " |" * len(COLUMNS))
            continue
        cells = []
        for process in COLUMNS:
            value = cost(figure, process)
            cells.append("" if process not in figure["cpu_s"] else "n/a" if value is None else f"{value:.3g}")
        lines.append(
            f"| {name} | {figure['operations']:,} | {float(figure['window_s']):.1f} | " + " | ".join(cells) + " |"
        )
    return "\n".join(lines) + "\n"


def budget_rows(figures: Mapping[str, Any], goal_of_echo: float) -> list[Row]:
    """What the machine's CPUs allow at the sustained step's cost: every process's CPU per command summed (the load
    generator too: it shares the cores), and the command rate at which that would fill every CPU, beside the goal
    (`goal_of_echo` x the echo closed loop). A ceiling below the goal says the goal needs a lower cost, not a
    shorter tail: no latency tuning reaches a rate the CPUs cannot serve. The cost per command falls a little as
    the rate rises (batches fill), so the ceiling is an estimate from below."""
    best = _dig(figures, "commands", "best") or {}
    commands = best.get("cpu")
    cpus = figures.get("cpus")
    costs = [cost(commands, process) for process in (commands or {}).get("cpu_s", {})]
    total = None if not costs or None in costs else sum(c for c in costs if c is not None)
    echo_qps = _dig(figures, "echo", "qps")
    goal = goal_of_echo * float(echo_qps) if echo_qps else None
    ceiling = cpus * 1000.0 / total if cpus and total else None
    at = f" at {best['achieved']:.0f} cmds/s" if best.get("achieved") else ""
    note = ""
    if goal and cpus:
        note = (
            f"{goal_of_echo:g}x echo = {goal:,.0f} cmds/s would need at most {cpus * 1000.0 / goal:.3g} CPU s per "
            f"1,000 commands on {cpus} CPUs"
        )
    return [
        cost_row(SECTION, f"every process together CPU per 1,000 commands{at} (services, servers, load generator)",
                 total, UNIT),
        Row(SECTION, f"command rate {cpus or '?'} CPUs allow at that cost (their whole time / CPU per command)",
            ceiling, "cmds/s", f"{goal_of_echo:g}x echo", goal, None if ceiling is None or not goal else ceiling / goal,
            note=note, baseline_unit="cmds/s"),
    ]  # fmt: skip


def cost_rows(figures: Mapping[str, Any]) -> list[Row]:
    """The main table's CPU rows: the same-run baselines, then each process's cost beside its baseline, with the
    issue's targets where there is one (lower is better)."""
    echo = _dig(figures, "echo", "cpu")
    commits = _dig(figures, "pg_single", "cpu")
    publishes = _dig(figures, "nats", "cpu")
    upserts = _dig(figures, "mongo", "cpu_upsert")
    consumed = _dig(figures, "nats_consume", "cpu")
    best = _dig(figures, "commands", "best") or {}
    commands = best.get("cpu")
    projector = _dig(figures, "projector", "cpu")
    queries = _dig(figures, "queries", "cpu")
    echo_server = cost(echo, ECHO_SERVER)
    # The echo server at the rate each service step ran at: the like-for-like baseline (see bench.echo).
    echo_at_commands = cost(_dig(figures, "echo_at_rates", "commands", "cpu"), ECHO_SERVER)
    echo_at_queries = cost(_dig(figures, "echo_at_rates", "queries", "cpu"), ECHO_SERVER)
    upsert_client = cost(upserts, CLIENT)
    consumer_client = cost(consumed, CLIENT)
    # What any projector on these drivers pays per event before doing anything of its own: receive and ack the
    # message, write one document (bench.raw). No target: the is against the bulk-upsert client alone.
    receive_and_write = None if consumer_client is None or upsert_client is None else consumer_client + upsert_client
    s, u = SECTION, UNIT

    def note(figure: Mapping[str, Any] | None, what: str) -> str:
        return f"{int(figure['operations']):,} {what} in {float(figure['window_s']):.1f}s" if figure else ""

    at = f" at {best['achieved']:.0f} cmds/s" if best.get("achieved") else ""
    return [
        cost_row(s, "gRPC echo server CPU per 1,000 RPCs (the echo run above)", echo_server, u,
                 note=note(echo, "RPCs")),
        cost_row(s, "gRPC echo client CPU per 1,000 RPCs", cost(echo, CLIENT), u),
        cost_row(s, f"gRPC echo server CPU per 1,000 RPCs, open loop{_echo_rate(figures, 'commands')} (the "
                 "sustained command rate)", echo_at_commands, u),
        cost_row(s, f"gRPC echo server CPU per 1,000 RPCs, open loop{_echo_rate(figures, 'queries')} (the query "
                 "rate)", echo_at_queries, u),
        cost_row(s, "raw bulk-upsert client CPU per 1,000 upserts", upsert_client, u,
                 note=note(upserts, "upserts")),
        cost_row(s, "MongoDB-wire server CPU per 1,000 raw bulk upserts", cost(upserts, "mongo"), u),
        cost_row(s, "raw JetStream consumer client CPU per 1,000 messages (fetch 200, an ack each)", consumer_client,
                 u, note=note(consumed, "messages")),
        cost_row(s, "nats-server CPU per 1,000 raw consumed messages", cost(consumed, "nats"), u),
        cost_row(s, "raw commit loop client CPU per 1,000 commits", cost(commits, CLIENT), u,
                 note=note(commits, "commits")),
        cost_row(s, "PostgreSQL CPU per 1,000 raw commits", cost(commits, "postgres"), u),
        cost_row(s, "nats-server CPU per 1,000 raw publishes", cost(publishes, "nats"), u),
        cost_row(s, f"command_service CPU per 1,000 commands{at}", cost(commands, "command_service"), u,
                 "echo server", echo_server, u, at_most=COMMAND_VS_ECHO, note=note(commands, "commands")),
        cost_row(s, f"command_service CPU per 1,000 commands{at}, beside the echo server at that rate",
                 cost(commands, "command_service"), u, "echo at that rate", echo_at_commands, u,
                 at_most=COMMAND_VS_ECHO),
        cost_row(s, "projector CPU per 1,000 events (catch-up)", cost(projector, "projector"), u,
                 "bulk-upsert client", upsert_client, u, at_most=PROJECTOR_VS_UPSERT, note=note(projector, "events")),
        cost_row(s, "projector CPU per 1,000 events (catch-up), beside receiving an event and upserting a document",
                 cost(projector, "projector"), u, "raw consumer + bulk-upsert clients", receive_and_write, u),
        cost_row(s, "query_service CPU per 1,000 queries (closed loop, probes included)",
                 cost(queries, "query_service"), u, "echo server", echo_server, u, at_most=QUERY_VS_ECHO,
                 note=note(queries, "queries")),
        cost_row(s, "query_service CPU per 1,000 queries, beside the echo server at the query rate",
                 cost(queries, "query_service"), u, "echo at that rate", echo_at_queries, u, at_most=QUERY_VS_ECHO),
        cost_row(s, f"PostgreSQL CPU per 1,000 commands{at}", cost(commands, "postgres"), u,
                 "per raw commit", cost(commits, "postgres"), u),
        cost_row(s, f"nats-server CPU per 1,000 commands{at}", cost(commands, "nats"), u,
                 "per raw publish", cost(publishes, "nats"), u),
        cost_row(s, f"MongoDB-wire server CPU per 1,000 commands{at} (the projector's writes)",
                 cost(commands, "mongo"), u, "per raw upsert", cost(upserts, "mongo"), u),
        cost_row(s, f"load generator CPU per 1,000 commands{at} (cqrs load, its workers)", cost(commands, CLIENT),
                 u, "echo client", cost(echo, CLIENT), u),
    ]  # fmt: skip
