"""`cqrs load`'s CPU section: the --cpu-pids/--cpu-process flags, resolving them, sampling, per-1,000 costs, the
report's JSON, summary and chart."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cqrsctl.load import histograms as hist
from cqrsctl.load.cli import config_from_args
from cqrsctl.load.config import ConfigError, LoadConfig, parse_cpu_patterns, parse_cpu_pids
from cqrsctl.load.cpu import SELF, CpuRecorder, CpuUsage, per_thousand, usage_from
from cqrsctl.load.messages import RpcResult, WorkerResult
from cqrsctl.load.procstat import GroupSample, Snapshot, read_cmdlines
from cqrsctl.load.report import LoadReport, build_report, render_summary, write_report
from cqrsctl.load.runner import LoadSetupError, cpu_groups_of
from cqrsctl.main import build_parser


def test_cpu_pids_parse_into_named_groups() -> None:
    assert parse_cpu_pids(["command_service=10,postgres=20", " postgres=21 "]) == {
        "command_service": (10,),
        "postgres": (20, 21),
    }
    assert parse_cpu_patterns(["pg=postgres -D", "proj=-m projector$|projector,x"]) == {
        "pg": "postgres -D",
        "proj": "-m projector$|projector,x",
    }


@pytest.mark.parametrize(
    ("pids", "patterns", "message"),
    [
        (["postgres"], [], "name=PID"),
        (["pg=abc"], [], "not a process id"),
        (["pg=0"], [], "not a process id"),
        (["bad name=1"], [], "letters, digits"),
        (["cqrs-load=1"], [], "load generator's own"),
        ([], ["pg"], "name=REGEX"),
        ([], ["pg=("], "not a regular expression"),
        ([], ["pg=a", "pg=b"], "twice"),
    ],
)
def test_bad_cpu_flags_are_config_errors(pids: list[str], patterns: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_cpu_pids(pids)
        parse_cpu_patterns(patterns)


def test_cli_flags_reach_the_config_and_its_description() -> None:
    args = build_parser().parse_args(
        ["load", "--duration", "1", "--cpu-pids", "pg=10,pg=11", "--cpu-process", "proj=-m projector"]
    )
    config = config_from_args(args)
    assert config.cpu_pids == {"pg": (10, 11)} and config.cpu_patterns == {"proj": "-m projector"}
    assert config.measures_cpu and not LoadConfig(duration=1).measures_cpu
    described = config.describe()
    assert described["cpu_pids"] == {"pg": "10+11"} and described["cpu_process_patterns"] == {"proj": "-m projector"}
    assert LoadConfig(duration=1).describe()["cpu_pids"] is None


def test_groups_resolve_real_processes_and_add_the_load_generator() -> None:
    marker = f"cqrs-cpu-marker-{uuid.uuid4().hex}"
    # Started through a shell that exits at once: the sleeper is then no descendant of ours (ours never match).
    sleeper = subprocess.run(
        ["sh", "-c", f'{sys.executable} -c "import time; time.sleep(60)" {marker} >/dev/null 2>&1 & echo $!'],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    pid = int(sleeper.stdout)
    try:
        config = LoadConfig(duration=1, cpu_pids={"me": (os.getpid(),)}, cpu_patterns={"sleeper": marker})
        assert cpu_groups_of(config) == {"me": (os.getpid(),), "sleeper": (pid,), SELF: (os.getpid(),)}
        assert cpu_groups_of(LoadConfig(duration=1)) == {}
        with pytest.raises(LoadSetupError, match="no process's command line matches"):
            cpu_groups_of(LoadConfig(duration=1, cpu_patterns={"x": f"{marker}-nothing"}))
        # Our own command line never matches (it may well name the pattern).
        own = re.escape(read_cmdlines()[os.getpid()])
        with pytest.raises(LoadSetupError, match="no process's command line matches"):
            cpu_groups_of(LoadConfig(duration=1, cpu_patterns={"x": f"^{own}$"}))
    finally:
        os.kill(pid, signal.SIGKILL)


def _snapshot(at: float, **cpu_s: float) -> Snapshot:
    return Snapshot(at, {name: GroupSample(v, frozenset({(1, 1)}), True) for name, v in cpu_s.items()})


def test_usage_totals_and_per_second_trace_come_from_the_snapshots() -> None:
    snapshots = [
        _snapshot(10.0, svc=1.0, db=5.0),
        _snapshot(11.0, svc=1.5, db=5.25),
        _snapshot(12.5, svc=2.5, db=5.25),
    ]
    usage = usage_from(snapshots, {"svc": (1,), "db": (2,)})
    assert usage.window_s == pytest.approx(2.5)
    assert usage.cpu_s == {"svc": pytest.approx(1.5), "db": pytest.approx(0.25)}
    assert [p.t for p in usage.timeline] == [pytest.approx(1.0), pytest.approx(2.5)]
    assert usage.timeline[1].cores == {"svc": pytest.approx(1.0 / 1.5), "db": pytest.approx(0.0)}
    data = usage.to_json({"requests": 500, "commands": 300, "queries": 200})
    svc = data["processes"]["svc"]
    assert svc["pids"] == [1] and svc["cores"] == pytest.approx(0.6)
    assert svc["per_1000"] == {"requests": 3.0, "commands": 5.0, "queries": 7.5}
    assert per_thousand(0.5, 0) is None and per_thousand(None, 10) is None


def _encoded(*seconds: float) -> bytes:
    h = hist.new_histogram()
    for s in seconds:
        hist.record_seconds(h, s)
    return hist.encode(h)


def _report_with_cpu() -> tuple[CpuUsage, LoadReport]:
    result = WorkerResult(
        worker_id=0, elapsed_s=2.0, dropped=0,
        rpcs={"CreateOrder": RpcResult(300, {}, _encoded(0.005)), "GetOrder": RpcResult(150, {}, _encoded(0.001))},
        ttq_histogram=_encoded(0.02), ttq_timeouts=0, ttq_skipped=0, ttq_polls=50, fallbacks=0, evicted=0,
        pool_size=0,
    )  # fmt: skip
    usage = usage_from(
        [_snapshot(0.0, command_service=0.0, **{SELF: 0.0}), _snapshot(2.0, command_service=0.6, **{SELF: 0.2})],
        {"command_service": (1,), SELF: (2,)},
    )
    return usage, build_report(LoadConfig(duration=2).describe(), [result], cpu=usage)


def test_report_gets_a_cpu_section_summary_table_and_chart(tmp_path: Path) -> None:
    usage, report = _report_with_cpu()
    assert usage.cpu_s["command_service"] == pytest.approx(0.6)
    write_report(report, tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["charts"] == {"latency": "latency.png", "lag": "lag.png", "cpu": "cpu.png"}
    assert (tmp_path / "cpu.png").stat().st_size > 0
    section = data["cpu"]
    assert section["operations"] == {"requests": 500, "commands": 300, "queries": 200}  # probes are queries
    assert section["processes"]["command_service"]["per_1000"] == {"requests": 1.2, "commands": 2.0, "queries": 3.0}
    summary = (tmp_path / "summary.md").read_text()
    assert "## CPU by process" in summary
    assert "| command_service | 1 | 0.6 | 0.3 | 1.2 | 2 | 3 |" in summary
    assert "| cqrs-load | 2 | 0.2 | 0.1 | 0.4 | 0.667 | 1 |" in summary
    write_report(report, tmp_path / "bare", charts=False)
    assert json.loads((tmp_path / "bare" / "report.json").read_text())["charts"]["cpu"] is None


def test_report_without_cpu_keeps_its_shape() -> None:
    _, report = _report_with_cpu()
    report.cpu = None
    data = report.to_json()
    assert "cpu" not in data and "## CPU by process" not in render_summary(report)


async def test_recorder_samples_from_the_start_until_finished() -> None:
    recorder = CpuRecorder({"me": (os.getpid(),)}, interval=0.1)
    started = asyncio.Event()
    recorder.start(started)
    await asyncio.sleep(0.05)
    assert recorder.snapshots == []  # nothing before the workers start
    started.set()
    await asyncio.sleep(0.05)
    burn_from = time.process_time()
    while time.process_time() - burn_from < 0.3:
        pass  # blocks the loop on purpose: the samples are late, their CPU is not
    await asyncio.sleep(0.15)
    usage = await recorder.finish()
    assert usage is not None
    spent = usage.cpu_s["me"]
    assert spent is not None and spent >= 0.28
    assert len(usage.timeline) >= 2 and usage.timeline[-1].t == pytest.approx(usage.window_s)
    assert await CpuRecorder({"me": (os.getpid(),)}).finish() is None  # never started: no section
