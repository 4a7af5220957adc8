"""The dedicated servers and service subprocesses of one fault scenario (`FaultStack`), and the operator commands
run against them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from localservers import (
    MongoServer,
    NodePorts,
    PostgresServer,
    ServerProcess,
    free_port,
    log_tail,
    with_parent_death_signal,
)
from tests.faults.support import ACK_WAIT, MONGO_TIMEOUT_MS, POSTGRES_TIMEOUT, REPO_ROOT, Names, Service


class FaultStack:
    """Dedicated PostgreSQL, NATS and MongoDB servers for one scenario (free ports, data in a temp dir) plus the
    services it starts. Scenarios kill and pause these servers, so they are never the shared session servers.

    The servers are owned by a launcher subprocess (`tests.faults.launcher`, see there why); the `ServerProcess`
    objects here describe them (URLs, log files) and are never started in this process.
    """

    def __init__(self, base_dir: Path, name: str, *, nats_nodes: int = 1) -> None:
        """`nats_nodes` > 1: a JetStream cluster of that many nodes (`self.nats_nodes`) instead of one nats-server;
        `self.nats` is then its first node and `nats_url` lists them all."""
        from tests.faults.launcher import servers_for

        self.base_dir = base_dir
        self.names = Names(name)
        self._ports = (free_port(), free_port(), free_port())
        self._node_ports = [NodePorts.free() for _ in range(nats_nodes)] if nats_nodes > 1 else []
        described = servers_for(base_dir, *self._ports, self._node_ports)
        postgres = described["postgres"]
        assert isinstance(postgres, PostgresServer)
        self.postgres = postgres
        self.nats_nodes: list[ServerProcess] = [s for kind, s in described.items() if kind.startswith("nats")]
        self.nats = self.nats_nodes[0]
        self.mongo = described["mongo"]
        self.servers: tuple[ServerProcess, ...] = (self.postgres, *self.nats_nodes, self.mongo)
        self._pids: dict[str, int] = {}
        self._launcher: asyncio.subprocess.Process | None = None
        self._lock = asyncio.Lock()
        self.services: list[Service] = []

    # ---- addresses

    @property
    def dsn(self) -> str:
        return self.postgres.dsn

    @property
    def nats_url(self) -> str:
        """The NATS server's URL, or every cluster node's, comma-separated (`CQRS_NATS_URL`)."""
        return ",".join(node.url for node in self.nats_nodes)

    @property
    def mongo_url(self) -> str:
        return self.mongo.url

    # ---- servers

    async def _request(self, timeout: float, **request: Any) -> dict[str, Any]:
        assert self._launcher is not None and self._launcher.stdin and self._launcher.stdout
        async with self._lock:
            self._launcher.stdin.write((json.dumps(request) + "\n").encode())
            await self._launcher.stdin.drain()
            try:
                line = await asyncio.wait_for(self._launcher.stdout.readline(), timeout=timeout)
            except TimeoutError:
                raise AssertionError(f"server launcher did not answer {request} within {timeout}s") from None
        if not line:
            raise AssertionError(f"server launcher exited: {log_tail(self.base_dir / 'launcher.log')}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.get("ok"):
            raise AssertionError(f"server launcher: {request} failed: {reply.get('error')}")
        return reply

    async def start_servers(self) -> None:
        from tests.faults.launcher import encode_nats_nodes

        with (self.base_dir / "launcher.log").open("ab") as log:
            self._launcher = await asyncio.create_subprocess_exec(
                *with_parent_death_signal(
                    [
                        sys.executable,
                        "-m",
                        "tests.faults.launcher",
                        str(self.base_dir),
                        *map(str, self._ports),
                        *([encode_nats_nodes(self._node_ports)] if self._node_ports else []),
                    ],
                    signal.SIGTERM,
                ),
                cwd=REPO_ROOT,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
            )
        await self._request(180, op="start_all")
        for server in self.servers:
            self._pids[server.name] = int((await self._request(10, op="status", kind=server.name))["pid"])
        from command_service.migrate import migrate

        await migrate(self.dsn)

    async def kill_server(self, server: ServerProcess) -> None:
        """SIGKILL the server's whole process group (PostgreSQL's backends too), as an OOM kill would."""
        await self._request(20, op="kill", kind=server.name)

    async def stop_server(self, server: ServerProcess) -> None:
        """Stops the server as an orderly shutdown does (SIGTERM, then its exit: a NATS node hands over the
        leaderships it holds first); SIGKILLed after 15 s."""
        await self._request(30, op="stop", kind=server.name)

    async def restart_server(self, server: ServerProcess) -> float:
        """Starts the server again on its port and data; returns the seconds it took to become ready."""
        started = time.monotonic()
        reply = await self._request(70, op="start", kind=server.name)
        self._pids[server.name] = int(reply["pid"])
        return time.monotonic() - started

    def pause_server(self, server: ServerProcess) -> None:
        os.killpg(self._pids[server.name], signal.SIGSTOP)

    def resume_server(self, server: ServerProcess) -> None:
        with contextlib.suppress(ProcessLookupError, KeyError):
            os.killpg(self._pids[server.name], signal.SIGCONT)

    # ---- services

    def _log(self, stem: str) -> Path:
        return self.base_dir / f"{stem}-{len(self.services)}.log"

    def command_env(
        self, port: int, *, dsn: str | None = None, nats_url: str | None = None, **extra: str
    ) -> dict[str, str]:
        n = self.names
        return {
            "CQRS_POSTGRES_DSN": dsn or self.dsn,
            "CQRS_NATS_URL": nats_url or self.nats_url,
            "CQRS_STREAM_NAME": n.stream,
            "CQRS_SUBJECT_PREFIX": n.prefix,
            "CQRS_COMMAND_LISTEN": f"127.0.0.1:{port}",
            "CQRS_GRACE_SECONDS": "1",
            "CQRS_RELAY_POLL_SECONDS": "0.2",
            "CQRS_RELAY_BATCH_SIZE": "50",
            "CQRS_POSTGRES_TIMEOUT_SECONDS": str(POSTGRES_TIMEOUT),
            "CQRS_POSTGRES_POOL_MAX": "8",
            "CQRS_LOG_LEVEL": "INFO",
            **extra,
        }

    def projector_env(
        self, *, mongo_url: str | None = None, nats_url: str | None = None, **extra: str
    ) -> dict[str, str]:
        n = self.names
        return {
            "CQRS_NATS_URL": nats_url or self.nats_url,
            "CQRS_MONGO_URL": mongo_url or self.mongo_url,
            "CQRS_MONGO_DATABASE": n.name,
            "CQRS_MONGO_TIMEOUT_MS": str(MONGO_TIMEOUT_MS),
            "CQRS_STREAM_NAME": n.stream,
            "CQRS_SUBJECT_PREFIX": n.prefix,
            "CQRS_PROJECTOR_DURABLE": n.durable,
            "CQRS_PROJECTOR_ACK_WAIT_SECONDS": str(ACK_WAIT),
            "CQRS_PROJECTOR_BATCH_SIZE": "50",
            "CQRS_PROJECTOR_FETCH_TIMEOUT_SECONDS": "0.2",
            "CQRS_PROJECTOR_MAX_BACKOFF_SECONDS": "1",
            # Partition leases: a killed replica's partitions are taken over within about this long.
            "CQRS_PROJECTOR_LEASE_SECONDS": "3",
            "CQRS_GRACE_SECONDS": "1",
            "CQRS_LOG_LEVEL": "INFO",
            # As `make dev` and the benchmarks run it against this server: a batch's calls one after the other (the
            # in-process pipeline tests send them together, the production default).
            **MongoServer.CLIENT_ENV,
            **extra,
        }

    def query_env(self, port: int, *, mongo_url: str | None = None) -> dict[str, str]:
        return {
            "CQRS_MONGO_URL": mongo_url or self.mongo_url,
            "CQRS_MONGO_DATABASE": self.names.name,
            "CQRS_MONGO_TIMEOUT_MS": str(MONGO_TIMEOUT_MS),
            "CQRS_QUERY_LISTEN": f"127.0.0.1:{port}",
            "CQRS_GRACE_SECONDS": "1",
            "CQRS_LOG_LEVEL": "INFO",
        }

    async def command_service(
        self, *, wait: bool = True, failpoints: str | None = None, **env_overrides: Any
    ) -> Service:
        port = free_port()
        service = Service(
            "command_service",
            self.command_env(port, **env_overrides),
            self._log("command_service"),
            f"127.0.0.1:{port}",
        )
        self.services.append(service)
        await service.start(extra_env={"CQRS_FAILPOINTS": failpoints} if failpoints else None)
        if wait:
            await service.wait_serving()
        return service

    async def projector(self, *, failpoints: str | None = None, **env_overrides: Any) -> Service:
        """A projector replica with /metrics on a port of its own, once it reports SERVING."""
        metrics_port = int(env_overrides.pop("CQRS_PROJECTOR_METRICS_PORT", 0)) or free_port()
        env = self.projector_env(CQRS_PROJECTOR_METRICS_PORT=str(metrics_port), **env_overrides)
        service = Service("projector", env, self._log("projector"), metrics_port=metrics_port)
        self.services.append(service)
        await service.start(extra_env={"CQRS_FAILPOINTS": failpoints} if failpoints else None)
        await service.wait_projector_serving()
        return service

    async def query_service(self, *, wait: bool = True, **env_overrides: Any) -> Service:
        port = free_port()
        service = Service(
            "query_service", self.query_env(port, **env_overrides), self._log("query_service"), f"127.0.0.1:{port}"
        )
        self.services.append(service)
        await service.start()
        if wait:
            await service.wait_serving()
        return service

    # ---- operator commands

    async def rebuild_and_cut_over(self, timeout: float) -> dict[str, Any]:
        """`cqrs rebuild --cutover` as an operator runs it, while the system runs: a new generation of the read
        model built from PostgreSQL, caught up, compared on a sample with the live one, and the projectors switched
        to it. Returns its `--json` result; fails the scenario unless it switched within `timeout`.

        No `--accept-differences`: the comparison must find the two equal under the load and the faults, as the
        deployment Job needs it to. Each load client keeps one customer busy: its statistics and the day's report
        are hot keys, checked on each side against their own sources (the report between the folds of the facts
        its orders' checkpoints say it counts and of all of them, whichever replicas are behind). The audit at the
        end checks the generation switched to against every event in PostgreSQL."""
        args = ["--cutover", "--sample", "200"]
        result = await self._rebuild(args, timeout, "cqrs rebuild --cutover")
        assert result.get("cutover"), f"cqrs rebuild --cutover did not switch: {result}"
        return result

    async def activate(self, generation: int, timeout: float) -> dict[str, Any]:
        """`cqrs rebuild --activate <generation>` while the system runs: a rollback to a retired generation (the
        event store replayed into it, then the same switch). Returns its `--json` result (the switch)."""
        return await self._rebuild(["--activate", str(generation)], timeout, f"cqrs rebuild --activate {generation}")

    async def _rebuild(self, args: list[str], timeout: float, what: str) -> dict[str, Any]:
        """Runs `cqrs rebuild` (`python -m cqrsctl.main`, a subprocess, its log beside the scenario's) with `--json`;
        returns its result, or fails the scenario unless it exits 0 within `timeout`."""
        log_path = self.base_dir / f"rebuild-{int(time.time() * 1000)}.log"
        env = {
            **os.environ,
            "CQRS_POSTGRES_DSN": self.dsn,
            "CQRS_MONGO_URL": self.mongo_url,
            "CQRS_MONGO_DATABASE": self.names.name,
            "CQRS_LOG_LEVEL": "INFO",
        }
        with log_path.open("ab") as log:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "cqrsctl.main", "rebuild", *args, "--no-progress", "--json", cwd=REPO_ROOT,
                env=env, stdout=asyncio.subprocess.PIPE, stderr=log,
            )  # fmt: skip
            try:
                out, _ = await asyncio.wait_for(process.communicate(), timeout)
            except TimeoutError:
                process.kill()
                await process.wait()
                raise AssertionError(f"{what} did not end within {timeout:.0f}s: {log_tail(log_path)}") from None
        if process.returncode != 0:  # 1: documents differ, listed in its output
            raise AssertionError(f"{what} exited {process.returncode}: {out.decode()[:4000]}\n{log_tail(log_path)}")
        result: dict[str, Any] = json.loads(out)
        return result

    # ---- teardown

    async def close(self) -> None:
        """SIGKILL everything: the scenario is over and its data is thrown away (a clean stop only costs time)."""
        for server in self.servers:  # a stopped process still dies of SIGKILL, but resume anyway for the logs
            self.resume_server(server)
        await asyncio.gather(*(s.kill() for s in self.services), return_exceptions=True)
        launcher = self._launcher
        if launcher is not None and launcher.returncode is None:
            with contextlib.suppress(AssertionError, OSError):
                await self._request(30, op="kill_all")
            assert launcher.stdin is not None
            launcher.stdin.close()  # EOF: the launcher exits
            try:
                await asyncio.wait_for(launcher.wait(), timeout=30)
            except TimeoutError:
                launcher.kill()
                await launcher.wait()

    def diagnostics(self) -> str:
        """The tail of every log, for a failing scenario's report."""
        parts = []
        for service in self.services:
            parts.append(f"--- {service.log_path.name} (rc={service.returncode})\n{service.tail(2500)}")
        for server in self.servers:
            parts.append(f"--- {server.log_path}\n{log_tail(server.log_path, 1200)}")
        return "\n".join(parts)
