"""The time-to-queryable breakdown of a bench step, from two scrapes of the stage histograms."""

from __future__ import annotations

import math

from bench.stages import Scrape, breakdown


def _entry(count: float, total: float, buckets: dict[float, float]) -> dict[str, object]:
    return {"count": count, "sum": total, "buckets": buckets}


def test_the_breakdown_is_the_difference_of_two_scrapes_in_path_order() -> None:
    relay = "cqrs_relay_stage_seconds"
    projector = "cqrs_projector_stage_seconds"
    before: dict[str, Scrape] = {
        "command_service": {(relay, "commit_to_read"): _entry(10, 1.0, {0.01: 5, 0.1: 10, math.inf: 10})},
        "projector": {(projector, "apply"): _entry(2, 0.2, {0.01: 0, 0.1: 2, math.inf: 2})},
    }
    after: dict[str, Scrape] = {
        "command_service": {(relay, "commit_to_read"): _entry(110, 3.0, {0.01: 103, 0.1: 110, math.inf: 110})},
        "projector": {
            (projector, "apply"): _entry(2, 0.2, {0.01: 0, 0.1: 2, math.inf: 2}),  # nothing new: left out
            (projector, "stream_to_fetch"): _entry(100, 0.5, {0.01: 90, 0.1: 100, math.inf: 100}),
        },
    }
    stages = breakdown(before, after)
    assert [(s.process, s.stage, s.count) for s in stages] == [
        ("command_service", "commit_to_read", 100), ("projector", "stream_to_fetch", 100),
    ]  # fmt: skip
    first, second = stages
    assert math.isclose(first.mean_ms, 20.0)  # 2 s over 100 events
    assert first.p99_ms == 100.0  # 98 of the 100 new ones within 10 ms: the 99th is in the 100 ms bucket
    assert math.isclose(second.mean_ms, 5.0) and second.p99_ms == 100.0
