"""The `cqrs load` flags and their handler. Importing this module stays cheap: gRPC and matplotlib load later."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

from cqrsctl.load.config import (
    DEFAULT_MIX_TEXT,
    READ_CONSISTENCIES,
    ConfigError,
    LoadConfig,
    default_workers,
    format_mix,
    parse_cpu_patterns,
    parse_cpu_pids,
    parse_mix,
)


def add_load_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Registers `load` on the `cqrs` parser's subcommands."""
    load = sub.add_parser(
        "load",
        help="drive a mix of commands and queries at the services and report throughput, latency, time-to-queryable",
        description=(
            "Load generator. Open loop (--rate) schedules arrivals at fixed intervals and measures latency from the "
            "intended send time (coordinated-omission corrected); closed loop (--concurrency) keeps N callers busy. "
            "Stops at --duration or --max-requests, whichever comes first."
        ),
    )
    load.add_argument(
        "--command-addr",
        default=os.environ.get("CQRS_COMMAND_ADDR", "127.0.0.1:50051"),
        help="command service host:port, or IP:port,IP:port,... to send each request to the next replica in turn "
        "(env CQRS_COMMAND_ADDR)",
    )
    load.add_argument(
        "--query-addr",
        default=os.environ.get("CQRS_QUERY_ADDR", "127.0.0.1:50052"),
        help="query service host:port (env CQRS_QUERY_ADDR)",
    )
    load.add_argument("--mode", choices=("open", "closed"), default="closed", help="loop mode (default closed)")
    load.add_argument("--rate", type=float, help="open loop: total arrivals per second across workers")
    load.add_argument("--concurrency", type=int, default=8, help="closed loop: concurrent callers in total (default 8)")
    load.add_argument("--duration", type=float, help="seconds to run")
    load.add_argument("--max-requests", type=int, help="stop after this many requests")
    load.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help=f"worker processes, each with its own event loop and channels (default {default_workers()})",
    )
    load.add_argument("--mix", default=DEFAULT_MIX_TEXT, help=f"operation weights (default {DEFAULT_MIX_TEXT})")
    load.add_argument(
        "--read-consistency",
        choices=READ_CONSISTENCIES,
        default="eventual",
        help=(
            "how `get` reads the orders this run wrote: eventual (no token: a read that comes before the projector "
            "is counted as not yet visible, apart from errors) or token (carries the order's last consistency "
            "token: the query service waits for the write, and that wait is in the GetOrder latency); "
            "default eventual"
        ),
    )
    load.add_argument("--customers", type=int, default=20, help="customers registered up front (default 20)")
    load.add_argument(
        "--ttq-sample",
        type=float,
        default=0.1,
        help="fraction of commands whose time-to-queryable is measured (default 0.1)",
    )
    load.add_argument("--deadline", type=float, default=5.0, help="per-RPC deadline in seconds (default 5)")
    load.add_argument(
        "--out",
        type=Path,
        default=Path("load-report"),
        help="report directory: report.json, summary.md, latency.png, lag.png, cpu.png (default load-report/)",
    )
    load.add_argument(
        "--cpu-pids",
        action="append",
        default=[],
        metavar="NAME=PID,...",
        help=(
            "record the CPU time of these local processes (each with its descendants) during the run, e.g. "
            "command_service=4242,postgres=4100; the load generator's own is always recorded then (repeatable)"
        ),
    )
    load.add_argument(
        "--cpu-process",
        action="append",
        default=[],
        metavar="NAME=REGEX",
        help=(
            "like --cpu-pids, for the processes whose command line (/proc/PID/cmdline, arguments joined by spaces) "
            "REGEX matches when the run starts, e.g. 'projector=-m projector$' (repeatable)"
        ),
    )
    load.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    load.add_argument("--quiet", action="store_true", help="no live progress on stderr")
    load.set_defaults(run=run_load_command)
    return load


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    """Raises ConfigError for values argparse cannot check on its own."""
    if args.mode == "open" and args.rate is None:
        raise ConfigError("--mode open needs --rate")
    if args.mode == "closed" and args.rate is not None:
        raise ConfigError("--rate applies to --mode open only")
    config = LoadConfig(
        command_addr=args.command_addr,
        query_addr=args.query_addr,
        mode=args.mode,
        rate=args.rate,
        concurrency=args.concurrency,
        duration=args.duration,
        max_requests=args.max_requests,
        workers=args.workers,
        mix=parse_mix(args.mix),
        read_consistency=args.read_consistency,
        cpu_pids=parse_cpu_pids(args.cpu_pids),
        cpu_patterns=parse_cpu_patterns(args.cpu_process),
        customers=args.customers,
        ttq_sample=args.ttq_sample,
        deadline=args.deadline,
        out_dir=args.out,
        charts=not args.no_charts,
        quiet=args.quiet,
        processes=True,
    )
    config.validate()
    return config


def run_load_command(args: argparse.Namespace) -> int:
    """0 after a completed run (RPC errors are in the report), 2 for bad flags or unreachable services, 1 when a
    worker failed, 130 on Ctrl-C."""
    try:
        from cqrsctl.load.runner import LoadRunError, LoadSetupError, run_load
    except ImportError as exc:  # hdrhistogram / matplotlib are the optional `load` extra
        print(f"cqrs load: {exc.name} is missing; install it with: pip install 'cqrs-orders[load]'", file=sys.stderr)
        return 2

    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"cqrs load: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        bound = " and ".join(
            part
            for part in (
                f"{config.duration:g}s" if config.duration is not None else "",
                f"{config.max_requests:,} requests" if config.max_requests is not None else "",
            )
            if part
        )
        load = f"{config.rate:g} req/s" if config.mode == "open" else f"{config.concurrency} callers"
        print(
            f"cqrs load: {config.mode} loop, {load}, {config.effective_workers} workers, up to {bound}; "
            f"mix {format_mix(config.mix)}, {config.read_consistency} reads; "
            f"commands {config.command_addr}, queries {config.query_addr}",
            file=sys.stderr,
        )
    try:
        report = asyncio.run(run_load(config))
    except LoadSetupError as exc:
        print(f"cqrs load: {exc}", file=sys.stderr)
        return 2
    except LoadRunError as exc:
        print(f"cqrs load: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("cqrs load: interrupted", file=sys.stderr)
        return 130
    data = report.to_json()
    totals, ttq = data["totals"], data["time_to_queryable_ms"]
    print(
        f"{totals['requests']:,} requests in {report.duration_s:.1f}s = {totals['throughput_rps']:,.0f} req/s, "
        f"errors {totals['errors']:,}, not yet visible {totals['not_yet_visible']:,}, dropped {totals['dropped']:,}; "
        f"p99 commands {data['commands']['latency_ms']['p99']:.1f} ms, "
        f"queries {data['queries']['latency_ms']['p99']:.1f} ms; "
        f"time-to-queryable p50 {ttq['p50']:.1f} ms, p99 {ttq['p99']:.1f} ms ({ttq['count']} measured, "
        f"{ttq['timeouts']} timed out)"
    )
    if "cpu" in data:
        costs = ", ".join(
            f"{name} {'n/a' if e['per_1000']['requests'] is None else format(e['per_1000']['requests'], '.3g')}"
            for name, e in data["cpu"]["processes"].items()
        )
        print(f"CPU seconds per 1,000 requests: {costs}")
    print(f"report: {config.out_dir}/report.json, {config.out_dir}/summary.md")
    return 0
