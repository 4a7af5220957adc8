"""`cqrs status`: one screen on replication lag for a running system, read from the services' /metrics.

Each side may be several replicas (comma-separated URLs). What a replica reads from a shared store (the outbox
backlog from PostgreSQL, the parked streams from MongoDB) is the same on every replica and shown once; what each
replica counts for itself (events applied, the lag histogram, the pending messages of the consumers it pulls from)
is added up.
"""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

LAG_METRIC = "cqrs_projection_lag_seconds"
PARKED_METRIC = "cqrs_projector_parked_streams"


@dataclass
class Scrape:
    """Samples of one /metrics page: name -> value, the lag histogram's cumulative buckets, parked streams by kind."""

    url: str
    error: str | None = None
    values: dict[str, float] = field(default_factory=dict)
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (upper bound, cumulative count)
    parked: dict[str, float] = field(default_factory=dict)

    def value(self, name: str, default: float = math.nan) -> float:
        return self.values.get(name, default)


def metrics_text(url: str, timeout: float) -> str:
    """The text of one /metrics page (raises the URL error)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def scrape(url: str, timeout: float = 3.0) -> Scrape:
    try:
        text = metrics_text(url, timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return Scrape(url, error=str(getattr(exc, "reason", exc)))
    return parse(url, text)


def parse(url: str, text: str) -> Scrape:
    result = Scrape(url)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{LAG_METRIC}_bucket":
                result.buckets.append((float(sample.labels["le"]), sample.value))
            elif sample.name == PARKED_METRIC and "kind" in sample.labels:
                result.parked[sample.labels["kind"]] = sample.value
            elif not sample.labels:
                result.values[sample.name] = sample.value
    result.buckets.sort()
    return result


def merged_buckets(scrapes: Sequence[Scrape]) -> list[tuple[float, float]]:
    """The replicas' lag histograms as one (cumulative counts added bound by bound)."""
    totals: dict[float, float] = {}
    for s in scrapes:
        for bound, count in s.buckets:
            totals[bound] = totals.get(bound, 0.0) + count
    return sorted(totals.items())


def histogram_quantile(q: float, buckets: list[tuple[float, float]]) -> float | None:
    """Prometheus-style quantile from cumulative buckets (linear within a bucket); None without observations."""
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds * 1000:.1f} ms"


def _up(flags: Sequence[float]) -> str:
    """'up' when every replica says so, else which of them say DOWN."""
    down = sum(1 for f in flags if f != 1)
    if not down:
        return "up"
    return "DOWN" if len(flags) == 1 else f"DOWN on {down} of {len(flags)} replicas"


def _heading(name: str, scrapes: Sequence[Scrape], describe: Callable[[Scrape], str]) -> list[str]:
    """The service's line; with several replicas, a line for each (`describe`: what it says of itself)."""
    if len(scrapes) == 1:
        only = scrapes[0]
        return [f"{name:<17}{only.url}"] + ([f"  unreachable: {only.error}"] if only.error else [])
    lines = [f"{name:<17}{len(scrapes)} replicas"]
    for s in scrapes:
        lines.append(f"  {s.url}  {'unreachable: ' + s.error if s.error else describe(s)}")
    return lines


def _flag(s: Scrape, name: str, yes: str, no: str) -> str:
    return yes if s.value(name) == 1 else no


def render_commands(scrapes: Sequence[Scrape]) -> list[str]:
    lines = _heading("command_service", scrapes, lambda s: "PostgreSQL " + _flag(s, "cqrs_postgres_up", "up", "DOWN"))
    read = [s for s in scrapes if not s.error]
    if read:
        lines.append(f"  event store (PostgreSQL)  {_up([s.value('cqrs_postgres_up') for s in read])}")
        # every replica reads the same outbox: its largest figures are the freshest
        backlog = max(s.value("cqrs_outbox_backlog") for s in read)
        oldest = max(s.value("cqrs_outbox_oldest_age_seconds") for s in read)
        lines.append(f"  outbox backlog            {backlog:.0f} events, oldest {oldest:.1f} s")
    return lines


def _describe_projector(s: Scrape) -> str:
    parts = [
        "MongoDB " + _flag(s, "cqrs_projector_mongo_up", "up", "DOWN"),
        _flag(s, "cqrs_projector_serving", "serving", "NOT serving"),
    ]
    if s.value("cqrs_projector_stream_partitions", 0.0) > 0:
        parts.append(f"{s.value('cqrs_projector_partitions_owned', 0.0):.0f} partitions")
    return ", ".join(parts)


def render_projectors(scrapes: Sequence[Scrape]) -> list[str]:
    lines = _heading("projector", scrapes, _describe_projector)
    read = [s for s in scrapes if not s.error]
    if not read:
        return lines
    lines.append(f"  read model (MongoDB)      {_up([s.value('cqrs_projector_mongo_up') for s in read])}")
    partitions = max(s.value("cqrs_projector_stream_partitions", 0.0) for s in read)
    if partitions > 0:
        owned = sum(s.value("cqrs_projector_partitions_owned", 0.0) for s in read)
        lines.append(f"  partitions owned          {owned:.0f} of {partitions:.0f}")
    # Partitioned, each replica pulls from its own consumers; otherwise every replica reports the one shared consumer.
    combine = sum if partitions > 0 else max
    pending = combine(s.value("cqrs_projector_consumer_pending") for s in read)
    ack_pending = combine(s.value("cqrs_projector_consumer_ack_pending") for s in read)
    lines.append(f"  consumer pending          {pending:.0f} (ack pending {ack_pending:.0f})")
    applied, duplicates, dead = (
        sum(s.value(name, 0.0) for s in read)
        for name in (
            "cqrs_projector_events_applied_total",
            "cqrs_projector_events_duplicate_total",
            "cqrs_projector_dead_letters_total",
        )
    )
    lines.append(f"  events applied            {applied:.0f} (duplicates {duplicates:.0f}, dead letters {dead:.0f})")
    kinds = {kind for s in read for kind in s.parked}
    parked = {kind: max(s.parked.get(kind, 0.0) for s in read) for kind in kinds}
    parked_total = sum(parked.values())
    detail = ", ".join(f"{kind} {n:.0f}" for kind, n in sorted(parked.items()) if n)
    lines.append(
        f"  parked streams            {parked_total:.0f}"
        + (f" ({detail}; `cqrs dead-letters list` shows them)" if parked_total else "")
    )
    buckets = merged_buckets(read)
    count = buckets[-1][1] if buckets else 0
    quantiles = ", ".join(
        f"p{int(q * 100) if q < 0.999 else 99.9} {_ms(histogram_quantile(q, buckets))}" for q in (0.5, 0.9, 0.99, 0.999)
    )
    lines.append(f"  lag commit -> applied     {quantiles}  over {count:.0f} events")
    return lines


def render(commands: Sequence[Scrape], projectors: Sequence[Scrape]) -> str:
    return "\n".join(["CQRS replication status", "", *render_commands(commands), "", *render_projectors(projectors)])


def urls(value: str) -> list[str]:
    """The comma-separated URLs of one option."""
    return [u.strip() for u in value.split(",") if u.strip()]


def run_status(command_metrics_urls: str, projector_metrics_urls: str) -> int:
    """Prints the screen; 1 when a replica's /metrics could not be read."""
    commands = [scrape(u) for u in urls(command_metrics_urls)]
    projectors = [scrape(u) for u in urls(projector_metrics_urls)]
    print(render(commands, projectors))
    return 1 if any(s.error for s in (*commands, *projectors)) else 0
