"""Smoke test of `cqrs load` against the whole system: the real CLI, as a subprocess with worker processes.

It checks that the load generator works end to end and writes its report, not the numbers it measures.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from cqrsctl.load import LoadConfig, run_load
from localservers import free_port
from tests.e2e.conftest import Stack

_REPO = Path(__file__).resolve().parents[2]
_CLI_TIMEOUT = 60.0


async def _run_load_cli(stack: Stack, out: Path, *flags: str) -> dict[str, Any]:
    """Runs `python -m cqrsctl.main load ...` without blocking this event loop (the stack runs in it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cqrsctl.main", "load",
        "--command-addr", f"127.0.0.1:{stack.command_server.port}",
        "--query-addr", stack.query_server.address,
        "--out", str(out),
        *flags,
        cwd=_REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), _CLI_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"cqrs load did not finish within {_CLI_TIMEOUT:g}s")
    assert proc.returncode == 0, (
        f"cqrs load exited {proc.returncode}\nstdout:\n{stdout.decode()}\nstderr:\n{stderr.decode()}"
    )
    print(stdout.decode(), stderr.decode(), sep="\n")
    charts = ["latency.png", "lag.png", *(["cpu.png"] if any(f.startswith("--cpu") for f in flags) else [])]
    for name in ("report.json", "summary.md", *charts):
        assert (out / name).is_file(), f"{name} was not written"
        assert (out / name).stat().st_size > 0, f"{name} is empty"
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def _check_report(report: dict[str, Any], *, cpu: bool = False) -> None:
    assert set(report) == {
        "config", "duration_s", "totals", "rpcs", "commands", "queries", "time_to_queryable_ms", "charts",
        *(["cpu"] if cpu else []),
    }  # fmt: skip
    totals = report["totals"]
    assert totals["requests"] > 0
    assert totals["throughput_rps"] > 0
    assert totals["not_yet_visible"] == report["rpcs"].get("GetOrder", {}).get("not_yet_visible", 0)
    for name, entry in {**report["rpcs"], "commands": report["commands"], "queries": report["queries"]}.items():
        bad = {code: n for code, n in entry["errors_by_code"].items() if code in ("INTERNAL", "UNKNOWN")}
        assert not bad, f"{name} answered {bad}"
    assert report["commands"]["count"] > 0 and report["queries"]["count"] > 0
    ttq = report["time_to_queryable_ms"]
    assert ttq["count"] > 0, ttq
    # Each probe is one GetOrder with the command's token (the server waits), not a polling loop.
    assert ttq["count"] <= ttq["probe_calls"] <= ttq["count"] + ttq["timeouts"] + 2, ttq
    assert report["charts"] == {"latency": "latency.png", "lag": "lag.png", **({"cpu": "cpu.png"} if cpu else {})}


def _errors(report: dict[str, Any]) -> dict[str, dict[str, int]]:
    return {name: entry["errors_by_code"] for name, entry in report["rpcs"].items() if entry["errors_by_code"]}


async def test_closed_loop_run_writes_a_complete_report(stack: Stack, tmp_path: Path) -> None:
    # The services run in this test process: its CPU is theirs (with the servers it started, as descendants).
    report = await _run_load_cli(
        stack, tmp_path, "--mode", "closed", "--concurrency", "4", "--duration", "3", "--workers", "2",
        "--ttq-sample", "0.3", "--customers", "4", "--cpu-pids", f"stack={os.getpid()}",
    )  # fmt: skip
    _check_report(report, cpu=True)
    cpu = report["cpu"]
    assert set(cpu["processes"]) == {"stack", "cqrs-load"}
    assert cpu["processes"]["stack"]["pids"] == [os.getpid()]
    for name, entry in cpu["processes"].items():
        assert entry["cpu_s"] > 0 and entry["per_1000"]["requests"] > 0, (name, entry)
    assert cpu["operations"]["commands"] == report["commands"]["count"]
    assert cpu["timeline"], cpu
    assert report["config"]["mode"] == "closed" and report["config"]["workers"] == 2
    assert report["config"]["read_consistency"] == "eventual"
    assert report["totals"]["dropped"] == 0
    # Reads that come before the projector are replication lag (not_yet_visible), so a healthy run has no errors.
    assert report["totals"]["errors"] == 0, _errors(report)
    assert "CreateOrder" in report["rpcs"]
    summary = (tmp_path / "summary.md").read_text()
    assert "## Latency by RPC (ms)" in summary and "## Time to queryable (ms)" in summary
    assert "| errors | not yet visible |" in summary
    assert "## CPU by process" in summary and "| cqrs-load |" in summary


async def test_token_reads_wait_for_their_write(stack: Stack, tmp_path: Path) -> None:
    """With --read-consistency token every GetOrder of the run's own orders carries its write's token: the query
    service answers once the read model has it, so no read is not yet visible."""
    report = await _run_load_cli(
        stack, tmp_path, "--mode", "closed", "--concurrency", "4", "--duration", "3", "--workers", "2",
        "--ttq-sample", "0.1", "--customers", "4", "--mix", "create=2,add=1,get=6", "--read-consistency", "token",
    )  # fmt: skip
    _check_report(report)
    assert report["config"]["read_consistency"] == "token"
    assert report["rpcs"]["GetOrder"]["count"] > 0
    assert report["totals"]["not_yet_visible"] == 0, report["rpcs"]["GetOrder"]
    assert report["totals"]["errors"] == 0, _errors(report)


async def test_open_loop_run_keeps_to_its_schedule(stack: Stack, tmp_path: Path) -> None:
    report = await _run_load_cli(
        stack, tmp_path, "--mode", "open", "--rate", "50", "--duration", "2", "--workers", "2",
        "--ttq-sample", "0.5", "--customers", "4",
    )  # fmt: skip
    _check_report(report)
    sent = report["totals"]["requests"] + report["totals"]["dropped"]
    assert sent == 100, f"open loop at 50/s for 2 s should schedule 100 arrivals, got {sent}"


async def test_in_process_api_stops_at_max_requests(stack: Stack) -> None:
    config = LoadConfig(
        command_addr=f"127.0.0.1:{stack.command_server.port}", query_addr=stack.query_server.address,
        mode="closed", concurrency=3, max_requests=40, workers=2, customers=2, ttq_sample=1.0, seed=7,
    )  # fmt: skip
    report = await run_load(config)
    data = report.to_json()
    assert data["totals"]["requests"] == 40
    assert data["totals"]["errors"] == report.errors
    assert data["time_to_queryable_ms"]["count"] + data["time_to_queryable_ms"]["timeouts"] > 0
    assert data["time_to_queryable_ms"]["timeouts"] == 0


async def test_unreachable_service_exits_2_with_a_clear_message(unused_port: int, tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cqrsctl.main", "load", "--command-addr", f"127.0.0.1:{unused_port}",
        "--query-addr", f"127.0.0.1:{unused_port}", "--duration", "1", "--out", str(tmp_path),
        cwd=_REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, stderr = await asyncio.wait_for(proc.communicate(), _CLI_TIMEOUT)
    assert proc.returncode == 2, stderr.decode()
    assert f"cannot reach the command service at 127.0.0.1:{unused_port}" in stderr.decode()
    assert not (tmp_path / "report.json").exists()


@pytest.fixture
def unused_port() -> int:
    return free_port()
