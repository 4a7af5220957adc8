"""`python -m tests.faults.launcher BASE_DIR PG_PORT NATS_PORT MONGO_PORT`: owns one scenario's servers.

Why a separate process: PostgreSQL must be started as another user when we are root, which makes
`subprocess.Popen` use a plain `fork()` (no `vfork`); forking the test process while gRPC and the asyncio load
are running in it crashed the child (SIGSEGV before `exec`) in our runs. This launcher is a small single-threaded
process without gRPC, so it can start, kill and restart the servers (and be their parent, which must reap them) at
any time.

Protocol: one JSON object per line on stdin (`{"op": "start"|"stop"|"kill"|"status", "kind": ...}`, or
`{"op": "start_all"|"kill_all"}`),
one JSON reply per line on stdout (`{"ok": true, "pid": ...}` or `{"ok": false, "error": "..."}`). At EOF (the
test process is done or died) every server is stopped cleanly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from localservers import MongoServer, NatsServer, PostgresServer, ServerProcess, stop_all


def servers_for(base: Path, pg_port: int, nats_port: int, mongo_port: int) -> dict[str, ServerProcess]:
    """The scenario's servers (same directories and ports on both sides of the pipe)."""
    return {
        "postgres": PostgresServer(base / "postgres" / "data", pg_port),
        "nats": NatsServer(base / "nats" / "data", nats_port),
        "mongo": MongoServer(base / "mongo" / "data", mongo_port),
    }


def _kill(server: ServerProcess) -> None:
    pid = server.pid
    if pid is None or not server.running:
        raise RuntimeError(f"{server.name} is not running")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)  # the whole group: PostgreSQL's backends die with the postmaster
    deadline = time.monotonic() + 10
    while server.running:  # `running` polls, which reaps the child
        if time.monotonic() > deadline:
            raise RuntimeError(f"{server.name} (pid {pid}) still alive 10s after SIGKILL")
        time.sleep(0.02)


def _handle(servers: dict[str, ServerProcess], request: dict[str, Any], pool: ThreadPoolExecutor) -> dict[str, Any]:
    op = request["op"]
    if op == "start_all":  # concurrently; the pool's threads live as long as the launcher (parent-death signal)
        timeout = float(request.get("timeout", 90))
        for future in [pool.submit(s.start, timeout=timeout) for s in servers.values()]:
            future.result()
        return {"ok": True}
    if op == "kill_all":  # teardown: the data is thrown away, a clean shutdown would only cost time
        for server in servers.values():
            if server.running:
                _kill(server)
        return {"ok": True}
    server = servers[request["kind"]]
    if op == "start":
        server.start(timeout=float(request.get("timeout", 60)))
    elif op == "stop":
        server.stop(float(request.get("timeout", 15)))
    elif op == "kill":
        _kill(server)
    elif op != "status":
        raise ValueError(f"unknown op {op!r}")
    return {"ok": True, "pid": server.pid, "running": server.running}


def main(argv: list[str]) -> int:
    base = Path(argv[0])
    servers = servers_for(base, int(argv[1]), int(argv[2]), int(argv[3]))
    # SIGTERM/SIGINT (from the test process' teardown or a terminal) still stop the servers cleanly.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    pool = ThreadPoolExecutor(max_workers=len(servers), thread_name_prefix="launcher")
    try:
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                reply = _handle(servers, json.loads(line), pool)
            except Exception as exc:
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            sys.stdout.write(json.dumps(reply) + "\n")
            sys.stdout.flush()
    finally:
        for server in servers.values():  # a paused server would never stop
            if server.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGCONT)
        errors = stop_all([servers["mongo"], servers["nats"], servers["postgres"]])
        if errors:
            print(f"launcher: errors while stopping: {errors!r}", file=sys.stderr)
        pool.shutdown(wait=True)  # only now: the servers were forked from these threads
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
