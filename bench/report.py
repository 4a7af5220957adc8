"""The one table of a benchmark run: each figure beside its same-run baseline, the ratio and the target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

NOT_MEASURED = "not measured"


@dataclass
class Row:
    section: str
    name: str
    value: float | None
    unit: str
    baseline_name: str = ""
    baseline: float | None = None
    ratio: float | None = None
    target: str = ""
    verdict: str = ""
    note: str = ""
    baseline_unit: str = "/s"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit == "ms":
        return f"{value:.1f} ms"
    # Three significant digits below 10 (CPU seconds per 1,000 operations are often well below 1).
    text = f"{value:,.0f}" if abs(value) >= 100 else f"{value:,.1f}" if abs(value) >= 10 else f"{value:.3g}"
    return f"{text} {unit}".strip()


def ratio_row(
    section: str,
    name: str,
    value: float | None,
    unit: str,
    baseline_name: str,
    baseline: float | None,
    minimum: float,
    note: str = "",
) -> Row:
    """A figure compared with a baseline; met when value / baseline >= minimum."""
    ratio = None
    verdict = NOT_MEASURED
    if value is not None and baseline and not math.isnan(value) and not math.isnan(baseline):
        ratio = value / baseline
        verdict = "met" if ratio >= minimum else "not met"
    return Row(section, name, value, unit, baseline_name, baseline, ratio, f">= {minimum:g}x", verdict, note)


def cost_row(
    section: str,
    name: str,
    value: float | None,
    unit: str,
    baseline_name: str = "",
    baseline: float | None = None,
    baseline_unit: str = "",
    *,
    at_most: float | None = None,
    note: str = "",
) -> Row:
    """A cost (lower is better), alone or beside a baseline cost: met when value / baseline <= `at_most`; without
    `at_most` the ratio is reported with no target."""
    ratio = None
    verdict = NOT_MEASURED if value is None else ""
    if value is not None and baseline and not math.isnan(value) and not math.isnan(baseline):
        ratio = value / baseline
        if at_most is not None:
            verdict = "met" if ratio <= at_most else "not met"
    elif baseline_name and at_most is not None:
        verdict = NOT_MEASURED
    target = f"<= {at_most:g}x" if at_most is not None else ""
    return Row(section, name, value, unit, baseline_name, baseline, ratio, target, verdict, note, baseline_unit)


def versus_row(
    section: str,
    name: str,
    value: float | None,
    unit: str,
    baseline_name: str = "",
    baseline: float | None = None,
    note: str = "",
) -> Row:
    """A figure beside a same-run baseline with no target (scale-out: what a second replica gives on this machine
    is a finding, not a promise); the ratio only. Without a baseline, the figure alone."""
    # A cost row without a target is exactly that, whichever way is better.
    return cost_row(section, name, value, unit, baseline_name, baseline, unit, note=note)


def limit_row(section: str, name: str, value: float | None, unit: str, maximum: float | None, note: str = "") -> Row:
    """A figure with an absolute upper bound (or none: informational)."""
    verdict = ""
    target = ""
    if maximum is not None:
        target = f"<= {maximum:g} {unit}"
        verdict = NOT_MEASURED if value is None or math.isnan(value) else ("met" if value <= maximum else "not met")
    return Row(section, name, value, unit, target=target, verdict=verdict, note=note)


def render_markdown(header: list[str], rows: list[Row], notes: list[str], tables: Sequence[str] = ()) -> str:
    """The header, the table of rows, further `tables` (markdown, each with its own heading text) and the notes."""
    lines = [*header, ""]
    lines.append("| section | measure | value | baseline (same run) | ratio | target | verdict |")
    lines.append("|---|---|---:|---|---:|---|---|")
    for row in rows:
        baseline = f"{row.baseline_name}: {_fmt(row.baseline, row.baseline_unit)}" if row.baseline_name else ""
        ratio = f"{row.ratio:.2f}x" if row.ratio is not None else ""
        name = row.name + (f" ({row.note})" if row.note else "")
        lines.append(
            f"| {row.section} | {name} | {_fmt(row.value, row.unit)} | {baseline} | {ratio} | {row.target} "
            f"| {row.verdict} |"
        )
    for table in tables:
        lines += ["", table.rstrip("\n")]
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return "\n".join(lines) + "\n"
