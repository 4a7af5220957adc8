"""PNG charts of a load run, drawn with matplotlib's Agg backend (files only, never a display)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from cqrsctl.load import histograms as hist
from cqrsctl.load.collect import TimelinePoint
from cqrsctl.load.cpu import CpuUsage


def draw_latency_chart(timeline: Sequence[TimelinePoint], path: Path) -> None:
    """Per-second p50 and p99 of commands and queries, plus requests per second."""
    fig = Figure(figsize=(10, 6), layout="constrained")
    latency_ax, rate_ax = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    seconds = [p.second + 1 for p in timeline]  # plotted at the end of the second they cover
    series = [
        ("commands p50", [p.commands_p50 for p in timeline], "tab:blue", "--"),
        ("commands p99", [p.commands_p99 for p in timeline], "tab:blue", "-"),
        ("queries p50", [p.queries_p50 for p in timeline], "tab:orange", "--"),
        ("queries p99", [p.queries_p99 for p in timeline], "tab:orange", "-"),
    ]
    plotted = False
    for label, values, color, style in series:
        points = [(s, v) for s, v in zip(seconds, values, strict=True) if v is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            latency_ax.plot(xs, ys, style, color=color, marker=".", label=label)
            plotted = True
    if plotted:
        latency_ax.set_yscale("log")
        latency_ax.legend(loc="upper left")
    else:
        latency_ax.text(0.5, 0.5, "no requests completed", ha="center", va="center", transform=latency_ax.transAxes)
    latency_ax.set_ylabel("latency (ms)")
    latency_ax.set_title("Latency over time (per second)")
    latency_ax.grid(True, which="both", alpha=0.3)
    rate_ax.bar(seconds, [p.requests for p in timeline], width=0.8, color="tab:gray", label="requests")
    errors = [p.errors for p in timeline]
    unseen = [p.not_yet_visible for p in timeline]
    if any(errors):
        rate_ax.bar(seconds, errors, width=0.8, color="tab:red", label="errors")
    if any(unseen):  # stacked on the errors: reads of the run's own writes the read model did not show yet
        rate_ax.bar(seconds, unseen, bottom=errors, width=0.8, color="gold", label="not yet visible")
    if any(errors) or any(unseen):
        rate_ax.legend(loc="upper left")
    rate_ax.set_ylabel("req/s")
    rate_ax.set_xlabel("seconds since start")
    rate_ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)


def draw_lag_chart(ttq: hist.Histogram, timeouts: int, path: Path) -> None:
    """Time-to-queryable distribution: a histogram of the measured waits and their CDF."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    dist_ax, cdf_ax = fig.subplots(1, 2)
    values = hist.recorded_values_ms(ttq)
    total = hist.count(ttq)
    title = f"Time to queryable: {total} measured, {timeouts} timed out"
    fig.suptitle(title)
    if not values:
        for ax in (dist_ax, cdf_ax):
            ax.text(0.5, 0.5, "no samples", ha="center", va="center", transform=ax.transAxes)
        fig.savefig(path, dpi=100)
        return
    xs = [v for v, _ in values]
    weights = [c for _, c in values]
    dist_ax.hist(xs, bins=min(50, max(5, len(xs))), weights=weights, color="tab:green")
    dist_ax.set_xlabel("ms from the command's reply")
    dist_ax.set_ylabel("commands")
    dist_ax.grid(True, alpha=0.3)
    cumulative, running = [], 0
    for c in weights:
        running += c
        cumulative.append(100.0 * running / total)
    cdf_ax.step(xs, cumulative, where="post", color="tab:green")
    for key, p in (("p50", 50.0), ("p99", 99.0)):
        v = hist.percentile_ms(ttq, p)
        cdf_ax.axvline(v, color="gray", linestyle=":")
        cdf_ax.text(v, 5 if key == "p50" else 15, f" {key} {v:.1f} ms", color="dimgray")
    cdf_ax.set_xscale("log")
    cdf_ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    cdf_ax.xaxis.set_minor_formatter(NullFormatter())
    cdf_ax.set_ylim(0, 100.5)
    cdf_ax.set_xlabel("ms from the command's reply (log)")
    cdf_ax.set_ylabel("% visible")
    cdf_ax.grid(True, which="both", alpha=0.3)
    fig.savefig(path, dpi=100)


def draw_cpu_chart(usage: CpuUsage, path: Path) -> None:
    """CPU of each recorded process (group) over the run, in cores (CPU seconds per second), one line each."""
    fig = Figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    plotted = False
    for name in usage.cpu_s:
        points = [(p.t, p.cores.get(name)) for p in usage.timeline]
        known = [(t, v) for t, v in points if v is not None]
        if known:
            xs, ys = zip(*known, strict=True)
            ax.plot(xs, ys, marker=".", label=name)
            plotted = True
    if plotted:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: lines often overlap
    else:
        ax.text(0.5, 0.5, "no CPU samples", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(bottom=0)
    ax.set_title("CPU by process (per sampling interval)")
    ax.set_ylabel("cores (CPU s per s)")
    ax.set_xlabel("seconds since start")
    ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)
