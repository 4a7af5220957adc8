"""Rendering a `VerifyResult`: a readable summary for people, JSON for scripts."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from cqrsctl.verify.model import ABSENT, FieldDiff, Finding, Repair, VerifyResult

# Field differences shown per finding in the text report (the JSON has them all).
TEXT_DIFFS = 10
_VALUE_CHARS = 80


def _plain(value: Any) -> Any:
    """A JSON-able form of a document value."""
    if value is ABSENT:
        return "<absent>"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _diff(diff: FieldDiff) -> dict[str, Any]:
    return {"path": diff.path, "expected": _plain(diff.expected), "actual": _plain(diff.actual)}


def _finding(finding: Finding) -> dict[str, Any]:
    return {
        "kind": str(finding.kind),
        "stream_id": finding.stream_id,
        "collection": finding.collection,
        "detail": finding.detail,
        "diffs": [_diff(d) for d in finding.diffs],
    }


def _repair(repair: Repair) -> dict[str, Any]:
    return {"collection": repair.collection, "stream_id": repair.stream_id, "action": repair.action,
            "detail": repair.detail}  # fmt: skip


def to_json_dict(result: VerifyResult) -> dict[str, Any]:
    return {
        "clean": result.clean,
        "events_checked": result.events_checked,
        "documents_checked": result.documents_checked,
        "messages_checked": result.messages_checked,
        "expired_events": result.expired_events,
        "duplicate_messages": result.duplicate_messages,
        "settle_rounds": result.settle_rounds,
        "hot_keys_in_flight": result.hot_keys_in_flight,
        "elapsed_seconds": round(result.elapsed_seconds, 3),
        "events_per_second": round(result.events_per_second, 1),
        "phase_seconds": result.phase_seconds,
        "counts": result.counts(),
        "findings": [_finding(f) for f in result.findings],
        "repairs": [_repair(r) for r in result.repairs],
    }


def render_json(result: VerifyResult) -> str:
    return json.dumps(to_json_dict(result), indent=2, ensure_ascii=False)


def _short(value: Any) -> str:
    text = json.dumps(_plain(value), ensure_ascii=False)
    return text if len(text) <= _VALUE_CHARS else text[: _VALUE_CHARS - 3] + "..."


def render_text(result: VerifyResult) -> str:
    lines = [
        f"checked {result.events_checked:,} events, {result.documents_checked:,} documents, "
        f"{result.messages_checked:,} stream messages in {result.elapsed_seconds:.1f}s "
        f"({result.events_per_second:,.0f} events/s)"
    ]
    if result.expired_events:
        lines.append(f"{result.expired_events:,} events are older than the stream's retention (not errors)")
    if result.duplicate_messages:
        lines.append(f"{result.duplicate_messages:,} events are in the stream more than once (harmless)")
    if result.hot_keys_in_flight:
        lines.append(
            f"{result.hot_keys_in_flight:,} derived documents kept changing (hot keys); each equals the fold of its "
            "sources as stored"
        )
    for finding in result.findings:
        where = f" {finding.collection}" if finding.collection else ""
        lines.append(f"{finding.kind}{where} {finding.stream_id}: {finding.detail}".replace("  ", " "))
        for diff in finding.diffs[:TEXT_DIFFS]:
            lines.append(f"    {diff.path}: expected {_short(diff.expected)}, found {_short(diff.actual)}")
        if len(finding.diffs) > TEXT_DIFFS:
            lines.append(f"    ... {len(finding.diffs) - TEXT_DIFFS} more fields")
    for repair in result.repairs:
        lines.append(f"repair: {repair.action} {repair.collection} {repair.stream_id}: {repair.detail}")
    if result.clean:
        lines.append("clean: the read model and the stream match PostgreSQL")
    else:
        counts = ", ".join(f"{kind} {n}" for kind, n in result.counts().items())
        lines.append(f"NOT CLEAN: {len(result.findings)} findings ({counts})")
        if result.repairs:
            lines.append("run verify again to confirm the repairs")
    return "\n".join(lines)
