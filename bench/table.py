"""The main table of `make bench`: every measurement's row, beside its same-run baseline and judged against the
issue's target where it has one (`bench.report` renders them; `bench.cpu` and `bench.scaleout` add their own)."""

from __future__ import annotations

from typing import Any

from bench import cpu, scaleout, system
from bench.report import Row, limit_row, ratio_row
from projector.maintenance import SALES_TAG_SWEEP_OPERATION

# Time-to-queryable targets of issue 12: p99 <= 50 ms at 100 commands/s, <= 100 ms at half the sustained rate.
TTQ_P99_AT_FIXED_RATE_MS = 50.0
TTQ_P99_AT_HALF_RATE_MS = 100.0
# Issue 12: the sustained command rate under a 25 ms p99 >= 0.12x the echo server's closed loop in the same run.
SUSTAINED_RATE_OF_ECHO = 0.12


def all_rows(figures: dict[str, Any], workers: int, concurrency: int) -> list[Row]:
    """Every row of the run's `figures` (`Bench.figures`); `workers` and `concurrency` are the load's shape."""
    f, nan = figures, float("nan")

    def get(key: str, *path: str) -> float | None:
        value: Any = f.get(key)
        for part in path:
            if not isinstance(value, dict):
                return None
            value = value.get(part)
        return None if value is None else float(value)

    echo_qps = get("echo", "qps")
    single = get("pg_single", "rate")
    upsert = get("mongo", "bulk_upsert_rate")
    find = get("mongo", "find_rate")
    w = workers
    phys = "physical limit"
    rows = [
        Row(phys, f"gRPC unary echo, closed loop, {w} worker processes x {concurrency // w} callers", echo_qps,
            "req/s"),
        Row(phys, f"PostgreSQL single-row INSERT+COMMIT, {concurrency} connections, synchronous_commit "
            f"{(f.get('pg_single') or {}).get('synchronous_commit', '?')}", single, "commits/s"),
        Row(phys, "PostgreSQL batched insert (COPY, 1,000 rows/transaction, 2 connections)",
            get("pg_batched", "rate"), "rows/s"),
        Row(phys, "JetStream publish_async with acks (file storage, dedupe ids)", get("nats", "rate"), "msgs/s"),
        Row(phys, "JetStream pull consumer, the projector's client (fetch 200, an ack a message, nothing done)",
            get("nats_consume", "rate"), "msgs/s"),
        Row(phys, "MongoDB bulk upsert (200/bulk_write, orders shape + indexes, creates+guarded updates)",
            upsert, "ops/s"),
        Row(phys, f"MongoDB find_one by _id (as query_service reads an order, {concurrency} callers)", find, "finds/s"),
    ]  # fmt: skip
    best = (f.get("commands") or {}).get("best") or {}
    command_rate = best.get("achieved")
    rows.append(ratio_row("system", "sustained command rate with p99 <= 25 ms (open loop, mix "
                          f"{system.COMMAND_MIX})", command_rate, "cmds/s", "echo", echo_qps, SUSTAINED_RATE_OF_ECHO,
                          note=f"p99 {best['p99_ms']:.1f} ms" if best else ""))  # fmt: skip
    rows += cpu.budget_rows(f, SUSTAINED_RATE_OF_ECHO)
    closed = get("projector", "closed_loop_cmds_per_s")
    rows.append(Row("system", f"command throughput, closed loop, {concurrency} callers, no latency bound "
                    "(order lifecycles, while the projector is stopped)", closed, "cmds/s"))  # fmt: skip
    proj = f.get("projector") or {}
    rows.append(ratio_row("system", "projector catch-up throughput", get("projector", "rate"), "events/s",
                          "bulk upsert", upsert, 0.8,
                          note=f"{proj['events']} events in {proj['seconds']:.2f}s" if proj else ""))  # fmt: skip
    rb = f.get("rebuild") or {}
    rb_note = f"{rb['events_applied']} events in {rb['build_seconds']:.2f}s" if rb else ""
    rows.append(ratio_row("system", "read-model rebuild from PostgreSQL (cqrs rebuild, build phase)",
                          get("rebuild", "events_per_second"), "events/s", "bulk upsert", upsert, 0.8,
                          note=rb_note))  # fmt: skip
    floor = min(x for x in (echo_qps, find, nan) if x is not None) if (echo_qps and find) else None
    q = f.get("queries") or {}
    rows.append(ratio_row("system", f"query QPS (closed loop, {concurrency} callers, {system.QUERY_MIX})",
                          get("queries", "qps"), "req/s", "min(echo, find)", floor, 0.7,
                          note=f"p99 {q['latency_ms']['p99']:.1f} ms" if q.get("latency_ms") else ""))  # fmt: skip
    rows += _ttq_rows(f.get("ttq_fixed") or {}, TTQ_P99_AT_FIXED_RATE_MS)
    rows += _ttq_rows(f.get("ttq") or {}, TTQ_P99_AT_HALF_RATE_MS)
    rows += _stage_rows(f.get("ttq_fixed") or {})
    rows += _stage_rows(f.get("ttq") or {})
    es = get("eventsourcing", "rate")
    ours = get("our_appends", "rate")
    rows.append(Row("peer", f"eventsourcing {f.get('eventsourcing', {}).get('version', '')} save of a "
                    f"single-event aggregate, {concurrency} threads", es, "appends/s"))  # fmt: skip
    rows.append(ratio_row("peer", f"our EventStore.append (1 event + outbox + request log), {concurrency} tasks",
                          ours, "appends/s", "eventsourcing", es, 10))  # fmt: skip
    rows.append(ratio_row("peer", "our EventStore.append vs raw single-row commits", ours, "appends/s",
                          "raw commits", single, 3))  # fmt: skip
    rows += cpu.cost_rows(f)
    rows += scaleout.rows(f)
    for row in rows:
        if row.value is None and not row.verdict:
            row.verdict = "not measured"
    return rows


def _ttq_rows(step: dict[str, Any], p99_limit_ms: float) -> list[Row]:
    """The p50 and p99 rows of one time-to-queryable step (`Bench._ttq`), the p99 judged against its limit."""
    ttq = step.get("ttq") or {}
    at = f" at {step['rate']:.0f} cmds/s" if step.get("rate") else ""
    if step.get("query_rate"):
        at += f" + {step['query_rate']:.0f} queries/s"
    samples = f"{ttq.get('count')} samples, {ttq.get('timeouts')} timeouts" if ttq else ""
    query_p99 = ((step.get("queries") or {}).get("latency_ms") or {}).get("p99")
    if query_p99 is not None:
        samples += f"; query p99 {query_p99:.1f} ms"
    if step.get("backlog_before"):
        samples += f"; first applied the {step['backlog_before']:,} events earlier steps left, in {step['drained_s']} s"
    p50_row = limit_row("system", f"time-to-queryable p50{at}", ttq.get("p50"), "ms", None, note=samples)
    p99_row = limit_row("system", f"time-to-queryable p99{at}", ttq.get("p99"), "ms", p99_limit_ms)
    if ttq.get("timeouts"):
        # A probe that timed out never saw its effect: its latency is beyond every recorded one.
        p99_row.verdict = "not met"
        p99_row.note = f"{ttq['timeouts']} probes timed out"
    return [p50_row, p99_row]


def _stage_rows(step: dict[str, Any]) -> list[Row]:
    """Where one time-to-queryable step's time went (`bench.stages`): the path's stages, then the projector's
    MongoDB calls, each with its mean and p99 bucket."""
    stages = step.get("stages") or []
    at = f"at {step['rate']:.0f} cmds/s: " if step.get("rate") else ""
    applied = next((s["count"] for s in stages if s["process"] == "projector" and not s["stage"]), 0)
    rows = []
    for stage in stages:
        what = f"{at}{stage['process']} {stage['stage'] or 'commit to applied (projection lag)'}"
        note = f"{stage['count']} observations"
        if stage["stage"] == f"mongodb {SALES_TAG_SWEEP_OPERATION}":
            note = f"{stage['count']} calls, background work between batches (part of none), its pauses included"
        elif stage["stage"].startswith("mongodb ") and applied:
            note = f"{stage['count']} calls, {stage['count'] * stage['mean_ms'] / applied:.2f} ms per event applied"
        rows.append(limit_row("ttq stage", f"{what}: mean (p99 bucket {stage['p99_ms']:g} ms)", stage["mean_ms"],
                              "ms", None, note=note))  # fmt: skip
    return rows
