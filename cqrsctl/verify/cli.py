"""The `cqrs verify` subcommand: arguments (defaults from the services' CQRS_* variables) and exit status."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from core.error_text import describe_error
from cqrsctl.stores import StoreUnreachable
from cqrsctl.verify.model import VerifyConfig

EXIT_CLEAN = 0
EXIT_FINDINGS = 1
EXIT_ERROR = 2


def add_verify_parser(sub: Any) -> argparse.ArgumentParser:
    """Adds `verify` to the `cqrs` subcommands (`sub` is the parent parser's subparsers action)."""
    env = VerifyConfig.from_env()
    parser: argparse.ArgumentParser = sub.add_parser(
        "verify",
        help="prove the stream and the read model match PostgreSQL (exit 0 only when clean)",
        description="Compares the event store, the JetStream stream and the MongoDB read model and reports every "
        "difference. Exit status: 0 clean, 1 differences found, 2 a store could not be read.",
    )
    parser.add_argument("--postgres-dsn", default=env.postgres_dsn, help="env CQRS_POSTGRES_DSN")
    parser.add_argument("--nats-url", default=env.nats_url, help="env CQRS_NATS_URL")
    parser.add_argument("--mongo-url", default=env.mongo_url, help="env CQRS_MONGO_URL")
    parser.add_argument("--mongo-database", default=env.mongo_database, help="env CQRS_MONGO_DATABASE")
    parser.add_argument("--stream-name", default=env.stream_name, help="env CQRS_STREAM_NAME")
    parser.add_argument("--subject-prefix", default=env.subject_prefix, help="env CQRS_SUBJECT_PREFIX")
    parser.add_argument(
        "--settle-seconds", type=float, default=env.settle_seconds,
        help=f"how long differences explained by lag are re-checked (default {env.settle_seconds:g})",
    )  # fmt: skip
    parser.add_argument(
        "--outbox-age-seconds", type=float, default=env.outbox_age_seconds,
        help=f"outbox rows older than this are reported (default {env.outbox_age_seconds:g})",
    )  # fmt: skip
    parser.add_argument("--batch-size", type=int, default=env.batch_size, help="streams per round trip")
    parser.add_argument("--timeout", type=float, default=env.timeout_seconds, help="seconds per network call")
    parser.add_argument("--json", action="store_true", help="print the result as JSON (for scripts)")
    parser.add_argument("--repair", action="store_true", help="rewrite differing documents from PostgreSQL")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar, even on a terminal")
    parser.set_defaults(run=run_cli)
    return parser


def config_from_args(args: argparse.Namespace) -> VerifyConfig:
    return VerifyConfig(
        postgres_dsn=args.postgres_dsn,
        nats_url=args.nats_url,
        mongo_url=args.mongo_url,
        mongo_database=args.mongo_database,
        stream_name=args.stream_name,
        subject_prefix=args.subject_prefix,
        settle_seconds=args.settle_seconds,
        outbox_age_seconds=args.outbox_age_seconds,
        batch_size=args.batch_size,
        timeout_seconds=args.timeout,
    )


def run_cli(args: argparse.Namespace) -> int:
    from cqrsctl.verify import run_verify
    from cqrsctl.verify.report import render_json, render_text

    if args.batch_size < 1:
        print("cqrs verify: --batch-size must be >= 1", file=sys.stderr)
        return EXIT_ERROR
    try:
        result = asyncio.run(run_verify(config_from_args(args), repair=args.repair, progress=not args.no_progress))
    except StoreUnreachable as exc:
        print(f"cqrs verify: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as exc:  # a store refused a query or went away meanwhile: say what, no stack trace
        print(f"cqrs verify: {type(exc).__name__}: {describe_error(exc)}", file=sys.stderr)
        return EXIT_ERROR
    print(render_json(result) if args.json else render_text(result))
    return EXIT_CLEAN if result.clean else EXIT_FINDINGS
