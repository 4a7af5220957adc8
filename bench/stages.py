"""The time-to-queryable breakdown of a bench step: the stage histograms (`core.stage_metrics`) of the relay
(command_service's /metrics), the projector and the query service's read-your-writes waiter, scraped before and
after the step; the difference is the step's.
The projector's MongoDB calls (`cqrs_dependency_call_seconds{dependency="mongodb"}`, one stage per operation) come
after the path's stages: what its `apply` stage is made of."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from cqrsctl.status import metrics_text

# (process, histogram) whose stages make up the path from commit to queryable, in path order.
HISTOGRAMS: tuple[tuple[str, str], ...] = (
    ("command_service", "cqrs_relay_stage_seconds"),
    ("projector", "cqrs_projector_stage_seconds"),
    ("projector", "cqrs_projection_lag_seconds"),
    ("query_service", "cqrs_query_stage_seconds"),
    ("projector", "cqrs_dependency_call_seconds"),
)
DEPENDENCY_HISTOGRAM = "cqrs_dependency_call_seconds"
BROKEN_DOWN_DEPENDENCY = "mongodb"  # a NATS fetch is mostly a long poll waiting for messages: not a cost
STAGE_ORDER = (
    "commit_to_read", "publish", "delete", "relay_to_stream", "stream_to_fetch", "apply", "settle", "",
    "checkpoint_to_seen", "consistency_wait",
)  # fmt: skip

# (histogram, stage) -> {"count": n, "sum": s, "buckets": {le: cumulative count}}
Scrape = dict[tuple[str, str], dict[str, object]]


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    """The stage histograms of one /metrics page."""
    return parse(metrics_text(url, timeout))


def parse(text: str) -> Scrape:
    """The stage histograms of a /metrics page's text."""
    wanted = {name for _, name in HISTOGRAMS}
    out: Scrape = {}
    for family in text_string_to_metric_families(text):
        if family.name not in wanted:
            continue
        for sample in family.samples:
            if family.name == DEPENDENCY_HISTOGRAM:
                if sample.labels.get("dependency") != BROKEN_DOWN_DEPENDENCY:
                    continue
                key = (family.name, f"{BROKEN_DOWN_DEPENDENCY} {sample.labels.get('operation', '')}")
            else:
                key = (family.name, sample.labels.get("stage", ""))
            entry = out.setdefault(key, {"count": 0.0, "sum": 0.0, "buckets": {}})
            if sample.name.endswith("_count"):
                entry["count"] = sample.value
            elif sample.name.endswith("_sum"):
                entry["sum"] = sample.value
            elif sample.name.endswith("_bucket"):
                buckets = entry["buckets"]
                assert isinstance(buckets, dict)
                buckets[float(sample.labels["le"])] = sample.value
    return out


@dataclass(frozen=True)
class Stage:
    process: str
    histogram: str
    stage: str  # "" for the projection lag (the whole path); "mongodb <operation>" for a MongoDB call
    count: int
    mean_ms: float
    p99_ms: float  # upper bound of the bucket holding the 99th percentile (inf: beyond the last bucket)


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def breakdown(before: Mapping[str, Scrape], after: Mapping[str, Scrape]) -> list[Stage]:
    """Per stage, what happened between two scrapes of each process (`{process: scrape}`), in path order."""
    stages: list[Stage] = []
    for process, histogram in HISTOGRAMS:
        new, old = after.get(process, {}), before.get(process, {})
        for (name, stage), entry in new.items():
            if name != histogram:
                continue
            prior = old.get((name, stage), {})
            count = _number(entry["count"]) - _number(prior.get("count"))
            if count <= 0:
                continue
            total = _number(entry["sum"]) - _number(prior.get("sum"))
            now, then = entry["buckets"], prior.get("buckets") or {}
            assert isinstance(now, dict) and isinstance(then, dict)
            cumulative = {le: _number(n) - _number(then.get(le)) for le, n in now.items()}
            p99 = next((le for le, n in sorted(cumulative.items()) if n >= 0.99 * count), math.inf)
            stages.append(Stage(process, histogram, stage, int(count), 1000 * total / count, 1000 * p99))
    # The path in order, then the MongoDB calls, the costliest first.
    return sorted(
        stages,
        key=lambda s: (STAGE_ORDER.index(s.stage), 0.0) if s.stage in STAGE_ORDER else (99, -s.count * s.mean_ms),
    )
