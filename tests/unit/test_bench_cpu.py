"""CPU accounting of process trees (/proc) and the bench's CPU cost rows: real processes burning known CPU time,
synthetic /proc tables for the edge cases, and the verdicts of the cost targets (lower is better)."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import cpu
from bench.report import cost_row, ratio_row, render_markdown
from cqrsctl.load import procstat
from cqrsctl.load.procstat import ProcStat

TICK_S = 1.0 / procstat.CLOCK_TICKS

# A process tree with a known CPU bill: the root starts child A (burns A_S of CPU, exits, is waited for) and
# child B (burns B_S, says so, then sleeps until stdin closes), prints both figures and its own CPU, then waits.
A_S, B_S = 0.3, 0.2
BURNER = """
import subprocess, sys, time
def burn(seconds):
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass
    return time.process_time() - start
if sys.argv[1] == "burn-and-exit":
    print(burn(float(sys.argv[2])), flush=True)
elif sys.argv[1] == "burn-and-wait":
    print(burn(float(sys.argv[2])), flush=True)
    sys.stdin.read()
else:
    a = subprocess.run([sys.executable, __file__, "burn-and-exit", sys.argv[2]], capture_output=True, text=True)
    b = subprocess.Popen([sys.executable, __file__, "burn-and-wait", sys.argv[3]], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    b_spent = b.stdout.readline()
    print(float(a.stdout), float(b_spent), time.process_time(), flush=True)
    sys.stdin.read()
    b.stdin.close()
    b.wait()
"""


def _burn_here(seconds: float) -> None:
    start = time.process_time()
    while time.process_time() - start < seconds:
        pass


def test_a_tree_is_billed_for_live_and_exited_descendants_and_nothing_else(tmp_path: Path) -> None:
    script = tmp_path / "burner.py"
    script.write_text(BURNER)
    root = subprocess.Popen(
        [sys.executable, str(script), "root", str(A_S), str(B_S)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        before = procstat.snapshot({"tree": (root.pid,), "test": (-1,)})
        _burn_here(0.2)  # this process is not in the tree: its CPU must not be billed to it
        assert root.stdout is not None
        a_spent, b_spent, root_cpu = map(float, root.stdout.readline().split())
        after = procstat.snapshot({"tree": (root.pid,), "test": (-1,)})
        used = procstat.used(before, after)
    finally:
        assert root.stdin is not None
        root.stdin.close()
        root.wait(timeout=30)
    assert a_spent >= A_S and b_spent >= B_S
    spent = used["tree"]
    assert spent is not None
    # At least both children (A exited: only its parent's cutime still has it), at most that plus the root's own
    # CPU (its start-up may partly precede the first snapshot) and the children's interpreter start-up.
    assert spent >= a_spent + b_spent - 2 * TICK_S, used
    assert spent <= a_spent + b_spent + root_cpu + 1.0, used
    assert used["test"] is None  # a root that is not running: unknown, not zero


def _stat(pid: int, ppid: int, ticks: int, start: int = 1) -> ProcStat:
    return ProcStat(pid=pid, ppid=ppid, start=start, ticks=ticks)


def test_stat_line_with_spaces_and_parentheses_in_the_name_is_parsed() -> None:
    fields = ["S", "7", *["0"] * 9, "100", "50", "3", "2", *["0"] * 4, "12345", "0"]
    stat = procstat.parse_stat(f"42 (odd) name (x)) {' '.join(fields)}")
    assert stat == ProcStat(pid=42, ppid=7, start=12345, ticks=155)


def test_groups_sum_descendants_once_and_a_restarted_root_is_unknown() -> None:
    table = {p.pid: p for p in (_stat(10, 1, 100), _stat(11, 10, 50), _stat(12, 11, 25), _stat(20, 1, 999))}
    first = procstat.snapshot({"pg": (10, 11), "other": (20,)}, table)  # 11 is below 10: counted once
    assert first.groups["pg"].cpu_s == pytest.approx(175 * TICK_S)
    later = {**table, 10: _stat(10, 1, 130), 12: _stat(12, 11, 45)}
    del later[11]  # exited and waited for by 10: its ticks now sit in 10's cutime, so 10 grew by them
    later[10] = _stat(10, 1, 100 + 30 + 50)
    later[12] = _stat(12, 10, 45)  # re-parented to 10
    used = procstat.used(first, procstat.snapshot({"pg": (10, 11), "other": (20,)}, later))
    assert used["other"] == pytest.approx(0.0)
    assert used["pg"] is None  # root 11 is gone: the group is no longer what was measured
    used = procstat.used(
        procstat.snapshot({"pg": (10,)}, table), procstat.snapshot({"pg": (10,)}, later)
    )  # fmt: skip
    assert used["pg"] == pytest.approx((30 + 20) * TICK_S)
    restarted = {**later, 10: _stat(10, 1, 5, start=999)}
    assert procstat.used(first, procstat.snapshot({"pg": (10, 11)}, restarted))["pg"] is None


def test_patterns_match_command_lines_but_never_the_caller_or_its_ancestors(tmp_path: Path) -> None:
    procs = {
        1: (0, "init"),
        5: (1, "bash -c cqrs load --cpu-process pg=postgres"),  # the shell that started us names the pattern
        6: (5, "python -m cqrsctl.main load --cpu-process pg=postgres"),  # ourselves
        7: (6, "python -c spawn_main postgres"),  # our worker
        30: (1, "/opt/pg/bin/postgres -D /data"),
        31: (30, "postgres: checkpointer"),
        40: (1, "python -m projector"),
    }
    for pid, (ppid, cmdline) in procs.items():
        folder = tmp_path / str(pid)
        folder.mkdir()
        fields = ["S", str(ppid), *["0"] * 9, "1", "1", "0", "0", *["0"] * 4, "1", "0"]
        (folder / "stat").write_text(f"{pid} (x) {' '.join(fields)}\n")
        (folder / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")
    groups = procstat.resolve({"proj": [40]}, {"pg": "postgres", "proj": r"-m projector$"}, own_pid=6, proc=tmp_path)
    assert groups == {"pg": (30,), "proj": (40,)}  # 31 is below 30: one root
    assert procstat.match(re.compile("postgres"), procstat.read_cmdlines(tmp_path), exclude={5, 6, 7}) == [30, 31]
    with pytest.raises(procstat.ProcessNotFound, match="mongod"):
        procstat.resolve({}, {"mongo": "mongod"}, own_pid=6, proc=tmp_path)
    with pytest.raises(procstat.ProcessNotFound, match="pid 99"):
        procstat.resolve({"x": [99]}, {}, own_pid=6, proc=tmp_path)


# ------------------------------------------------------------------------------------------------ bench rows


def _figure(operations: int, **cpu_s: float | None) -> dict[str, object]:
    return {"operations": operations, "unit": "ops", "window_s": 2.0, "cpu_s": cpu_s}


COMMAND_STEP = _figure(
    1500, command_service=0.6, postgres=0.3, nats=0.03, mongo=0.9, projector=0.9, query_service=0.01, client=0.2
)
FIGURES = {
    "echo": {"qps": 4000, "cpu": _figure(8000, echo_server=1.6, client=2.4)},  # 0.2 s / 1k RPCs
    "echo_at_rates": {  # open loop at the command and query rates: 0.25 and 0.4 s / 1k RPCs
        "commands": {"qps": 300.0, "cpu": _figure(600, echo_server=0.15, client=0.3)},
        "queries": {"qps": 2000.0, "cpu": _figure(4000, echo_server=1.6, client=1.0)},
    },
    "pg_single": {"rate": 10000, "cpu": _figure(20000, client=2.0, postgres=4.0)},
    "nats": {"rate": 30000, "cpu": _figure(60000, client=3.0, nats=1.2)},
    "mongo": {"cpu_upsert": _figure(2000, client=1.0, mongo=3.0), "cpu_find": _figure(1000, client=0.3, mongo=1.0)},
    "commands": {"best": {"achieved": 300.0, "cpu": COMMAND_STEP}},
    "projector": {"cpu": _figure(1000, projector=1.2, mongo=1.5, postgres=None)},
    "queries": {"cpu": _figure(4000, query_service=1.6, mongo=3.0, client=0.8)},
}


def test_cost_is_cpu_seconds_per_thousand_operations() -> None:
    assert cpu.cost(_figure(500, x=0.25), "x") == pytest.approx(0.5)
    assert cpu.cost(_figure(0, x=0.25), "x") is None
    assert cpu.cost(_figure(10, x=None), "x") is None
    assert cpu.cost(None, "x") is None


def test_cost_rows_judge_at_most_ratios_against_the_same_run_baselines() -> None:
    rows = {row.name.split(" (")[0].split(" at ")[0]: row for row in cpu.cost_rows(FIGURES) if "beside" not in row.name}
    command = rows["command_service CPU per 1,000 commands"]
    assert command.value == pytest.approx(0.4) and command.baseline == pytest.approx(0.2)
    assert command.ratio == pytest.approx(2.0) and (command.target, command.verdict) == ("<= 3x", "met")
    projector = rows["projector CPU per 1,000 events"]
    assert projector.baseline == pytest.approx(0.5)  # the bulk-upsert client's CPU per 1,000 upserts
    assert projector.ratio == pytest.approx(2.4) and projector.verdict == "not met"
    query = rows["query_service CPU per 1,000 queries"]
    assert query.ratio == pytest.approx(2.0) and (query.target, query.verdict) == ("<= 2x", "met")
    # The same costs beside the echo server measured at the services' own rates.
    by_name = {row.name: row for row in cpu.cost_rows(FIGURES)}
    assert by_name[
        "gRPC echo server CPU per 1,000 RPCs, open loop at 300 req/s (the sustained command rate)"
    ].value == (pytest.approx(0.25))
    assert by_name["gRPC echo server CPU per 1,000 RPCs, open loop at 2,000 req/s (the query rate)"].value == (
        pytest.approx(0.4)
    )
    command_matched = by_name[
        "command_service CPU per 1,000 commands at 300 cmds/s, beside the echo server at that rate"
    ]
    assert command_matched.baseline == pytest.approx(0.25) and command_matched.ratio == pytest.approx(1.6)
    query_matched = by_name["query_service CPU per 1,000 queries, beside the echo server at the query rate"]
    assert query_matched.baseline == pytest.approx(0.4) and query_matched.ratio == pytest.approx(1.0)
    assert query_matched.verdict == "met"
    postgres = rows["PostgreSQL CPU per 1,000 commands"]
    assert postgres.ratio == pytest.approx(1.0) and (postgres.target, postgres.verdict) == ("", "")
    assert rows["load generator CPU per 1,000 commands"].baseline == pytest.approx(0.3)
    missing = cpu.cost_rows({})
    assert all(row.verdict == "not measured" for row in missing)


def test_cost_row_verdicts_and_ratio_row_stays_at_least() -> None:
    assert cost_row("s", "n", 3.0, "s/1k", "b", 1.0, "s/1k", at_most=3).verdict == "met"
    assert cost_row("s", "n", 3.1, "s/1k", "b", 1.0, "s/1k", at_most=3).verdict == "not met"
    assert cost_row("s", "n", 3.1, "s/1k", "b", None, "s/1k", at_most=3).verdict == "not measured"
    assert cost_row("s", "n", None, "s/1k").verdict == "not measured"
    assert cost_row("s", "n", 0.5, "s/1k").verdict == ""
    assert ratio_row("s", "n", 3.0, "/s", "b", 1.0, 3).verdict == "met"  # higher is better there
    table = render_markdown([], [cost_row("s", "n", 0.0123, "s/1k", "echo", 0.2, "s/1k", at_most=3)], [])
    assert "| 0.0123 s/1k | echo: 0.2 s/1k | 0.06x | <= 3x | met |" in table


def test_cpu_table_lists_every_measurement_with_per_thousand_costs() -> None:
    table = cpu.render_table(FIGURES)
    lines = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines() if line.startswith("| ")}
    assert "| echo server | client |" in lines["measurement"]
    echo = lines["gRPC echo (per RPC)"].split(" | ")
    assert "| 600 | 2.0 |" in lines["gRPC echo, open loop at 300 req/s (per RPC)"]
    assert "| 4,000 | 2.0 |" in lines["gRPC echo, open loop at 2,000 req/s (per RPC)"]
    assert echo[1:4] == ["8,000", "2.0", ""] and echo[-2:] == ["0.2", "0.3 |"]
    command = lines["system: sustained commands at 300 cmds/s (per command)"]
    assert "| 1,500 | 2.0 | 0.4 | 0.6 | 0.00667 | 0.2 | 0.02 | 0.6 |  | 0.133 |" in command
    assert "| n/a |" in lines["system: projector catch-up (per event)"]  # PostgreSQL measured, unknown
    assert "not measured" in lines["system: commands, as many queries and time-to-queryable probes (per command)"]


def test_load_report_cpu_becomes_a_bench_figure_with_the_load_generator_as_client() -> None:
    report = {
        "cpu": {
            "window_s": 5.0,
            "operations": {"requests": 1200, "commands": 1000, "queries": 200},
            "processes": {"command_service": {"cpu_s": 0.5}, "cqrs-load": {"cpu_s": 0.25}},
        }
    }
    figure = cpu.from_load_report(report, "commands", "commands")
    assert figure == {"operations": 1000, "unit": "commands", "window_s": 5.0,
                      "cpu_s": {"command_service": 0.5, "client": 0.25}}  # fmt: skip
    assert cpu.from_load_report({}, "commands", "commands") is None


def test_window_bills_this_process_as_the_client() -> None:
    with cpu.window({}) as spent:
        _burn_here(0.1)
    assert spent.cpu_s[cpu.CLIENT] == pytest.approx(0.1, abs=0.05)
    assert spent.figures(100, "x")["operations"] == 100


def test_budget_rows_sum_every_process_and_divide_the_cpus_by_it_beside_the_goal() -> None:
    step = _figure(1000, command_service=0.9, postgres=0.4, mongo=0.2, client=0.5)  # 2.0 CPU s per 1,000 commands
    best: dict[str, object] = {"achieved": 300.0, "cpu": step}
    figures = {"cpus": 2, "echo": {"qps": 4000.0}, "commands": {"best": best}}
    total, ceiling = cpu.budget_rows(figures, 0.12)
    assert total.value == pytest.approx(2.0) and total.name.startswith("every process together")
    # Two CPUs' whole time at 2 ms a command: 1,000 commands/s, beside 0.12 x 4,000 = 480.
    assert ceiling.value == pytest.approx(1000.0) and ceiling.baseline == pytest.approx(480.0)
    assert ceiling.ratio == pytest.approx(1000.0 / 480.0) and ceiling.verdict == ""
    assert "at most 4.17 CPU s per 1,000 commands on 2 CPUs" in ceiling.note
    # A process whose CPU is unknown leaves no sum, hence no ceiling: a partial sum would overstate it.
    best["cpu"] = _figure(1000, command_service=0.9, postgres=None)
    total, ceiling = cpu.budget_rows(figures, 0.12)
    assert total.value is None and ceiling.value is None and ceiling.ratio is None
    assert [row.value for row in cpu.budget_rows({}, 0.12)] == [None, None]
