"""The merged result of a load run: report.json (a fixed schema that `make bench` parses) and summary.md."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cqrsctl.load import histograms as hist
from cqrsctl.load.collect import TimelinePoint
from cqrsctl.load.config import COMMAND_RPCS, QUERY_RPCS
from cqrsctl.load.cpu import CpuUsage, summary_lines
from cqrsctl.load.messages import RpcResult, WorkerResult

LATENCY_KEYS: Final = ("p50", "p90", "p99", "p99_9", "max")
CHART_FILES: Final = {"latency": "latency.png", "lag": "lag.png"}
CPU_CHART_FILE: Final = "cpu.png"  # only when the run recorded CPU (`cpu` then appears in report.json and charts)


@dataclass
class RpcStats:
    """One RPC (or all commands / all queries) over the whole run. `errors_by_code` holds real errors only: reads of
    the run's own writes that the read model did not show yet are `not_yet_visible` (see `cqrsctl.load.outcome`)."""

    count: int
    errors_by_code: dict[str, int]
    histogram: hist.Histogram
    not_yet_visible: int = 0

    @property
    def errors(self) -> int:
        return sum(self.errors_by_code.values())

    def to_json(self, duration_s: float) -> dict[str, Any]:
        return {
            "count": self.count,
            "errors_by_code": dict(sorted(self.errors_by_code.items())),
            "not_yet_visible": self.not_yet_visible,
            "throughput_rps": _rate(self.count, duration_s),
            "latency_ms": hist.summary_ms(self.histogram),
        }


def merge_rpc_stats(parts: Iterable[RpcResult | RpcStats]) -> RpcStats:
    """Adds up counts, error and not-yet-visible counts and histograms (encoded ones from workers, or already merged
    ones)."""
    total = RpcStats(0, {}, hist.new_histogram())
    errors: Counter[str] = Counter()
    for part in parts:
        total.count += part.count
        total.not_yet_visible += part.not_yet_visible
        errors.update(part.errors_by_code)
        source = hist.decode(part.histogram) if isinstance(part, RpcResult) else part.histogram
        hist.merge_into(total.histogram, source)
    total.errors_by_code = dict(errors)
    return total


@dataclass
class LoadReport:
    """Everything a run measured. `to_json()` is the report.json schema; the rest feeds the summary and charts."""

    config: dict[str, Any]
    duration_s: float
    rpcs: dict[str, RpcStats]
    commands: RpcStats
    queries: RpcStats
    dropped: int
    ttq: hist.Histogram
    ttq_timeouts: int
    ttq_skipped: int = 0
    ttq_polls: int = 0
    fallbacks: int = 0
    timeline: list[TimelinePoint] = field(default_factory=list)
    charts: dict[str, str | None] = field(default_factory=lambda: dict.fromkeys(CHART_FILES))
    cpu: CpuUsage | None = None

    @property
    def requests(self) -> int:
        return self.commands.count + self.queries.count

    @property
    def errors(self) -> int:
        return self.commands.errors + self.queries.errors

    @property
    def not_yet_visible(self) -> int:
        return self.commands.not_yet_visible + self.queries.not_yet_visible

    @property
    def throughput_rps(self) -> float:
        return _rate(self.requests, self.duration_s)

    def operations(self) -> dict[str, int]:
        """What the services served during the run, for CPU per 1,000 operations: the time-to-queryable probes
        are GetOrder calls the query service answers, so they count as queries."""
        queries = self.queries.count + self.ttq_polls
        return {"requests": self.commands.count + queries, "commands": self.commands.count, "queries": queries}

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "config": self.config,
            "duration_s": round(self.duration_s, 3),
            "totals": {
                "requests": self.requests,
                "errors": self.errors,
                "not_yet_visible": self.not_yet_visible,
                "throughput_rps": self.throughput_rps,
                "dropped": self.dropped,
            },
            "rpcs": {name: stats.to_json(self.duration_s) for name, stats in sorted(self.rpcs.items())},
            "commands": self.commands.to_json(self.duration_s),
            "queries": self.queries.to_json(self.duration_s),
            "time_to_queryable_ms": {
                "count": hist.count(self.ttq),
                "timeouts": self.ttq_timeouts,
                "skipped": self.ttq_skipped,
                "probe_calls": self.ttq_polls,
            }
            | hist.summary_ms(self.ttq),
            "charts": dict(self.charts),
        }
        if self.cpu is not None:
            data["cpu"] = self.cpu.to_json(self.operations())
        return data


def build_report(
    config: Mapping[str, Any],
    results: Sequence[WorkerResult],
    timeline: Sequence[TimelinePoint] = (),
    cpu: CpuUsage | None = None,
) -> LoadReport:
    """Merges the workers' results; the run's duration is the longest worker's (they start together)."""
    names = sorted({name for r in results for name in r.rpcs})
    rpcs = {name: merge_rpc_stats(r.rpcs[name] for r in results if name in r.rpcs) for name in names}
    return LoadReport(
        config=dict(config),
        duration_s=max((r.elapsed_s for r in results), default=0.0),
        rpcs=rpcs,
        commands=merge_rpc_stats(s for n, s in rpcs.items() if n in COMMAND_RPCS),
        queries=merge_rpc_stats(s for n, s in rpcs.items() if n in QUERY_RPCS),
        dropped=sum(r.dropped for r in results),
        ttq=hist.merged(r.ttq_histogram for r in results),
        ttq_timeouts=sum(r.ttq_timeouts for r in results),
        ttq_skipped=sum(r.ttq_skipped for r in results),
        ttq_polls=sum(r.ttq_polls for r in results),
        fallbacks=sum(r.fallbacks for r in results),
        timeline=list(timeline),
        cpu=cpu,
    )


def _setting(value: object) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in value.items())
    return str(value)


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2) if seconds > 0 else 0.0


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def render_summary(report: LoadReport) -> str:
    """summary.md: one table per section."""
    data = report.to_json()
    cfg = report.config
    out = ["# Load run", "", "## Configuration", ""]
    out += _table(["setting", "value"], ((k, f"`{_setting(v)}`") for k, v in cfg.items() if v is not None))
    totals = data["totals"]
    out += ["", "## Totals", ""]
    out += _table(
        ["duration (s)", "requests", "errors", "not yet visible", "throughput (req/s)", "dropped arrivals"],
        [
            (
                f"{report.duration_s:.2f}",
                totals["requests"],
                totals["errors"],
                totals["not_yet_visible"],
                totals["throughput_rps"],
                totals["dropped"],
            )
        ],
    )
    out += ["", "## Latency by RPC (ms)", ""]
    rows = []
    entries = [*data["rpcs"].items(), ("**commands**", data["commands"]), ("**queries**", data["queries"])]
    for name, entry in entries:
        lat = entry["latency_ms"]
        rows.append([name, entry["count"], entry["throughput_rps"], *(f"{lat[k]:.2f}" for k in LATENCY_KEYS)])
    out += _table(["rpc", "count", "req/s", "p50", "p90", "p99", "p99.9", "max"], rows)
    out += ["", "## Errors by gRPC status code", ""]
    error_rows = [
        (name, code, n) for name, entry in data["rpcs"].items() for code, n in entry["errors_by_code"].items()
    ]
    out += _table(["rpc", "code", "count"], error_rows or [("(none)", "", 0)])
    ttq = data["time_to_queryable_ms"]
    out += ["", "## Time to queryable (ms)", ""]
    out += [
        "From a sampled command's reply until a GetOrder carrying the reply's consistency token answers: the query "
        "service waits until the read model reflects the command (read-your-writes), so this is what a client "
        f"waiting for its own write sees. The probes made {report.ttq_polls:,} GetOrder calls (not counted in the "
        "query figures above).",
        "",
    ]
    out += _table(
        ["measured", "timeouts", "skipped (probe limit)", "p50", "p90", "p99", "p99.9", "max"],
        [(ttq["count"], ttq["timeouts"], report.ttq_skipped, *(f"{ttq[k]:.2f}" for k in LATENCY_KEYS))],
    )
    if "cpu" in data:
        out += ["", "## CPU by process", "", *summary_lines(data["cpu"])]
    charts = [f"![{name}]({path})" for name, path in report.charts.items() if path]
    if charts:
        out += ["", "## Charts", "", *charts]
    notes = []
    if report.not_yet_visible:
        notes.append(_not_yet_visible_note(report.not_yet_visible, cfg.get("read_consistency")))
    if report.fallbacks:
        notes.append(f"{report.fallbacks} operations found no pooled order in a fitting state and sent CreateOrder.")
    if report.dropped:
        notes.append(
            f"{report.dropped} open-loop arrivals were dropped because the in-flight limit per worker was reached: "
            "the target rate was above what the system (or this client) sustained."
        )
    if notes:
        out += ["", "## Notes", "", *(f"- {n}" for n in notes)]
    return "\n".join(out) + "\n"


def _not_yet_visible_note(count: int, read_consistency: object) -> str:
    lag = f"{count} reads of orders this run wrote came before the read model showed the write"
    apart = "replication lag, counted as not yet visible and not as errors."
    if read_consistency == "token":
        return (
            f"{lag}: they carried the write's consistency token and the query service's wait for it ran out "
            f"(UNAVAILABLE after CQRS_QUERY_MAX_WAIT_SECONDS, or near --deadline); {apart}"
        )
    return (
        f"{lag} (NOT_FOUND): {apart} Reads without a consistency token are eventually consistent (GetOrder prefers "
        "orders older than 1 s); `--read-consistency token` makes them wait for their write."
    )


def write_report(report: LoadReport, out_dir: Path, *, charts: bool = True) -> None:
    """Writes report.json, summary.md and (unless `charts` is False) latency.png, lag.png and, when the run
    recorded CPU, cpu.png into `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = dict(CHART_FILES)
    if report.cpu is not None:
        files["cpu"] = CPU_CHART_FILE
    if charts:
        from cqrsctl.load.charts import draw_cpu_chart, draw_lag_chart, draw_latency_chart

        draw_latency_chart(report.timeline, out_dir / CHART_FILES["latency"])
        draw_lag_chart(report.ttq, report.ttq_timeouts, out_dir / CHART_FILES["lag"])
        if report.cpu is not None:
            draw_cpu_chart(report.cpu, out_dir / CPU_CHART_FILE)
        report.charts = dict(files)
    else:
        report.charts = dict.fromkeys(files)
    (out_dir / "report.json").write_text(json.dumps(report.to_json(), indent=2) + "\n")
    (out_dir / "summary.md").write_text(render_summary(report))
