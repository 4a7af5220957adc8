"""The time-to-queryable breakdown of a bench step, from two scrapes of the stage histograms."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, generate_latest

from bench.stages import Scrape, breakdown, parse
from core.dependency_metrics import dependency_metrics


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


def test_the_projector_mongodb_calls_follow_the_path_costliest_first_and_other_dependencies_are_left_out() -> None:
    registry = CollectorRegistry()
    deps = dependency_metrics(registry)
    for operation, seconds, calls in (("find", 0.002, 3), ("bulk_write", 0.01, 2), ("checkpoints", 0.004, 1)):
        for _ in range(calls):
            deps.seconds.labels("mongodb", operation).observe(seconds)
    deps.seconds.labels("nats", "fetch").observe(0.9)  # a long poll: not a cost of the apply
    lag = "cqrs_projection_lag_seconds"
    before: dict[str, Scrape] = {"projector": {}}
    after: dict[str, Scrape] = {"projector": parse(generate_latest(registry).decode())}
    after["projector"][(lag, "")] = _entry(5, 0.5, {0.1: 5, math.inf: 5})
    stages = breakdown(before, after)
    assert [(s.stage, s.count) for s in stages] == [
        ("", 5), ("mongodb bulk_write", 2), ("mongodb find", 3), ("mongodb checkpoints", 1),
    ]  # fmt: skip
    assert math.isclose(stages[1].mean_ms, 10.0) and stages[1].p99_ms == 10.0  # the 10 ms bucket holds both


def test_the_query_services_wait_follows_the_projection_lag() -> None:
    query = "cqrs_query_stage_seconds"
    after: dict[str, Scrape] = {
        "query_service": {
            (query, "consistency_wait"): _entry(4, 0.4, {0.1: 4, math.inf: 4}),
            (query, "checkpoint_to_seen"): _entry(4, 0.04, {0.01: 3, 0.025: 4, math.inf: 4}),
        },
        "projector": {("cqrs_projection_lag_seconds", ""): _entry(4, 0.2, {0.1: 4, math.inf: 4})},
    }
    stages = breakdown({}, after)
    assert [(s.process, s.stage) for s in stages] == [
        ("projector", ""), ("query_service", "checkpoint_to_seen"), ("query_service", "consistency_wait"),
    ]  # fmt: skip
    assert math.isclose(stages[1].mean_ms, 10.0) and stages[1].p99_ms == 25.0
