"""Smoke test of `make bench`: `python -m bench --quick` runs end to end and prints the whole table.

Benchmarks are not tests: the numbers are not asserted, only that every measurement ran and has its row.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Every row of the table, by a phrase its measure column contains.
ROWS = [
    "gRPC unary echo",
    "PostgreSQL single-row INSERT+COMMIT",
    "PostgreSQL batched insert",
    "JetStream publish_async",
    "JetStream pull consumer, the projector's client",
    "MongoDB bulk upsert",
    "MongoDB find_one",
    "sustained command rate",
    # What the CPUs allow at the sustained step's cost (every process summed), beside the rate goal.
    "every process together CPU per 1,000 commands",
    "CPUs allow at that cost",
    "command throughput, closed loop",
    "projector catch-up throughput",
    "query QPS",
    "time-to-queryable p50",
    "time-to-queryable p99",
    "time-to-queryable p99 at 100 cmds/s",  # the fixed rate, beside the half of the sustained rate
    "time-to-queryable p50 at 100 cmds/s + ",  # "... + N queries/s": both steps run queries beside the commands
    # Where it goes: the relay's and the projector's stages, then the query service's waiter.
    "projector stream_to_fetch",
    "query_service checkpoint_to_seen",
    "eventsourcing",
    "our EventStore.append (1 event",
    "our EventStore.append vs raw single-row commits",
    # CPU cost per 1,000 operations: the same-run baselines, then each process beside its baseline.
    "gRPC echo server CPU per 1,000 RPCs",
    "gRPC echo server CPU per 1,000 RPCs, open loop at",  # at the sustained command rate, then the query rate
    "(the sustained command rate)",
    "(the query rate)",
    "raw bulk-upsert client CPU per 1,000 upserts",
    "raw JetStream consumer client CPU per 1,000 messages",
    "nats-server CPU per 1,000 raw consumed messages",
    "raw commit loop client CPU per 1,000 commits",
    "PostgreSQL CPU per 1,000 raw commits",
    "command_service CPU per 1,000 commands",
    "beside the echo server at that rate",
    "projector CPU per 1,000 events",
    "beside receiving an event and upserting a document",
    "query_service CPU per 1,000 queries",
    "beside the echo server at the query rate",
    "PostgreSQL CPU per 1,000 commands",
    "nats-server CPU per 1,000 commands",
    "MongoDB-wire server CPU per 1,000 commands",
    "load generator CPU per 1,000 commands",
    # Scale-out: 1, 2, 4 projector partition owners and 1, 2 command_service replicas, each beside the single one's,
    # and every process group's CPU per 1,000 operations in each run.
    "projector catch-up with 1 partition owner (",
    "projector catch-up with 2 partition owners",
    "projector catch-up with 4 partition owners",
    "command throughput, closed loop, 1 command_service replica (",
    "command throughput, closed loop, 2 command_service replicas",
    *(f"CPU per 1,000 events with {owners}: {group}" for owners in ("1 owner", "2 owners", "4 owners")
      for group in ("projectors (summed)", "MongoDB-wire server", "nats-server")),
    *(f"CPU per 1,000 commands with {replicas}: {group}" for replicas in ("1 replica", "2 replicas")
      for group in ("command services (summed)", "PostgreSQL", "nats-server", "client (bench process)")),
]  # fmt: skip
# Rows of the per-process CPU table (CPU seconds per 1,000 operations of each process, per measurement).
CPU_TABLE_ROWS = [
    "gRPC echo (per RPC)",
    "gRPC echo, open loop at",
    "raw JetStream consumer",
    "system: sustained commands",
    "system: commands, as many queries and time-to-queryable probes at 100 cmds/s",
    "system: projector catch-up",
    "system: queries, closed loop",
]
# Rows of the scale-out table (CPU per 1,000 operations and cores used of each process group, per run).
SCALE_OUT_TABLE_ROWS = ["1 owner", "2 owners", "4 owners", "1 replica", "2 replicas"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_quick_bench_runs_and_prints_every_row(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    report = f"exit {result.returncode}\nstdout:\n{result.stdout[-6000:]}\nstderr:\n{result.stderr[-6000:]}"
    assert result.returncode == 0, report
    table_lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    for phrase in ROWS:
        matching = [line for line in table_lines if phrase in line]
        assert matching, f"no table row for {phrase!r}\n{report}"
        assert all("not measured" not in line for line in matching), f"{phrase!r} was not measured\n{report}"
    for phrase in CPU_TABLE_ROWS:
        row = next((line for line in table_lines if line.startswith(f"| {phrase}")), None)
        assert row is not None and "not measured" not in row, f"CPU table row {phrase!r}: {row}\n{report}"
    for run in SCALE_OUT_TABLE_ROWS:
        assert any(line.startswith(f"| {run} | ") for line in table_lines), f"no scale-out table row {run!r}\n{report}"
    assert (out / "results.md").read_text() in result.stdout
    assert (out / "results.json").is_file()
