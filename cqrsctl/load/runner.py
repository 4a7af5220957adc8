"""Runs a load test: checks the services, registers customers, starts the workers, merges what they report."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import os
import queue
import random
import signal
import sys
import time
import uuid
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event as MpEvent
from typing import Final, TextIO

import grpc
from cqrs.orders.v1 import customer_service_pb2 as cspb
from cqrs.orders.v1 import customer_service_pb2_grpc as csgrpc
from cqrs.orders.v1 import query_service_pb2 as qpb
from cqrs.orders.v1 import query_service_pb2_grpc as qgrpc

from cqrsctl.load import procstat
from cqrsctl.load.channels import open_load_channel
from cqrsctl.load.collect import Collector
from cqrsctl.load.config import LoadConfig
from cqrsctl.load.cpu import SELF, CpuRecorder
from cqrsctl.load.messages import Failed, WorkerMessage, WorkerSpec
from cqrsctl.load.report import LoadReport, build_report, write_report
from cqrsctl.load.schedule import split_evenly
from cqrsctl.load.worker import run_worker

CONNECT_TIMEOUT: Final = 5.0
READY_TIMEOUT: Final = 120.0  # spawning a worker imports grpc and the protos: seconds on a busy machine
REGISTER_CONCURRENCY: Final = 16
PROGRESS_DELAY: Final = 0.3


class LoadSetupError(Exception):
    """The run could not start: a service is unreachable or refused the set-up (the CLI exits 2)."""


class LoadRunError(Exception):
    """A worker failed during the run (a bug or a crash, not an RPC error: those are reported)."""


async def run_load(config: LoadConfig, *, progress: TextIO | None = None) -> LoadReport:
    """Runs the load described by `config` and returns the merged report (also written to `config.out_dir`).

    Workers run as processes when `config.processes`, otherwise as tasks in this event loop. Live progress goes
    to `progress` (default stderr) once per second unless `config.quiet`.
    """
    config.validate()
    cpu_groups = cpu_groups_of(config)
    customers = await prepare(config)
    specs = make_specs(config, customers)
    collector = Collector(len(specs))
    out = progress if progress is not None else sys.stderr
    started = asyncio.Event()
    printer = None if config.quiet else asyncio.create_task(_print_progress(collector, started, out))
    recorder = CpuRecorder(cpu_groups) if cpu_groups else None
    if recorder is not None:
        recorder.start(started)
    try:
        if config.processes:
            await _run_processes(specs, collector, started)
        else:
            await _run_tasks(specs, collector, started)
    finally:
        if printer is not None:
            printer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await printer
        # After the workers were joined: their CPU is then in our cutime (see procstat).
        cpu = await recorder.finish() if recorder is not None else None
    if collector.failures:
        details = "; ".join(f"worker {w}: {e}" for w, e in sorted(collector.failures.items()))
        raise LoadRunError(f"load workers failed: {details}")
    report = build_report(config.describe(), list(collector.results.values()), collector.timeline, cpu)
    if config.out_dir is not None:
        write_report(report, config.out_dir, charts=config.charts)
    return report


def cpu_groups_of(config: LoadConfig) -> dict[str, tuple[int, ...]]:
    """The process groups whose CPU the run records (none unless asked), resolved once, before the run: the named
    PIDs and pattern matches, and then always this process with its descendants, the worker processes
    (`cqrs-load`; run in-process, `processes=False`, that is whatever else this process runs too)."""
    if not config.measures_cpu:
        return {}
    if not procstat.PROC.is_dir():
        raise LoadSetupError("--cpu-pids/--cpu-process read /proc, which this system does not have")
    try:
        groups = procstat.resolve(config.cpu_pids, config.cpu_patterns, own_pid=os.getpid())
    except procstat.ProcessNotFound as exc:
        raise LoadSetupError(f"cannot record CPU: {exc}") from None
    return {**groups, SELF: (os.getpid(),)}


async def prepare(config: LoadConfig) -> tuple[str, ...]:
    """Checks both services answer, then registers `config.customers` active customers; returns their ids."""
    async with (
        open_load_channel(config.command_addr) as command_channel,
        open_load_channel(config.query_addr) as query_channel,
    ):
        for name, addr, channel in (
            ("command", config.command_addr, command_channel),
            ("query", config.query_addr, query_channel),
        ):
            await _connect(channel, name, addr)
        queries = qgrpc.OrderQueryServiceStub(query_channel)
        try:
            await queries.ListOrders(qpb.ListOrdersRequest(page_size=1), timeout=config.deadline)
        except grpc.aio.AioRpcError as exc:
            raise LoadSetupError(
                f"the query service at {config.query_addr} answered ListOrders with {exc.code().name}: {exc.details()}"
            ) from None
        customers = csgrpc.CustomerCommandServiceStub(command_channel)
        tag = uuid.uuid4().hex[:10]
        limit = asyncio.Semaphore(REGISTER_CONCURRENCY)

        async def register(i: int) -> str:
            async with limit:
                reply = await customers.RegisterCustomer(
                    cspb.RegisterCustomerRequest(
                        request_id=str(uuid.uuid4()), name=f"Load Customer {i}", email=f"load-{tag}-{i}@example.com"
                    ),
                    timeout=config.deadline,
                )
            return reply.result.customer_id

        try:
            ids = await asyncio.gather(*(register(i) for i in range(config.customers)))
        except grpc.aio.AioRpcError as exc:
            raise LoadSetupError(
                f"the command service at {config.command_addr} answered RegisterCustomer with "
                f"{exc.code().name}: {exc.details()}"
            ) from None
    return tuple(ids)


async def _connect(channel: grpc.aio.Channel, name: str, addr: str) -> None:
    """Waits for the channel to connect; fails fast when the connection is refused, else after CONNECT_TIMEOUT."""
    give_up = time.monotonic() + CONNECT_TIMEOUT
    state = channel.get_state(try_to_connect=True)
    while state != grpc.ChannelConnectivity.READY:
        remaining = give_up - time.monotonic()
        if state == grpc.ChannelConnectivity.TRANSIENT_FAILURE:
            raise LoadSetupError(f"cannot reach the {name} service at {addr} (connection failed)")
        if remaining <= 0:
            raise LoadSetupError(
                f"cannot reach the {name} service at {addr} (no connection within {CONNECT_TIMEOUT:g}s)"
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(channel.wait_for_state_change(state), remaining)
        state = channel.get_state(try_to_connect=True)


def make_specs(config: LoadConfig, customer_ids: tuple[str, ...]) -> list[WorkerSpec]:
    """Splits rate, callers and the request bound evenly between the workers."""
    workers = config.effective_workers
    seed = config.seed if config.seed is not None else random.randrange(2**32)
    concurrency = split_evenly(config.concurrency, workers)
    max_requests = split_evenly(config.effective_max_requests, workers)
    rate = (config.rate or 0.0) / workers
    mix = tuple((op, w) for op, w in config.mix.items() if w > 0)
    return [
        WorkerSpec(
            worker_id=w,
            command_addr=config.command_addr,
            query_addr=config.query_addr,
            mode=config.mode,
            rate=rate,
            phase=w / workers,
            concurrency=concurrency[w],
            duration=config.effective_duration,
            max_requests=max_requests[w],
            mix=mix,
            customer_ids=customer_ids,
            ttq_sample=config.ttq_sample,
            deadline=config.deadline,
            max_in_flight=config.max_in_flight,
            pool_size=config.pool_size,
            ttq_timeout=config.ttq_timeout,
            max_ttq_probes=config.max_ttq_probes,
            seed=seed + w,
            start_timeout=READY_TIMEOUT,
            read_consistency=config.read_consistency,
        )
        for w in range(workers)
    ]


async def _run_tasks(specs: list[WorkerSpec], collector: Collector, started: asyncio.Event) -> None:
    """All workers in this event loop (for tests and in-process benchmarks)."""
    go = asyncio.Event()

    def emit(message: WorkerMessage) -> None:
        collector.handle(message)
        if len(collector.ready) + len(collector.failures) >= len(specs) and not go.is_set():
            go.set()  # everyone is ready (or will never be): start together
            started.set()

    async def wait_start() -> bool:
        await go.wait()
        return True

    async def one(spec: WorkerSpec) -> None:
        try:
            await run_worker(spec, emit, wait_start)
        except Exception as exc:
            emit(Failed(spec.worker_id, repr(exc)))

    await asyncio.gather(*(one(spec) for spec in specs))


def worker_process_main(spec: WorkerSpec, messages: multiprocessing.Queue[WorkerMessage], go: MpEvent) -> None:
    """Entry point of a worker process: its own event loop and channels; reports through `messages`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it stops the workers

    async def wait_start() -> bool:
        return await asyncio.to_thread(go.wait, spec.start_timeout)

    try:
        asyncio.run(run_worker(spec, messages.put, wait_start))
    except BaseException as exc:
        messages.put(Failed(spec.worker_id, repr(exc)))


def _get(messages: multiprocessing.Queue[WorkerMessage], timeout: float) -> WorkerMessage | None:
    try:
        return messages.get(timeout=timeout)
    except queue.Empty:
        return None


async def _run_processes(specs: list[WorkerSpec], collector: Collector, started: asyncio.Event) -> None:
    """One spawned process per worker (never forked: gRPC is not fork-safe once the parent used it)."""
    ctx = multiprocessing.get_context("spawn")
    messages: multiprocessing.Queue[WorkerMessage] = ctx.Queue()
    go = ctx.Event()
    procs: list[SpawnProcess] = [
        ctx.Process(target=worker_process_main, args=(spec, messages, go), name=f"cqrs-load-{spec.worker_id}")
        for spec in specs
    ]
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + READY_TIMEOUT
        while len(collector.ready) + len(collector.failures) < len(specs):
            if collector.failures or time.monotonic() > deadline:
                break
            _check_alive(procs, collector)
            message = await asyncio.to_thread(_get, messages, 0.1)
            if message is not None:
                collector.handle(message)
        if collector.failures or len(collector.ready) < len(specs):
            if not collector.failures:
                for spec in specs:
                    if spec.worker_id not in collector.ready:
                        collector.handle(Failed(spec.worker_id, f"not ready within {READY_TIMEOUT:g}s"))
            return
        go.set()
        started.set()
        while not collector.finished:
            message = await asyncio.to_thread(_get, messages, 0.2)
            if message is not None:
                collector.handle(message)
            else:
                _check_alive(procs, collector)
    finally:
        for proc in procs:
            proc.join(timeout=5 if collector.finished and not collector.failures else 0.1)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        messages.close()


def _check_alive(procs: list[SpawnProcess], collector: Collector) -> None:
    """A worker process that died without saying Done or Failed (killed, out of memory) is a failure."""
    for w, proc in enumerate(procs):
        if proc.exitcode is not None and w not in collector.results and w not in collector.failures:
            collector.handle(Failed(w, f"worker process exited with code {proc.exitcode} without a result"))


async def _print_progress(collector: Collector, started: asyncio.Event, out: TextIO) -> None:
    await started.wait()
    t0 = time.monotonic()
    last_requests, last_t = 0, t0 + PROGRESS_DELAY
    for k in itertools.count(1):
        # Workers report each second as it ends: print a little later, so that second is in.
        await asyncio.sleep(max(0.0, t0 + k + PROGRESS_DELAY - time.monotonic()))
        now = time.monotonic()
        rate = (collector.requests - last_requests) / (now - last_t)
        last_requests, last_t = collector.requests, now
        _print_line(out, now - t0 - PROGRESS_DELAY, collector, rate)
        if collector.sending_over:
            probes = sum(collector.pending_probes.values())
            if probes:
                print(f"last request done; waiting for {probes} time-to-queryable probes", file=out, flush=True)
            return


def _print_line(out: TextIO, elapsed: float, collector: Collector, rate: float) -> None:
    line = (
        f"[{elapsed:6.1f}s] {collector.requests:>9,} requests  {rate:>8,.0f} req/s  "
        f"errors {collector.errors:,}  not yet visible {collector.not_yet_visible:,}  dropped {collector.dropped:,}  "
        f"p99 {collector.live_p99_ms():.1f} ms"
    )
    print(line, file=out, flush=True)
