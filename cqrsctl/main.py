"""The `cqrs` console script: operator and developer commands."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import grpc

from core.logs import configure_logging
from cqrsctl import stores

MIGRATE_CONNECT_TIMEOUT = 30.0


def _migrate(args: argparse.Namespace) -> int:
    from command_service.migrate import MigrationFailed

    try:
        applied = asyncio.run(_connect_and_migrate(args.dsn))
    except MigrationFailed as exc:
        print(f"cqrs migrate: {exc}", file=sys.stderr)
        return 2
    print(f"applied: {', '.join(applied)}" if applied else "event store schema is up to date")
    return 0


async def _connect_and_migrate(dsn: str) -> list[str]:
    import asyncpg

    from command_service.migrate import migrate_connection

    with stores.connecting(stores.POSTGRES, dsn):
        conn = await asyncpg.connect(dsn, timeout=MIGRATE_CONNECT_TIMEOUT)
    try:
        return await migrate_connection(conn)
    finally:
        await conn.close()


def _demo(args: argparse.Namespace) -> int:
    from cqrsctl.demo import run_demo

    return asyncio.run(run_demo(args.command_addr, args.query_addr, orders=args.orders, timeout=args.timeout))


def _status(args: argparse.Namespace) -> int:
    from cqrsctl.status import run_status

    return run_status(args.command_metrics, args.projector_metrics)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cqrs", description="Order service (CQRS + event sourcing) tools")
    parser.add_argument("--log-level", default=os.environ.get("CQRS_LOG_LEVEL", "WARNING"))
    sub = parser.add_subparsers(dest="command", required=True)

    migrate = sub.add_parser("migrate", help="apply the event-store schema (idempotent)")
    migrate.add_argument(
        "--dsn",
        default=stores.postgres_dsn(),
        help="PostgreSQL DSN (env CQRS_POSTGRES_DSN, else the `make dev` stack's)",
    )
    migrate.set_defaults(run=_migrate)

    demo = sub.add_parser("demo", help="run orders through the running services and print the replication lag")
    demo.add_argument("--command-addr", default=os.environ.get("CQRS_COMMAND_ADDR", "127.0.0.1:50051"))
    demo.add_argument("--query-addr", default=os.environ.get("CQRS_QUERY_ADDR", "127.0.0.1:50052"))
    demo.add_argument("--orders", type=int, default=20, help="how many orders to run concurrently (default 20)")
    demo.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for each read (default 10)")
    demo.set_defaults(run=_demo)

    status = sub.add_parser(
        "status", help="outbox backlog, partitions, consumer pending, parked streams and replication lag, on one screen"
    )
    status.add_argument(
        "--command-metrics",
        default=os.environ.get("CQRS_STATUS_COMMAND_METRICS", "http://127.0.0.1:9101/metrics"),
        help="command_service /metrics URL, comma-separated for several replicas (env CQRS_STATUS_COMMAND_METRICS)",
    )
    status.add_argument(
        "--projector-metrics",
        default=os.environ.get("CQRS_STATUS_PROJECTOR_METRICS", "http://127.0.0.1:9102/metrics"),
        help="projector /metrics URL, comma-separated for several replicas (env CQRS_STATUS_PROJECTOR_METRICS)",
    )
    status.set_defaults(run=_status)

    from cqrsctl.load.cli import add_load_parser

    add_load_parser(sub)

    from cqrsctl.dead_letters import add_dead_letters_parser

    add_dead_letters_parser(sub)

    from cqrsctl.verify.cli import add_verify_parser

    add_verify_parser(sub)

    from cqrsctl.rebuild.cli import add_rebuild_parser

    add_rebuild_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, "cqrs")
    try:
        code: int = args.run(args)
    except grpc.aio.AioRpcError as exc:
        print(f"cqrs {args.command}: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 2
    except (stores.StoreUnreachable, OSError, ConnectionError, TimeoutError) as exc:
        print(f"cqrs {args.command}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
