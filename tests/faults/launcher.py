"""`python -m tests.faults.launcher BASE_DIR PG_PORT NATS_PORT MONGO_PORT [NATS_NODES]`: owns one scenario's servers.

With `NATS_NODES` (JSON: `[[client, cluster, monitor], ...]`, one triple of ports per node) a JetStream cluster of
those nodes (kinds `nats0`, `nats1`, ...) replaces the single nats-server (kind `nats`; `NATS_PORT` is then unused).

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from localservers import MongoServer, NatsCluster, NatsServer, NodePorts, PostgresServer, ServerProcess, stop_all


def servers_for(
    base: Path, pg_port: int, nats_port: int, mongo_port: int, nats_nodes: Sequence[NodePorts] = ()
) -> dict[str, ServerProcess]:
    """The scenario's servers (same directories and ports on both sides of the pipe).

    With `nats_nodes`, the nodes of a JetStream cluster (`nats0`, `nats1`, ...) take the single `nats`'s place.
    """
    servers: dict[str, ServerProcess] = {"postgres": PostgresServer(base / "postgres" / "data", pg_port)}
    if nats_nodes:
        servers.update((node.name, node) for node in NatsCluster(base / "nats", ports=nats_nodes).nodes)
    else:
        servers["nats"] = NatsServer(base / "nats" / "data", nats_port)
    servers["mongo"] = MongoServer(base / "mongo" / "data", mongo_port)
    return servers


def encode_nats_nodes(nodes: Sequence[NodePorts]) -> str:
    """The `NATS_NODES` argument for these nodes."""
    return json.dumps([[n.client, n.cluster, n.monitor] for n in nodes])


def decode_nats_nodes(argument: str) -> list[NodePorts]:
    """The nodes a `NATS_NODES` argument describes."""
    return [NodePorts(int(client), int(cluster), int(monitor)) for client, cluster, monitor in json.loads(argument)]


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
    nats_nodes = decode_nats_nodes(argv[4]) if len(argv) > 4 else []
    servers = servers_for(base, int(argv[1]), int(argv[2]), int(argv[3]), nats_nodes)
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
        nats = [server for kind, server in servers.items() if kind not in ("mongo", "postgres")]
        errors = stop_all([servers["mongo"], *nats, servers["postgres"]])
        if errors:
            print(f"launcher: errors while stopping: {errors!r}", file=sys.stderr)
        pool.shutdown(wait=True)  # only now: the servers were forked from these threads
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
