"""`python -m bench.setting_ab`: what one setting or one change of code costs in CPU per command, A against B.

Starts the local stack once (`bench.stack.BenchStack`), then for each round restarts the services with variant A's
environment and with variant B's, in the order A B B A ... so that drift of the shared machine cancels, and runs the
same open-loop `cqrs load` against each (a fixed command rate: the same work per second in both). It prints each
run's CPU milliseconds per command of every process (from /proc, `--cpu-pids`) and the command p50/p99, then the
medians and the ratios B / A, and beside them the command service's PostgreSQL calls per command (`postgres_calls`,
counted from its dependency metrics, the first replica's: noise does not move it) and the projector's mean time to
apply a batch (`apply_ms`, its `apply` stage). `--replicas N` runs N command_service replicas and sends each command
to the next one in turn (round robin per request, the worst case for anything a replica keeps between commands).

Examples: the command service's stream cache, off against on; then this tree against a baseline tree (the services
of each variant run from its tree: `git worktree add /tmp/baseline HEAD~1`):

    python -m bench.setting_ab --a CQRS_STREAM_CACHE_SIZE=0 --b CQRS_STREAM_CACHE_SIZE=10000
    python -m bench.setting_ab --a CQRS_STREAM_CACHE_SIZE=0 --b CQRS_STREAM_CACHE_SIZE=10000 --replicas 2
    python -m bench.setting_ab --a-tree /tmp/baseline
    python -m bench.setting_ab --a-tree /tmp/baseline --queries
    python -m bench.setting_ab --a-tree /tmp/baseline --rate 40 --ttq 0.2

Each run starts once the projector has applied what earlier runs wrote. Costs that grow with the data (the day's
sales facts, each customer's orders) still make later runs slower whatever the variant; `--fresh` starts every run
on a new, empty stack instead (about 15 s more per run), which removes that drift:

    python -m bench.setting_ab --a-tree /tmp/baseline --rate 40 --ttq 0.2 --fresh
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from bench import stages
from bench.cpu import stack_groups
from bench.stack import BenchStack
from bench.system import COMMAND_MIX, run_load, wait_projected, with_queries
from cqrsctl.status import metrics_text
from localservers import LOOPBACK, ServiceProcess, free_port

HERE = Path(__file__).resolve().parent.parent
QUERY_MIX = "get=1,list=1,create=0.05"
DRAIN_TIMEOUT_SECONDS = 300.0


def variant(assignments: list[str]) -> dict[str, str]:
    env = {}
    for assignment in assignments:
        name, sep, value = assignment.partition("=")
        if not sep or not name:
            raise SystemExit(f"not NAME=VALUE: {assignment!r}")
        env[name] = value
    return env


def restart_services(stack: BenchStack, env: Mapping[str, str], tree: Path) -> None:
    for name, service in stack.services.items():
        stack.stop_service(name)
        service.cwd = tree  # `python -m <service>` imports the packages of the directory it starts in
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)  # BenchStack.service_env() starts from os.environ
    try:
        stack.start_services()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def start_replicas(stack: BenchStack, count: int, env: Mapping[str, str], tree: Path) -> list[ServiceProcess]:
    """`count` more command_service replicas beside the stack's, each on its own address."""
    replicas = []
    for n in range(2, count + 2):
        listen = f"{LOOPBACK}:{free_port()}"
        replica = ServiceProcess(f"command_service_{n}", "command_service", listen=listen,
                                 log_path=stack.workdir / f"command_service_{n}.log", cwd=tree)  # fmt: skip
        replicas.append(replica)
        replica.start({**stack.service_env(), **env, "CQRS_COMMAND_LISTEN": listen})
        replica.wait_ready()
    return replicas


def measure(stack: BenchStack, args: argparse.Namespace, replicas: list[ServiceProcess]) -> dict[str, float]:
    groups = stack_groups(stack)
    groups["command_service"] = (*groups["command_service"], *(r.pid for r in replicas if r.pid is not None))
    command_addr = ",".join([stack.command_addr, *(r.listen for r in replicas if r.listen is not None)])
    calls_before, applies_before = postgres_calls(stack), projector_applies(stack)
    if args.queries:  # a closed loop of reads over orders the same run writes now and then
        report = run_load(
            command_addr, stack.query_addr, mode="closed", concurrency=args.concurrency,
            duration=args.seconds, workers=args.workers, mix=args.mix or QUERY_MIX, cpu_pids=groups,
        )  # fmt: skip
    else:  # a fixed command rate: the same work per second in both variants
        # --with-queries: the load of make bench's time-to-queryable steps, as many queries as commands beside them.
        rate, mix = with_queries(args.rate) if args.with_queries else (args.rate, args.mix or COMMAND_MIX)
        report = run_load(
            command_addr, stack.query_addr, mode="open", rate=rate, duration=args.seconds,
            workers=args.workers, mix=mix, ttq_sample=args.ttq, cpu_pids=groups,
        )  # fmt: skip
    kind = "queries" if args.queries else "commands"
    operations = report["cpu"]["operations"][kind]
    row = {
        name: 1000 * entry["cpu_s"] / operations
        for name, entry in report["cpu"]["processes"].items()
        if operations and entry.get("cpu_s") is not None
    }
    latency = report[kind]["latency_ms"]
    row["p50_ms"], row["p99_ms"] = float(latency["p50"]), float(latency["p99"])
    row["errors"] = float(report["totals"]["errors"])
    row["postgres_calls"] = (postgres_calls(stack) - calls_before) / operations if operations else 0.0
    batches, seconds = (after - before for after, before in zip(projector_applies(stack), applies_before, strict=True))
    if batches and not args.queries:
        row["apply_ms"] = 1000 * seconds / batches
    ttq = report.get("time_to_queryable_ms") or {}
    if args.ttq and ttq.get("count"):
        row["ttq_p50_ms"], row["ttq_p99_ms"] = float(ttq["p50"]), float(ttq["p99"])
    return row


def postgres_calls(stack: BenchStack) -> float:
    """PostgreSQL calls the (first) command service made so far: the counts of its dependency histogram."""
    families = text_string_to_metric_families(metrics_text(stack.metrics_url("command_service"), 5.0))
    return sum(
        sample.value
        for family in families
        if family.name == "cqrs_dependency_call_seconds"
        for sample in family.samples
        if sample.name.endswith("_count") and sample.labels.get("dependency") == "postgres"
    )


def projector_applies(stack: BenchStack) -> tuple[float, float]:
    """Batches the projector applied so far and the seconds they took (its `apply` stage histogram)."""
    apply = stages.scrape(stack.metrics_url("projector")).get(("cqrs_projector_stage_seconds", "apply"), {})
    return float(apply.get("count", 0.0)), float(apply.get("sum", 0.0))  # type: ignore[arg-type]


def run_variant(stack: BenchStack, args: argparse.Namespace, env: Mapping[str, str], tree: Path) -> dict[str, float]:
    """One run: the services restarted from `tree` with `env`, the backlog of earlier runs applied, then measured."""
    restart_services(stack, env, tree)
    try:
        wait_projected(stack.nats.url, DRAIN_TIMEOUT_SECONDS)  # not the backlog another variant left
    except TimeoutError as exc:
        raise SystemExit(str(exc)) from exc
    replicas = start_replicas(stack, args.replicas - 1, env, tree)
    try:
        return measure(stack, args, replicas)
    finally:
        for replica in replicas:
            replica.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.setting_ab", description=__doc__.split("\n\n")[0])
    parser.add_argument("--a", nargs="+", default=[], metavar="NAME=VALUE", help="variant A's environment")
    parser.add_argument("--b", nargs="+", default=[], metavar="NAME=VALUE", help="variant B's environment")
    parser.add_argument("--a-tree", type=Path, default=HERE, help="the tree variant A runs (default: this one)")
    parser.add_argument("--b-tree", type=Path, default=HERE, help="the tree variant B runs (default: this one)")
    parser.add_argument("--rounds", type=int, default=2, help="A B B A blocks (default 2)")
    parser.add_argument("--rate", type=float, default=60.0, help="commands per second (default 60)")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds per run (default 20)")
    parser.add_argument("--workers", type=int, default=2, help="load generator processes (default 2)")
    parser.add_argument("--queries", action="store_true", help="CPU per query of a closed loop of reads instead")
    parser.add_argument("--concurrency", type=int, default=16, help="--queries: concurrent callers (default 16)")
    parser.add_argument("--replicas", type=int, default=1, help="command_service replicas, round robin (default 1)")
    parser.add_argument(
        "--ttq", type=float, default=0.0, metavar="FRACTION",
        help="commands: also time-to-queryable p50/p99, probed for this fraction of the commands (default 0: off)",
    )  # fmt: skip
    parser.add_argument(
        "--with-queries", action="store_true",
        help="commands: as many queries per second beside them (GetOrder, ListOrders), as make bench's "
        "time-to-queryable steps run (the command mix then adds get=3,list=3)",
    )  # fmt: skip
    parser.add_argument("--mix", default="", help=f"the load's mix (default {COMMAND_MIX}; --queries {QUERY_MIX})")
    parser.add_argument(
        "--fresh", action="store_true",
        help="each run on a new, empty stack (slower: no drift from the data earlier runs left)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.with_queries and (args.mix or args.queries):
        # Its rate counts the queries its own mix adds: another mix would not send --rate commands a second.
        parser.error("--with-queries sets the load's mix itself: leave out --mix and --queries")
    variants = {"A": variant(args.a), "B": variant(args.b)}
    trees = {"A": args.a_tree.resolve(), "B": args.b_tree.resolve()}
    runs: dict[str, list[dict[str, float]]] = {"A": [], "B": []}
    order = ("A", "B", "B", "A") * args.rounds
    with tempfile.TemporaryDirectory(prefix="cqrs-setting-ab-") as workdir:
        stack = BenchStack(Path(workdir) / "run-0")
        try:
            for number, name in enumerate(order):
                if args.fresh or number == 0:
                    if number:
                        stack.stop()
                        shutil.rmtree(stack.workdir, ignore_errors=True)
                        stack = BenchStack(Path(workdir) / f"run-{number}")
                    stack.start_servers()
                    stack.migrate()
                row = run_variant(stack, args, variants[name], trees[name])
                runs[name].append(row)
                print(f"{name} {trees[name]} {variants[name]}: " + _format(row), flush=True)
        finally:
            stack.stop()
    medians = {name: _medians(rows) for name, rows in runs.items()}
    print(f"\nmedians (CPU ms per {'query' if args.queries else 'command'}; latency ms):")
    for name in ("A", "B"):
        print(f"  {name}: {_format(medians[name])}")
    print("ratios B / A:")
    print("  " + ", ".join(
        f"{key} {medians['B'][key] / medians['A'][key]:.2f}x"
        for key in medians["A"] if key in medians["B"] and medians["A"][key]
    ))  # fmt: skip
    return 0


def _medians(rows: list[dict[str, float]]) -> dict[str, float]:
    keys = [key for key in rows[0] if all(key in row for row in rows)]
    return {key: statistics.median(row[key] for row in rows) for key in keys}


def _format(row: Mapping[str, Any]) -> str:
    return ", ".join(f"{key} {value:.2f}" for key, value in row.items())


if __name__ == "__main__":
    sys.exit(main())
