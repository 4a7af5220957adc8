"""Smoke test of `python -m bench.view_growth`: it runs against its own MongoDB-wire server and measures what it
says. The timings are not asserted (a benchmark is not a test), only that each size was measured on data of that
size: the day's shards hold more at the larger size (and much less once the sweeper forgot the covered tags), and
every measured call took time (the increment asserts that it was one)."""

from __future__ import annotations

import asyncio

from bench.view_growth import run


def test_each_size_is_measured_on_data_of_that_size() -> None:
    rows = asyncio.run(run([20, 200], repeats=2))
    assert [row[0] for row in rows] == [20.0, 200.0]
    (_, _, small_wall, small_kb, _, _, _, _, small_stats_wall, _, small_inc_wall) = rows[0]
    (_, _, large_wall, large_kb, _, large_swept_wall, large_swept_kb, _, large_stats_wall, _, large_inc_wall) = rows[1]
    assert large_kb > 2 * small_kb  # the tags of ten times as many facts
    assert large_swept_kb < large_kb / 2  # forgotten once their checkpoints covered them
    walls = (
        small_wall,
        large_wall,
        large_swept_wall,
        small_stats_wall,
        large_stats_wall,
        small_inc_wall,
        large_inc_wall,
    )
    assert min(walls) > 0
