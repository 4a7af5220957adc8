"""The `cqrs rebuild` subcommand: arguments (defaults from the services' CQRS_* variables), output, exit status."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry

from core.error_text import describe_error
from core.metrics import start_metrics_server
from cqrsctl.rebuild.cutover import CutoverResult
from cqrsctl.rebuild.generations import ACTIVE
from cqrsctl.rebuild.model import RebuildConfig, RebuildResult
from cqrsctl.stores import StoreUnreachable

EXIT_EQUAL = 0
EXIT_DIFFERENCES = 1
EXIT_ERROR = 2


def add_rebuild_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds `rebuild` to the `cqrs` subcommands (`sub` is the parent parser's subparsers action)."""
    env = RebuildConfig.from_env()
    parser: argparse.ArgumentParser = sub.add_parser(
        "rebuild",
        help="build a new generation of the read model from PostgreSQL and compare it with the live one",
        description="Builds (or resumes) a generation <database>_g<N> of the read model from the events in "
        "PostgreSQL through the projector's registry, catches it up, then compares it with the active read "
        "model; with --cutover the services then switch to it. Exit status: 0 equal (or --accept-differences), "
        "1 differences (no switch), 2 an error.",
    )
    parser.add_argument("--postgres-dsn", default=env.postgres_dsn, help="env CQRS_POSTGRES_DSN")
    parser.add_argument("--mongo-url", default=env.mongo_url, help="env CQRS_MONGO_URL")
    parser.add_argument(
        "--mongo-database", default=env.mongo_database, help="the base (generation 1) database; env CQRS_MONGO_DATABASE"
    )
    parser.add_argument("--batch-size", type=int, default=env.batch_size, help="events per batch (default 2000)")
    parser.add_argument("--timeout", type=float, default=env.timeout_seconds, help="seconds per network call")
    parser.add_argument(
        "--ignore-field", action="append", default=[], metavar="[COLLECTION.]PATH",
        help="a field the comparison ignores (repeatable); e.g. updated_at or customers.order_stats_version",
    )  # fmt: skip
    parser.add_argument(
        "--sample", type=int, default=None, metavar="N",
        help="compare N random documents per collection plus every document changed during the rebuild",
    )  # fmt: skip
    parser.add_argument(
        "--settle-seconds", type=float, default=env.settle_seconds,
        help=f"how long differences explained by lag are re-checked (default {env.settle_seconds:g})",
    )  # fmt: skip
    parser.add_argument(
        "--max-live-lag", type=float, default=env.max_live_lag_seconds, metavar="SECONDS",
        help="wait between batches, and before comparing, while the live read model is more than this far behind "
        f"PostgreSQL (live projectors only; 0: never; default {env.max_live_lag_seconds:g})",
    )  # fmt: skip
    parser.add_argument("--accept-differences", action="store_true", help="exit 0 even when documents differ")
    parser.add_argument("--generation", type=int, default=None, help="resume this generation")
    parser.add_argument("--new", action="store_true", help="start a new generation even if one is unfinished")
    parser.add_argument(
        "--cutover", action="store_true",
        help="once compared equal (or --accept-differences), switch the query services and projectors to it",
    )  # fmt: skip
    parser.add_argument(
        "--if-needed", action="store_true",
        help="only when the active generation was built with other projection versions (the deployment Job)",
    )  # fmt: skip
    parser.add_argument(
        "--activate", type=int, default=None, metavar="N",
        help="switch to generation N (compared, or retired: a rollback) instead of building one; after a switch that "
        "gave up, N (the new one) finishes it and the old one goes back",
    )  # fmt: skip
    parser.add_argument("--drop", type=int, default=None, metavar="N", help="drop generation N (not the active one)")
    parser.add_argument(
        "--drop-retired-after", type=float, default=None, metavar="HOURS",
        help="also drop the generations retired more than HOURS ago",
    )  # fmt: skip
    parser.add_argument(
        "--writer-ttl", type=float, default=env.writer_ttl_seconds,
        help=f"seconds without a heartbeat before a projector is presumed gone (default {env.writer_ttl_seconds:g})",
    )  # fmt: skip
    parser.add_argument(
        "--switch-timeout", type=float, default=env.switch_timeout_seconds,
        help=f"give up a switch held up longer than this (default {env.switch_timeout_seconds:g}s)",
    )  # fmt: skip
    parser.add_argument(
        "--metrics-port", type=int, default=_metrics_port(), metavar="PORT",
        help="serve the progress as Prometheus metrics on this port (env CQRS_REBUILD_METRICS_PORT)",
    )  # fmt: skip
    parser.add_argument("--status", action="store_true", help="list the generations and exit")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    parser.add_argument("--no-progress", action="store_true", help="no progress line, even on a terminal")
    parser.set_defaults(run=run_cli)
    return parser


def _metrics_port() -> int | None:
    value = os.environ.get("CQRS_REBUILD_METRICS_PORT", "")
    return int(value) if value.isdigit() else None


def config_from_args(args: argparse.Namespace) -> RebuildConfig:
    return RebuildConfig(
        postgres_dsn=args.postgres_dsn,
        mongo_url=args.mongo_url,
        mongo_database=args.mongo_database,
        batch_size=args.batch_size,
        timeout_seconds=args.timeout,
        ignore_fields=tuple(args.ignore_field),
        sample=args.sample,
        settle_seconds=args.settle_seconds,
        max_live_lag_seconds=args.max_live_lag,
        generation=args.generation,
        new=args.new,
        cutover=args.cutover,
        accept_differences=args.accept_differences,
        if_needed=args.if_needed,
        writer_ttl_seconds=args.writer_ttl,
        switch_timeout_seconds=args.switch_timeout,
        drop_retired_after_hours=args.drop_retired_after,
    )


def run_cli(args: argparse.Namespace) -> int:
    from cqrsctl.rebuild import (
        CutoverFailed,
        GenerationError,
        RebuildFailed,
        RebuildMetrics,
        activate,
        drop_generation,
        rebuild_status,
        run_rebuild,
    )

    if args.batch_size < 1 or (args.sample is not None and args.sample < 1):
        print("cqrs rebuild: --batch-size and --sample must be >= 1", file=sys.stderr)
        return EXIT_ERROR
    config = config_from_args(args)
    try:
        if args.status:
            rows = asyncio.run(rebuild_status(config))
            print(json.dumps(rows, default=_json_default, indent=2) if args.json else render_status(rows))
            return EXIT_EQUAL
        if args.drop is not None:
            print(f"dropped generation {args.drop} ({asyncio.run(drop_generation(config, args.drop))})")
            return EXIT_EQUAL
        if args.activate is not None:
            switched = asyncio.run(activate(config, args.activate))
            print(json.dumps(cutover_document(switched), indent=2) if args.json else render_cutover(switched))
            return EXIT_EQUAL
        metrics = None
        if args.metrics_port is not None:
            metrics = RebuildMetrics(CollectorRegistry())
            start_metrics_server(metrics.registry, os.environ.get("CQRS_METRICS_HOST", "127.0.0.1"), args.metrics_port)
        result = asyncio.run(run_rebuild(config, progress=not args.no_progress, metrics=metrics))
    except (GenerationError, RebuildFailed, CutoverFailed) as exc:
        print(f"cqrs rebuild: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except StoreUnreachable as exc:
        print(f"cqrs rebuild: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a store refused a query or went away meanwhile: say what, no stack trace
        print(f"cqrs rebuild: {type(exc).__name__}: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    print(render_json(result, args.accept_differences) if args.json else render_text(result))
    return EXIT_EQUAL if result.equal or args.accept_differences else EXIT_DIFFERENCES


def _json_default(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else str(value)


def result_document(result: RebuildResult, accepted: bool) -> dict[str, Any]:
    switch = result.cutover
    return {
        "up_to_date": result.up_to_date,
        "skipped_collections": list(result.skipped_collections),
        "cutover": None if switch is None else cutover_document(switch),
        "dropped": result.dropped,
        "generation": result.generation,
        "database": result.database,
        "live_database": result.live_database,
        "resumed": result.resumed,
        "state": result.state,
        "position": result.position,
        "events_applied": result.events_applied,
        "events_per_second": round(result.events_per_second, 1),
        "build_seconds": round(result.build_seconds, 3),
        "documents_compared": result.documents_compared,
        "sample": result.sampled,
        "ignored_fields": list(result.ignored_fields),
        "equal": result.equal,
        "accepted": accepted and not result.equal,
        "difference_count": result.difference_count,
        "hot_keys_in_flight": result.hot_keys_in_flight,
        "held_back_seconds": round(result.held_back_seconds, 3),
        "differences": [
            {
                "collection": d.collection,
                "id": d.doc_id,
                "kind": d.kind,
                "live_version": d.live_version,
                "generation_version": d.generation_version,
                "fields": [{"path": f.path, "live": f.expected, "generation": f.actual} for f in d.fields],
            }
            for d in result.differences
        ],
    }


def cutover_document(switch: CutoverResult) -> dict[str, Any]:
    return {
        "generation": switch.generation,
        "database": switch.database,
        "previous_generation": switch.previous_generation,
        "previous_database": switch.previous_database,
        "writers": switch.writers,
        "seconds": round(switch.seconds, 3),
        "events_applied": switch.events_applied,
    }


def render_json(result: RebuildResult, accepted: bool) -> str:
    return json.dumps(result_document(result, accepted), default=_json_default, indent=2)


def render_cutover(switch: CutoverResult) -> str:
    return (
        f"generation {switch.generation} ({switch.database}) is active; generation {switch.previous_generation} "
        f"({switch.previous_database}) is retired (rollback: cqrs rebuild --activate {switch.previous_generation}). "
        f"{switch.writers} projector(s) moved in {switch.seconds:.1f}s; {switch.events_applied} events fed meanwhile"
    )


def render_text(result: RebuildResult) -> str:
    if result.up_to_date:
        return f"generation {result.generation} ({result.database}) is up to date with this release's projections" + (
            f"; dropped retired generation(s) {', '.join(map(str, result.dropped))}" if result.dropped else ""
        )
    verb = "resumed" if result.resumed else "built"
    lines = [
        f"generation {result.generation} ({result.database}) {verb}: {result.events_applied:,} events applied in "
        f"{result.build_seconds:.1f}s ({result.events_per_second:,.0f} events/s), up to position {result.position}",
        f"compared with {result.live_database}: {result.documents_compared:,} documents"
        + (f" (sample of {result.sampled} per collection + changed ones)" if result.sampled else "")
        + (f", ignoring {', '.join(result.ignored_fields)}" if result.ignored_fields else ""),
    ]
    if result.held_back_seconds:
        lines.append(f"held back {result.held_back_seconds:.1f}s while the live read model lagged (--max-live-lag)")
    if result.skipped_collections:
        lines.append(f"not compared (changed projections): {', '.join(result.skipped_collections)}")
    if result.hot_keys_in_flight:
        lines.append(
            f"{result.hot_keys_in_flight} derived document(s) kept changing (hot keys); each side equals the fold of "
            "its own sources"
        )
    tail = ([render_cutover(result.cutover)] if result.cutover is not None else []) + (
        [f"dropped retired generation(s) {', '.join(map(str, result.dropped))}"] if result.dropped else []
    )
    if result.equal:
        lines.append("every document is equal")
        return "\n".join(lines + tail)
    lines.append(f"{result.difference_count} document(s) differ:")
    for d in result.differences:
        fields = ", ".join(f"{f.path}: {f.expected!r} -> {f.actual!r}" for f in d.fields[:6])
        lines.append(f"  {d.collection} {d.doc_id}: {d.kind}" + (f" ({fields})" if fields else ""))
    if result.difference_count > len(result.differences):
        lines.append(f"  ... and {result.difference_count - len(result.differences)} more")
    return "\n".join(lines + tail)


def render_status(rows: Sequence[Mapping[str, Any]]) -> str:
    lines = [f"{'GEN':>3} {'DATABASE':28} {'STATE':10} {'POSITION':>10} {'EVENTS':>10} {'DIFFS':>6}  UPDATED"]
    for row in rows:
        marker = "*" if row.get("active") else " "
        diffs = row.get("differences")
        updated = row.get("updated_at")
        lines.append(
            f"{row['generation']:>3}{marker}{row.get('database', '')!s:28} {row.get('state', '')!s:10} "
            f"{row.get('position', '') or '':>10} {row.get('events_applied', '') or '':>10} "
            f"{'' if diffs is None else diffs:>6}  {updated.isoformat() if isinstance(updated, datetime) else ''}"
        )
    lines.append("* active (the generation the services use)")
    pointer = next((row for row in rows if row.get("active")), None)
    left = [row["generation"] for row in rows if row.get("state") == ACTIVE and not row.get("active")]
    if pointer is not None and left:
        old = ", ".join(map(str, left))
        lines.append(
            f"the switch to generation {pointer['generation']} gave up before it retired generation {old}: "
            f"`cqrs rebuild --activate {pointer['generation']}` finishes it, `--activate {left[-1]}` goes back"
        )
    return "\n".join(lines)
