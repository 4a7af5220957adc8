"""`make bench`'s table states issue 12's targets for the system rows it judges."""

from __future__ import annotations

from bench.report import Row
from bench.table import all_rows


def _row(rows: list[Row], prefix: str) -> Row:
    (row,) = [r for r in rows if r.name.startswith(prefix)]
    return row


def test_the_sustained_command_rate_is_judged_at_twelve_hundredths_of_the_echo_closed_loop() -> None:
    figures = {
        "echo": {"qps": 4000.0},
        "commands": {"best": {"achieved": 500.0, "p99_ms": 20.0}},
    }
    row = _row(all_rows(figures, workers=2, concurrency=32), "sustained command rate")
    assert (row.ratio, row.target, row.verdict) == (0.125, ">= 0.12x", "met")

    figures["commands"] = {"best": {"achieved": 460.0, "p99_ms": 20.0}}
    row = _row(all_rows(figures, workers=2, concurrency=32), "sustained command rate")
    assert (row.target, row.verdict) == (">= 0.12x", "not met")


def test_the_sales_tag_sweep_is_shown_as_background_work_not_as_a_cost_per_event_applied() -> None:
    stage = {"process": "projector", "histogram": "h", "count": 0, "mean_ms": 0.0, "p99_ms": 0.0}
    step = {
        "rate": 100.0,
        "stages": [
            {**stage, "stage": "", "count": 1000, "mean_ms": 40.0},
            {**stage, "stage": "mongodb bulk_write", "count": 400, "mean_ms": 9.0},
            {**stage, "stage": "mongodb sales_tags_sweep", "count": 1, "mean_ms": 1500.0},
        ],
    }
    rows = all_rows({"ttq_fixed": step}, workers=2, concurrency=32)
    batch_call = _row(rows, "at 100 cmds/s: projector mongodb bulk_write")
    sweep = _row(rows, "at 100 cmds/s: projector mongodb sales_tags_sweep")
    assert batch_call.note == "400 calls, 3.60 ms per event applied"
    assert "per event applied" not in sweep.note and "background" in sweep.note
