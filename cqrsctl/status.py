"""`cqrs status`: one screen on replication lag for a running system, read from the services' /metrics."""

from __future__ import annotations

import math
import urllib.error
import urllib.request
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

LAG_METRIC = "cqrs_projection_lag_seconds"


@dataclass
class Scrape:
    """Samples of one /metrics page: name -> value, and the lag histogram's cumulative buckets."""

    url: str
    error: str | None = None
    values: dict[str, float] = field(default_factory=dict)
    buckets: list[tuple[float, float]] = field(default_factory=list)  # (upper bound, cumulative count)


def metrics_text(url: str, timeout: float) -> str:
    """The text of one /metrics page (raises the URL error)."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return str(response.read().decode())


def scrape(url: str, timeout: float = 3.0) -> Scrape:
    result = Scrape(url)
    try:
        text = metrics_text(url, timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        result.error = str(getattr(exc, "reason", exc))
        return result
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"{LAG_METRIC}_bucket":
                result.buckets.append((float(sample.labels["le"]), sample.value))
            elif not sample.labels:
                result.values[sample.name] = sample.value
    result.buckets.sort()
    return result


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


def render(command: Scrape, projector: Scrape) -> str:
    lines = ["CQRS replication status", ""]
    lines.append(f"command_service  {command.url}")
    if command.error:
        lines.append(f"  unreachable: {command.error}")
    else:
        v = command.values
        lines.append(f"  event store (PostgreSQL)  {'up' if v.get('cqrs_postgres_up') == 1 else 'DOWN'}")
        lines.append(
            f"  outbox backlog            {v.get('cqrs_outbox_backlog', math.nan):.0f} events, "
            f"oldest {v.get('cqrs_outbox_oldest_age_seconds', math.nan):.1f} s"
        )
    lines.append("")
    lines.append(f"projector        {projector.url}")
    if projector.error:
        lines.append(f"  unreachable: {projector.error}")
    else:
        v = projector.values
        lines.append(f"  read model (MongoDB)      {'up' if v.get('cqrs_projector_mongo_up') == 1 else 'DOWN'}")
        lines.append(
            f"  consumer pending          {v.get('cqrs_projector_consumer_pending', math.nan):.0f} "
            f"(ack pending {v.get('cqrs_projector_consumer_ack_pending', math.nan):.0f})"
        )
        lines.append(
            f"  events applied            {v.get('cqrs_projector_events_applied_total', 0):.0f} "
            f"(duplicates {v.get('cqrs_projector_events_duplicate_total', 0):.0f}, "
            f"dead letters {v.get('cqrs_projector_dead_letters_total', 0):.0f})"
        )
        count = projector.buckets[-1][1] if projector.buckets else 0
        quantiles = ", ".join(
            f"p{int(q * 100) if q < 0.999 else 99.9} {_ms(histogram_quantile(q, projector.buckets))}"
            for q in (0.5, 0.9, 0.99, 0.999)
        )
        lines.append(f"  lag commit -> applied     {quantiles}  over {count:.0f} events")
    return "\n".join(lines)


def run_status(command_metrics_url: str, projector_metrics_url: str) -> int:
    command, projector = scrape(command_metrics_url), scrape(projector_metrics_url)
    print(render(command, projector))
    return 1 if command.error or projector.error else 0
