"""The scale-out rows of `make bench` (issue 13): figures beside the single owner's / replica's, CPU per process
group, where the limit was, and the small pieces the runs are built from."""

from __future__ import annotations

import math
from typing import Any

import pytest

from bench import scaleout
from bench.report import NOT_MEASURED, render_markdown, versus_row


def _run(
    by: str, n: int, operations: int, seconds: float, cpu_s: dict[str, float | None], busy: float
) -> dict[str, Any]:
    return {
        by: n,
        "operations": operations,
        "seconds": seconds,
        "rate": operations / seconds,
        "cpu": {"operations": operations, "unit": "x", "window_s": seconds, "cpu_s": cpu_s,
                "machine_busy_cores": busy, "cpus": 2},
    }  # fmt: skip


FIGURES: dict[str, Any] = {
    "scaleout_projector": {
        "events": 1000,
        "runs": [
            _run("owners", 1, 1000, 10.0, {"projectors": 2.0, "mongo": 9.5, "nats": 0.5}, 1.3),
            _run("owners", 2, 1000, 8.0, {"projectors": 2.4, "mongo": 9.8, "nats": 0.4}, 1.5),
            _run("owners", 4, 1000, 12.5, {"projectors": 3.0, "mongo": 9.9, "nats": 0.6}, 1.95),
        ],
    },
    "scaleout_commands": {
        "runs": [
            _run("replicas", 1, 1000, 5.0, {"command_services": 4.0, "postgres": 2.0, "nats": 0.2, "client": 1}, 1.9),
            _run("replicas", 2, 900, 5.0, {"command_services": 4.5, "postgres": 2.0, "nats": 0.2, "client": 1}, 2.0),
        ]
    },
}  # fmt: skip


def _row(rows: list[Any], start: str) -> Any:
    matching = [r for r in rows if r.name.startswith(start)]
    assert len(matching) == 1, [r.name for r in rows]
    return matching[0]


def test_each_count_is_beside_the_single_ones_figure_of_the_same_run() -> None:
    rows = scaleout.rows(FIGURES)
    one = _row(rows, "projector catch-up with 1 partition owner ")
    assert one.value == 100.0 and one.baseline is None and one.ratio is None
    two = _row(rows, "projector catch-up with 2 partition owners")
    assert two.baseline_name == "1 owner" and two.baseline == 100.0 and two.ratio == pytest.approx(1.25)
    four = _row(rows, "projector catch-up with 4 partition owners")
    assert four.ratio == pytest.approx(0.8)
    replicas = _row(rows, "command throughput, closed loop, 2 command_service replicas")
    assert replicas.baseline_name == "1 replica" and replicas.ratio == pytest.approx(0.9)
    # A finding, not a promise: no target, no verdict.
    assert {r.target for r in rows} == {""} and {r.verdict for r in rows} == {""}


def test_cpu_rows_per_group_per_count_beside_the_single_ones() -> None:
    rows = scaleout.rows(FIGURES)
    mongo_1 = _row(rows, "CPU per 1,000 events with 1 owner: MongoDB-wire server")
    assert mongo_1.value == pytest.approx(9.5) and mongo_1.baseline is None  # 9.5 s over 1,000 events
    projectors_4 = _row(rows, "CPU per 1,000 events with 4 owners: projectors (summed)")
    assert projectors_4.value == pytest.approx(3.0) and projectors_4.baseline == pytest.approx(2.0)
    assert projectors_4.ratio == pytest.approx(1.5) and projectors_4.unit == "s/1k"
    services_2 = _row(rows, "CPU per 1,000 commands with 2 replicas: command services (summed)")
    assert services_2.value == pytest.approx(5.0) and services_2.baseline == pytest.approx(4.0)
    for group in ("PostgreSQL", "nats-server", "client (bench process)"):
        _row(rows, f"CPU per 1,000 commands with 1 replica: {group}")
    # 3 rates + 3 x 3 CPU rows; 2 rates + 2 x 4 CPU rows.
    assert len(rows) == 12 + 10


def test_the_note_says_where_the_limit_was_from_the_numbers() -> None:
    rows = scaleout.rows(FIGURES)
    note = _row(rows, "projector catch-up with 4 partition owners").note
    assert note.startswith("1,000 events in 12.5s")
    assert "busiest: MongoDB-wire server at 0.79 cores" in note
    assert "machine 1.95 of 2 cores busy (saturated)" in note
    assert "saturated" not in _row(rows, "projector catch-up with 1 partition owner ").note


def test_without_figures_every_row_is_there_unmeasured() -> None:
    """The names do not depend on the figures: the smoke test finds every row even when a step failed."""
    rows = scaleout.rows({})
    assert [r.name for r in rows] == [r.name for r in scaleout.rows(FIGURES)]
    assert all(r.value is None and r.verdict == NOT_MEASURED for r in rows)
    assert "| 1 owner |" not in scaleout.render_table({})


def test_the_table_shows_cost_and_cores_of_each_group_per_run() -> None:
    table = scaleout.render_table(FIGURES)
    four = next(line for line in table.splitlines() if line.startswith("| 4 owners |"))
    cells = [c.strip() for c in four.strip("|").split("|")]
    # run, operations, seconds, rate, projectors, command services, MongoDB-wire, PostgreSQL, nats, client, machine
    assert cells == ["4 owners", "1,000", "12.5", "80/s", "3 (0.24)", "", "9.9 (0.79)", "", "0.6 (0.05)", "",
                     "1.95"]  # fmt: skip
    assert "| 2 replicas | 900 | 5.0 | 180/s |" in table
    markdown = render_markdown(["# t"], scaleout.rows(FIGURES), [], tables=[table])
    assert "| CPU per 1,000 events with 2 owners: nats-server | 0.4 s/1k | 1 owner: 0.5 s/1k | 0.80x |" in markdown


def test_a_group_not_measured_is_left_out_of_where_the_limit_was() -> None:
    figure = {"operations": 10, "window_s": 2.0, "cpu_s": {"mongo": None, "nats": 1.0}}
    assert scaleout.cores(figure) == {"nats": 0.5}
    assert scaleout.bottleneck(figure) == "busiest: nats-server at 0.50 cores"
    assert scaleout.bottleneck(None) == "" and scaleout.cores({"window_s": 0, "cpu_s": {}}) == {}


def test_versus_row_has_a_ratio_and_no_target() -> None:
    row = versus_row("s", "n", 50.0, "x/s", "base", 25.0)
    assert (row.ratio, row.target, row.verdict, row.baseline_unit) == (2.0, "", "", "x/s")
    assert versus_row("s", "n", None, "x/s", "base", 25.0).verdict == NOT_MEASURED
    assert versus_row("s", "n", 1.0, "x/s", "base", math.nan).ratio is None
    assert versus_row("s", "n", 1.0, "x/s").ratio is None


def test_machine_ticks_and_busy_cores() -> None:
    stat = "cpu  100 5 50 800 20 3 2 0 0 0\ncpu0 50 2 25 400 10 1 1 0 0 0\nintr 1 2 3\n"
    assert scaleout.machine_ticks(stat) == (160, 980)
    assert scaleout.busy_cores((160, 980), (260, 1180), cpus=2) == pytest.approx(1.0)
    assert scaleout.busy_cores((1, 1), (1, 1), cpus=2) is None
    busy, total = scaleout.machine_ticks()  # this machine's
    assert 0 <= busy <= total


def test_the_consumers_a_group_has_once_every_partition_is_owned() -> None:
    assert scaleout.group_names("d", 3) == {"d-p0", "d-p1", "d-p2", "d-strays"}
    assert scaleout.group_names("d", 0) == {"d"}


def test_a_catch_up_is_done_once_every_consumer_exists_with_nothing_left() -> None:
    expected = {"d-p0", "d-p1", "d-strays"}
    done = {"d-p0": (0, 0), "d-p1": (0, 0), "d-strays": (0, 0)}
    assert scaleout.backlog_left(done, expected) is None
    # A consumer not created yet may still hold the whole partition: not done, whatever the others say.
    assert scaleout.backlog_left({"d-p0": (0, 0), "d-strays": (0, 0)}, expected) == (
        "1 consumers not created yet, 0 pending, 0 un-acked"
    )
    assert scaleout.backlog_left({**done, "d-p1": (3, 2)}, expected) == (
        "0 consumers not created yet, 3 pending, 2 un-acked"
    )


def test_callers_are_split_evenly_over_the_addresses() -> None:
    assert scaleout.split(32, 2) == [16, 16]
    assert scaleout.split(5, 2) == [3, 2]
    assert scaleout.split(32, 1) == [32]


def test_overhead_names_the_parts_of_a_run_it_has_marks_for() -> None:
    assert scaleout.overhead([0.0, 1.0, 1.5, 4.0, 6.0]) == {
        "projectors_start": 1.0, "mongo_start": 0.5, "catch_up": 2.5, "stop": 2.0
    }  # fmt: skip
    assert scaleout.overhead([0.0, 1.25]) == {"projectors_start": 1.25}
