"""`python -m bench.projector_cost`: what a projector catch-up costs per event, this tree against a baseline tree.

Fills PostgreSQL with order events (`bench.verify_throughput.fill_event_store`), relays them into JetStream once,
then lets a projector (`python -m projector`, a subprocess) catch up on all of them into a fresh MongoDB database,
alternately from this tree and from `--baseline` (a git worktree of the commit to compare with, e.g.
`git worktree add /tmp/projector-baseline HEAD`), in the order A B B A ... so that drift of the machine cancels.
Each run measures, from the projector's first delivery until its consumer has nothing pending or un-acked:

* CPU seconds per event of the projector process and of the MongoDB-wire server (/proc, `bench.cpu`);
* MongoDB requests per batch (the server's `serverStatus` request counter over the projector's batch count,
  from its /metrics) and the server's time per collection and operation (`top`);
* events per second.

* documents written per event (the server's oplog entries per collection: each is one statement's write, which
  the MongoDB-wire server commits, and with `j: true` syncs, on its own).

`--spread N` interleaves the events of N streams at a time (live traffic: an order's events reach the projector in
different batches); 1 keeps each stream's events together. `--pipeline` leaves JetStream and the runner out: each
tree's `Pipeline.apply` gets the same fixed batches in a child process (the pipeline's own CPU, whatever batches
the consumer would form). Both trees should be worktrees of one commit (each run prints their commits).

It prints each run and the ratios this tree / baseline (medians over rounds). The read models of both variants of
a round must come out equal (orders, customers, sales report, checkpoint versions; not the views' bookkeeping
stamps, which depend on how the events were batched: `cqrsctl.rebuild.model`): a run that differs fails.
Servers are started on free loopback ports in a temporary folder (`bench.stack.BenchStack`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import nats
from pymongo import MongoClient

from bench import cpu, stages
from bench.stack import BenchStack
from bench.verify_throughput import APPENDS_PER_STATEMENT, fill_event_store, relay_everything, workload
from command_service.event_store import AppendRequest, RequestRecord, append_batch
from core.subjects import DEFAULT_STREAM_NAME, SUBJECT_PREFIX
from cqrsctl.rebuild.model import BOOKKEEPING_FIELDS
from localservers import ServiceProcess, find_binary, free_port

HERE = Path(__file__).resolve().parent.parent
# Collections whose documents must be equal between the variants of a round (checkpoints: by version only).
COMPARED = ("orders", "customers", "sales_daily")
Document = dict[str, Any]


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Run:
    """One projector catch-up."""

    variant: str
    events: int
    seconds: float
    batches: int
    requests: int
    cpu_s: dict[str, float | None]
    top: dict[str, tuple[int, int]] = field(default_factory=dict)  # "collection section" -> (micros, count)
    writes: dict[str, int] = field(default_factory=dict)  # collection -> documents written (oplog entries)

    def per_event_ms(self, process: str) -> float | None:
        spent = self.cpu_s.get(process)
        return None if spent is None else 1000 * spent / self.events

    def figures(self) -> dict[str, float | None]:
        """The compared figures of the run."""
        return {
            "projector CPU ms/event": self.per_event_ms("projector"),
            "MongoDB-wire CPU ms/event": self.per_event_ms("mongo"),
            "Mongo requests/batch": self.requests / self.batches if self.batches else None,
            "document writes/event": sum(self.writes.values()) / self.events if self.writes else None,
            "events/batch": self.events / self.batches if self.batches else None,
            "events/s": self.events / self.seconds,
        }


def top_delta(before: Mapping[str, Any], after: Mapping[str, Any], database: str) -> dict[str, tuple[int, int]]:
    """Server time (micros) and operation count per `"collection section"` of `database` between two `top`
    replies (`totals`: namespace -> section -> {time, count}); sections `total`, `readLock`, `writeLock` left out."""
    out: dict[str, tuple[int, int]] = {}
    prefix = f"{database}."
    for namespace, sections in after.items():
        if not namespace.startswith(prefix) or not isinstance(sections, Mapping):
            continue
        for section, value in sections.items():
            if section in ("total", "readLock", "writeLock"):
                continue
            old = (before.get(namespace) or {}).get(section) or {"time": 0, "count": 0}
            count = int(value["count"]) - int(old["count"])
            if count > 0:
                out[f"{namespace[len(prefix) :]} {section}"] = (int(value["time"]) - int(old["time"]), count)
    return out


def medians(runs: Sequence[Run]) -> dict[str, float | None]:
    """Per figure, the median over the runs (None when a run lacks it)."""
    figures = [run.figures() for run in runs]
    out: dict[str, float | None] = {}
    for name in figures[0] if figures else {}:
        values = [f[name] for f in figures]
        out[name] = None if any(v is None for v in values) else statistics.median(v for v in values if v is not None)
    return out


def ratios(new: Mapping[str, float | None], old: Mapping[str, float | None]) -> dict[str, float | None]:
    """new / old per figure (None when either is missing or old is 0)."""
    out: dict[str, float | None] = {}
    for name, value in new.items():
        base = old.get(name)
        out[name] = value / base if value is not None and base else None
    return out


def order(rounds: int) -> list[tuple[int, str]]:
    """(round, variant) in A B B A A B ... order: each variant goes first in every other round."""
    return [(r, v) for r in range(rounds) for v in (("baseline", "new") if r % 2 == 0 else ("new", "baseline"))]


# --------------------------------------------------------------------------------------------------- running


def one_event_appends(append: AppendRequest) -> list[AppendRequest]:
    """The append of several events as one append per event (each with its own request), in version order."""
    return [
        AppendRequest(append.stream_type, append.stream_id, append.expected_version + offset, (event,),
                      append.metadata, RequestRecord(f"{append.request.request_id}/{offset}", "Bench",
                                                     f"{append.request.request_id}/{offset}"), 0)
        for offset, event in enumerate(append.events)
    ]  # fmt: skip


def interleaved(appends: Sequence[AppendRequest]) -> list[AppendRequest]:
    """The appends' events one at a time, round robin over the streams: the first event of every stream, then the
    second of every stream, ... (per-stream order kept), as concurrent clients would write them."""
    queues = [one_event_appends(append) for append in appends]
    return [queue[k] for k in range(max(map(len, queues), default=0)) for queue in queues if k < len(queue)]


async def fill_interleaved(dsn: str, events: int, spread: int) -> int:
    """`fill_event_store`'s workload, with the events of each `spread` consecutive streams interleaved (1: as
    `fill_event_store` writes them, each stream's events together); returns the events written."""
    if spread <= 1:
        return await fill_event_store(dsn, events)
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        group: list[AppendRequest] = []
        for append in [*workload(events), None]:
            if append is not None:
                group.append(append)
            if group and (append is None or len(group) >= spread):
                mixed = interleaved(group)
                for start in range(0, len(mixed), APPENDS_PER_STATEMENT):
                    await append_batch(conn, mixed[start : start + APPENDS_PER_STATEMENT], timeout=120)
                group = []
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


async def _delete_consumers(nats_url: str) -> None:
    """Removes every consumer of the event stream: the next projector starts from the first event."""
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        js = nc.jetstream()
        for info in await js.consumers_info(DEFAULT_STREAM_NAME):
            await js.delete_consumer(DEFAULT_STREAM_NAME, info.name)
    finally:
        await nc.close()


async def _drain(nats_url: str, events: int, timeout: float, on_start: Callable[[], None]) -> float:
    """Seconds from the projector's first delivery until its consumers (one durable, or one per partition) have
    nothing pending or un-acked; `on_start` is called at the first delivery (after the projector's start-up)."""
    nc = await nats.connect(nats_url, connect_timeout=5)
    try:
        js = nc.jetstream()
        started: float | None = None
        deadline = time.monotonic() + timeout
        while True:
            infos = await js.consumers_info(DEFAULT_STREAM_NAME)
            now = time.monotonic()
            pending = sum(int(i.num_pending or 0) for i in infos)
            ack_pending = sum(int(i.num_ack_pending or 0) for i in infos)
            delivered = sum(int(i.delivered.stream_seq or 0) for i in infos if i.delivered is not None)
            if started is None and infos and (delivered > 0 or ack_pending > 0):
                started = now
                on_start()
            if started is not None and pending == 0 and ack_pending == 0:
                return max(now - started, 1e-3)
            if now > deadline:
                raise TimeoutError(f"no catch-up on {events} events within {timeout:.0f}s (pending {pending})")
            await asyncio.sleep(0.02)
    finally:
        await nc.close()


def _server_counters(url: str, database: str) -> tuple[int, dict[str, Any]]:
    client: MongoClient[Document] = MongoClient(url, serverSelectionTimeoutMS=5000)
    with client:
        status = client.admin.command("serverStatus")
        top = client.admin.command("top")
    return int(status["network"]["numRequests"]), dict(top["totals"])


def _py_spy(pids: Mapping[str, int], out: Path) -> list[subprocess.Popen[bytes]]:
    """Samples these processes with py-spy (collapsed stacks into `out/<name>.txt`) until they get SIGINT."""
    spy = find_binary("py-spy")
    return [
        subprocess.Popen(
            [str(spy), "record", "--pid", str(pid), "--rate", "50", "--nonblocking", "--format", "raw",
             "--output", str(out / f"{name}.txt")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        for name, pid in pids.items()
    ]  # fmt: skip


def run_once(
    stack: BenchStack, variant: str, tree: Path, database: str, events: int, batch_size: int, profile: Path | None
) -> Run:
    """Starts a projector from `tree` on an empty database and times its catch-up on the whole stream;
    `profile`: a folder for the projector's cProfile stats and the MongoDB-wire server's py-spy stacks."""
    asyncio.run(_delete_consumers(stack.nats.url))
    metrics_port = free_port()
    env = {
        **stack.service_env(),
        "CQRS_MONGO_DATABASE": database,
        "CQRS_PROJECTOR_BATCH_SIZE": str(batch_size),
        "CQRS_PROJECTOR_METRICS_PORT": str(metrics_port),
        "PYTHONPATH": str(tree),
    }
    log_path = stack.workdir / f"projector-{database}.log"
    projector = (
        ServiceProcess("projector", cwd=tree, log_path=log_path)
        if profile is None
        else ServiceProcess("projector", "cProfile", args=["-o", str(profile / "projector.prof"), "-m", "projector"],
                            cwd=tree, log_path=log_path)
    )  # fmt: skip
    projector.start(env)
    assert projector.pid is not None and stack.mongo.pid is not None
    window = cpu.CpuWindow({"projector": (projector.pid,), "mongo": (stack.mongo.pid,)}, client=False)
    counters: list[tuple[int, dict[str, Any]]] = []
    spies: list[subprocess.Popen[bytes]] = []

    def started() -> None:
        window.start()
        counters.append(_server_counters(stack.mongo.url, database))
        if profile is not None:
            assert projector.pid is not None and stack.mongo.pid is not None
            spies.extend(_py_spy({"mongo": stack.mongo.pid}, profile))

    try:
        seconds = asyncio.run(_drain(stack.nats.url, events, max(120.0, events / 20), started))
        window.stop()
        for spy in spies:
            spy.send_signal(signal.SIGINT)
            spy.wait(timeout=60)
        requests, top = _server_counters(stack.mongo.url, database)
        scraped = stages.scrape(f"http://127.0.0.1:{metrics_port}/metrics")
    finally:
        projector.stop()
    batches = int(float(str(scraped.get(("cqrs_projector_stage_seconds", "apply"), {}).get("count", 0))))
    return Run(variant, events, seconds, batches, requests - counters[0][0], window.cpu_s,
               top_delta(counters[0][1], top, database), document_writes(stack.mongo.url, database))  # fmt: skip


def document_writes(url: str, database: str) -> dict[str, int]:
    """Documents written (inserted, updated, deleted) per collection of `database`: its entries in the oplog."""
    client: MongoClient[Document] = MongoClient(url)
    with client:
        rows = client.local["oplog.rs"].aggregate(
            [
                {"$match": {"ns": {"$regex": f"^{database}\\."}, "op": {"$in": ["i", "u", "d"]}}},
                {"$group": {"_id": "$ns", "n": {"$sum": 1}}},
            ]
        )
        return {str(row["_id"]).partition(".")[2]: int(row["n"]) for row in rows}


def differences(url: str, first: str, second: str) -> list[str]:
    """What differs between the read models of two databases (empty when they are equal)."""
    found: list[str] = []
    client: MongoClient[Document] = MongoClient(url, tz_aware=True)
    with client:
        for name in COMPARED:
            # The views' stamps and counters depend on how the events were batched, not only on the events.
            hidden = {path.partition(".")[2]: 0 for path in BOOKKEEPING_FIELDS if path.startswith(f"{name}.")} or None
            a = list(client[first][name].find({}, hidden).sort("_id", 1))
            b = list(client[second][name].find({}, hidden).sort("_id", 1))
            if a != b:
                pairs = [(x, y) for x, y in zip(a, b, strict=False) if x != y]
                unequal = len(pairs) + abs(len(a) - len(b))
                example = f" (first: {_fields_apart(*pairs[0])})" if pairs else ""
                found.append(f"{name}: {unequal} of {max(len(a), len(b))} documents differ{example}")
        versions = [{d["_id"]: d["version"] for d in client[db]["checkpoints"].find({}, {"version": 1})}
                    for db in (first, second)]  # fmt: skip
        if versions[0] != versions[1]:
            found.append("checkpoints: versions differ")
    return found


def _fields_apart(x: Document, y: Document) -> str:
    """The id of two documents and the fields in which they differ, with both values (at most 600 characters)."""
    fields = sorted(k for k in x.keys() | y.keys() if x.get(k) != y.get(k))
    return (f"{x['_id']}: " + "; ".join(f"{k} {x.get(k)!r} / {y.get(k)!r}" for k in fields))[:600]


def _drop(url: str, *databases: str) -> None:
    client: MongoClient[Document] = MongoClient(url)
    with client:
        for database in databases:
            client.drop_database(database)


# `--pipeline`: run in each tree (`python -c`, so that a baseline without this module runs it too): the events
# from PostgreSQL in position order, applied in batches of a fixed size through `Pipeline.apply` (what the runner
# calls per batch), timed by this process's CPU over the applies only.
PIPELINE_CHILD = """
import asyncio, inspect, json, sys, time
import asyncpg
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient
from command_service.event_store import recorded_event_from_row
from core.dependency_metrics import dependency_metrics
from projector.pipeline import Pipeline
from projector.planning import decode_recorded
from projector.registry import PROJECTIONS

async def main(dsn, url, database, size):
    conn = await asyncpg.connect(dsn)
    rows = await conn.fetch("SELECT position, event_id, stream_type, stream_id, version, event_type, schema_version,"
                            " payload::text AS payload, metadata::text AS metadata, recorded_at FROM events"
                            " ORDER BY position")
    await conn.close()
    by_type = {p.stream_type: p for p in PROJECTIONS}
    events = [recorded_event_from_row(row) for row in rows]
    batches = [decode_recorded(events[i : i + size], by_type) for i in range(0, len(events), size)]
    client = AsyncMongoClient(url, tz_aware=True, w="majority", journal=True)
    # As the projector runs against this server (`localservers.MongoServer.CLIENT_ENV`), in a tree that can.
    calls = {"parallel_calls": False} if "parallel_calls" in inspect.signature(Pipeline).parameters else {}
    pipeline = Pipeline(client[database], by_type, dependency_metrics(CollectorRegistry()), stream_name="",
                        park_after=6, max_backoff=1.0, **calls)
    await pipeline.ensure_indexes()
    cpu, started = time.process_time(), time.monotonic()
    for batch in batches:
        outcome = await pipeline.apply(batch)
        assert not outcome.unsettled, outcome.unsettled
    print(json.dumps({"cpu_s": time.process_time() - cpu, "seconds": time.monotonic() - started,
                      "events": len(events), "batches": len(batches)}))
    await client.close()

asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
"""


def pipeline_once(stack: BenchStack, variant: str, tree: Path, database: str, batch_size: int) -> Run:
    """Applies every stored event through the `Pipeline` of `tree`, in batches of `batch_size`, in a child process
    (its CPU over the applies only), and the MongoDB-wire server's CPU and requests meanwhile."""
    env = {**stack.service_env(), "PYTHONPATH": str(tree)}
    command = [sys.executable, "-c", PIPELINE_CHILD, stack.postgres.dsn, stack.mongo.url, database, str(batch_size)]
    assert stack.mongo.pid is not None
    requests, top = _server_counters(stack.mongo.url, database)
    with cpu.window({"mongo": (stack.mongo.pid,)}, client=False) as window:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=3600, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the pipeline run of {variant} failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    after, top_after = _server_counters(stack.mongo.url, database)
    # The server's CPU over the child's whole run (start-up and the PostgreSQL read included: a small constant).
    spent = {"projector": float(result["cpu_s"]), "mongo": window.cpu_s.get("mongo")}
    return Run(variant, int(result["events"]), float(result["seconds"]), int(result["batches"]), after - requests,
               spent, top_delta(top, top_after, database), document_writes(stack.mongo.url, database))  # fmt: skip


def describe(tree: Path) -> str:
    """The commit of a tree and how many of its files differ from it (a baseline and a new tree should share the
    commit: only the files under test should differ)."""

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    changed = [line for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    return f"{tree} at {git('rev-parse', '--short', 'HEAD') or '?'} with {len(changed)} changed file(s)"


def render(runs: Sequence[Run]) -> str:
    names = list(runs[0].figures())
    lines = ["| run | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for index, run in enumerate(runs):
        cells = [f"{v:.4g}" if v is not None else "n/a" for v in run.figures().values()]
        lines.append(f"| {index // 2}: {run.variant} | " + " | ".join(cells) + " |")
    new = medians([r for r in runs if r.variant == "new"])
    old = medians([r for r in runs if r.variant == "baseline"])
    cells = [f"{v:.3f}" if v is not None else "n/a" for v in ratios(new, old).values()]
    lines.append("| **new / baseline (medians)** | " + " | ".join(cells) + " |")
    lines += ["", "MongoDB-wire server time per event (µs) by collection and operation (last run of each variant):"]
    for variant in ("baseline", "new"):
        run = next(r for r in reversed(runs) if r.variant == variant)
        parts = sorted(run.top.items(), key=lambda kv: -kv[1][0])
        writes = ", ".join(f"{name} {count / run.events:.3f}" for name, count in sorted(run.writes.items()))
        lines.append(f"- {variant} documents written per event: {writes}")
        lines.append(f"- {variant}: " + ", ".join(
            f"{name} {micros / run.events:.0f} ({count / run.batches if run.batches else 0:.2f}/batch)"
            for name, (micros, count) in parts
        ))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--baseline", type=Path, required=True, help="the tree of the baseline (a git worktree)")
    parser.add_argument("--new", type=Path, default=HERE, help="the tree measured against it (default: this one)")
    parser.add_argument("--events", type=int, default=20_000, help="events in the store (default 20000)")
    parser.add_argument("--rounds", type=int, default=2, help="runs of each variant (default 2)")
    parser.add_argument(
        "--pipeline",
        action="store_true",
        help="no JetStream, no runner: the stored events through each tree's Pipeline.apply in batches of "
        "--batch-size (same batches for both: the pipeline's own cost; 'projector' is then the pipeline's CPU)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        help="profile the last run of the new tree into this folder, made if missing (projector: cProfile, server: "
        "py-spy; not with --pipeline)",
    )
    parser.add_argument("--spread", type=int, default=100, help="streams whose events interleave (default 100)")
    parser.add_argument("--batch-size", type=int, default=200, help="CQRS_PROJECTOR_BATCH_SIZE (default 200)")
    args = parser.parse_args(argv)
    if args.profile is not None:
        try:
            find_binary("py-spy")  # not a project dependency: say so before the store is filled, not after
        except FileNotFoundError:
            parser.error("--profile samples the MongoDB-wire server with py-spy: `.venv/bin/pip install py-spy` first")
        args.profile.mkdir(parents=True, exist_ok=True)  # cProfile and py-spy write nothing into a missing folder
    trees = {"baseline": args.baseline.resolve(), "new": args.new.resolve()}
    for variant, tree in trees.items():
        say(f"{variant}: {describe(tree)}")
    with tempfile.TemporaryDirectory(prefix="cqrs-projector-cost-") as tmp:
        stack = BenchStack(Path(tmp))
        try:
            stack.start_servers()
            stack.migrate()
            t = time.monotonic()
            written = asyncio.run(fill_interleaved(stack.postgres.dsn, args.events, args.spread))
            if not args.pipeline:
                asyncio.run(relay_everything(stack.postgres.dsn, stack.nats.url, DEFAULT_STREAM_NAME, SUBJECT_PREFIX))
            say(f"{written:,} events stored in {time.monotonic() - t:.1f}s")
            runs: list[Run] = []
            failed = False
            plan = order(args.rounds)
            for index, (round_, variant) in enumerate(plan):
                database = f"pc_{variant}_{round_}"
                last_new = variant == "new" and all(v != "new" for _, v in plan[index + 1 :])
                profile = args.profile if last_new else None
                if args.pipeline:
                    run = pipeline_once(stack, variant, trees[variant], database, args.batch_size)
                else:
                    run = run_once(stack, variant, trees[variant], database, written, args.batch_size, profile)
                runs.append(run)
                say(f"round {round_} {variant}: " + ", ".join(f"{k} {v:.4g}" for k, v in run.figures().items() if v))
                if variant == order(round_ + 1)[-1][1]:  # the second variant of this round: compare
                    diff = differences(stack.mongo.url, f"pc_baseline_{round_}", f"pc_new_{round_}")
                    if diff:
                        failed = True
                        say(f"round {round_}: read models differ: {'; '.join(diff)}")
                    _drop(stack.mongo.url, f"pc_baseline_{round_}", f"pc_new_{round_}")
            print(render(runs))
            return 1 if failed else 0
        finally:
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
