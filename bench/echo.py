"""The gRPC physical limit: a minimal grpc.aio unary echo server, and a closed-loop client shaped like `cqrs load`.

The server is one Python process with one grpc.aio server, like each of our services, and does nothing but
return the request bytes (no protobuf, no I/O). The client runs `workers` processes, each with one channel and
`concurrency / workers` asyncio callers in a closed loop, the same client shape as `cqrs load --mode closed`.

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


def _client_process(addr: str, callers: int, duration: float, result: Any) -> None:
    asyncio.run(_client(addr, callers, duration, result))


def run_echo_load(addr: str, workers: int, concurrency: int, duration: float) -> dict[str, float]:
    """Closed-loop unary calls from `workers` processes; returns {"qps", "requests", "errors", "client_cpu_s"}."""
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold gRPC state
    result = ctx.Queue()
    per_worker = [concurrency // workers + (1 if i < concurrency % workers else 0) for i in range(workers)]
    procs = [ctx.Process(target=_client_process, args=(addr, n, duration, result)) for n in per_worker if n > 0]
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
