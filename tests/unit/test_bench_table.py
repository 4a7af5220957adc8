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
