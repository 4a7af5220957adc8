"""The gRPC physical limit: a minimal grpc.aio unary echo server, and clients shaped like `cqrs load`.

The server is one Python process with one grpc.aio server, like each of our services, and does nothing but
return the request bytes (no protobuf, no I/O). The closed-loop client runs `workers` processes, each with one
channel and `concurrency / workers` asyncio callers, the same client shape as `cqrs load --mode closed`; the
open-loop client sends `rate / workers` calls per second from each, as `cqrs load --mode open` does. A grpc.aio
server's CPU per RPC falls as its load rises (each wake-up of its event loop and of gRPC's poller thread serves
more calls), so a service measured at some rate compares like for like with the echo server at that rate.

`python -m bench.echo --port P` runs the server until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import signal
import time
from typing import Any

import grpc

METHOD = "/bench.Echo/Echo"
# About the size of a GetOrder reply with two lines: the echo moves the same bytes our RPCs move.
PAYLOAD = b"x" * 400


async def _serve(port: int) -> None:
    async def echo(request: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        return request

    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Echo": grpc.unary_unary_rpc_method_handler(echo)},  # raw bytes in and out
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


async def _client(addr: str, callers: int, duration: float, result: Any) -> None:
    async with grpc.aio.insecure_channel(addr) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)  # raw bytes
        await call(PAYLOAD, timeout=10)  # connect before the clock starts
        counts = [0] * callers
        errors = [0] * callers
        deadline = time.monotonic() + duration

        async def loop(i: int) -> None:
            while time.monotonic() < deadline:
                try:
                    await call(PAYLOAD, timeout=5)
                    counts[i] += 1
                except grpc.aio.AioRpcError:
                    errors[i] += 1

        started, cpu_started = time.monotonic(), time.process_time()
        await asyncio.gather(*(loop(i) for i in range(callers)))
        # The client process's CPU (all its threads, gRPC's included) while it called: the echo client's cost.
        result.put((sum(counts), sum(errors), time.monotonic() - started, time.process_time() - cpu_started))


async def _open_client(addr: str, rate: float, duration: float, result: Any) -> None:
    async with grpc.aio.insecure_channel(addr) as channel:
        call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)  # raw bytes
        await call(PAYLOAD, timeout=10)  # connect before the clock starts
        outcomes = {"ok": 0, "errors": 0}

        async def one() -> None:
            try:
                await call(PAYLOAD, timeout=5)
                outcomes["ok"] += 1
            except grpc.aio.AioRpcError:
                outcomes["errors"] += 1

        calls: set[asyncio.Task[None]] = set()
        started, cpu_started = time.monotonic(), time.process_time()
        sent = 0
        while sent < rate * duration:  # the n-th call is due at n / rate, whether or not earlier ones returned
            due = started + sent / rate
            if (wait := due - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            task = asyncio.create_task(one())
            calls.add(task)
            task.add_done_callback(calls.discard)
            sent += 1
        await asyncio.gather(*calls)
        result.put((outcomes["ok"], outcomes["errors"], time.monotonic() - started, time.process_time() - cpu_started))


def _closed_process(addr: str, callers: int, duration: float, result: Any) -> None:
    asyncio.run(_client(addr, callers, duration, result))


def _open_process(addr: str, rate: float, duration: float, result: Any) -> None:
    asyncio.run(_open_client(addr, rate, duration, result))


def run_echo_load(addr: str, workers: int, concurrency: int, duration: float) -> dict[str, float]:
    """Closed-loop unary calls from `workers` processes; returns {"qps", "requests", "errors", "client_cpu_s"}."""
    per_worker = [concurrency // workers + (1 if i < concurrency % workers else 0) for i in range(workers)]
    return _run_clients(_closed_process, addr, [n for n in per_worker if n > 0], duration)


def run_echo_rate(addr: str, workers: int, rate: float, duration: float) -> dict[str, float]:
    """Open-loop unary calls at `rate` per second in all, spread over `workers` processes; returns the same as
    `run_echo_load`."""
    return _run_clients(_open_process, addr, [rate / workers] * workers, duration)


def _run_clients(target: Any, addr: str, shares: list[Any], duration: float) -> dict[str, float]:
    """One client process per share (its callers or its rate); sums what they report."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold gRPC state
    result = ctx.Queue()
    procs = [ctx.Process(target=target, args=(addr, share, duration, result)) for share in shares]
    for p in procs:
        p.start()
    outcomes = [result.get(timeout=duration + 60) for _ in procs]
    for p in procs:
        p.join(timeout=10)
    requests = sum(o[0] for o in outcomes)
    errors = sum(o[1] for o in outcomes)
    elapsed = max(o[2] for o in outcomes)
    client_cpu = sum(o[3] for o in outcomes)
    return {"qps": requests / elapsed, "requests": requests, "errors": errors, "client_cpu_s": client_cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description="minimal grpc.aio unary echo server")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port))


if __name__ == "__main__":
    main()
