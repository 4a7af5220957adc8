"""The local stack for one benchmark run: the three real servers and our three services, on free loopback ports.

Everything lives in a fresh temporary folder (data directories and log files), so a run never sees the data of
`make dev` or of an earlier run. The servers are the devstack classes the tests use; the services are started
as `python -m <module>` subprocesses configured only by environment variables, as `cqrsctl.dev` does, except
that their output goes to log files (a benchmark prints one table, not service logs).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from cqrsctl.devstack import (
    LOOPBACK,
    MongoServer,
    NatsServer,
    PostgresServer,
    ServerProcess,
    free_port,
    log_tail,
    stop_all,
    wait_for_port,
    with_parent_death_signal,
)

SERVER_START_TIMEOUT = 90.0
SERVICE_READY_TIMEOUT = 60.0
SERVICE_STOP_TIMEOUT = 15.0


class StackError(RuntimeError):
    """A server or service failed to start or died."""


@dataclass
class ServiceProcess:
    """One of our services run as `python -m <module>` with its output in `log_path`."""

    name: str
    module: str
    log_path: Path
    listen: str | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self, env: dict[str, str]) -> None:
        if self.running:
            raise StackError(f"{self.name} is already running")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                with_parent_death_signal([sys.executable, "-m", self.module], signal.SIGTERM),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if self.listen is not None:
            host, _, port = self.listen.rpartition(":")
            try:
                wait_for_port(
                    host, int(port), SERVICE_READY_TIMEOUT, self.name, process=self.process, log_path=self.log_path
                )
            except Exception as exc:
                self.stop()
                raise StackError(str(exc)) from exc

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float = SERVICE_STOP_TIMEOUT) -> None:
        """SIGTERM (graceful), then SIGKILL of its process group after `timeout`."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@dataclass
class BenchStack:
    """PostgreSQL, NATS JetStream, the MongoDB-wire server and (later) the three services."""

    workdir: Path
    postgres: PostgresServer = field(init=False)
    nats: NatsServer = field(init=False)
    mongo: MongoServer = field(init=False)
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    mongo_database: str = "cqrs"

    def __post_init__(self) -> None:
        self.postgres = PostgresServer(self.workdir / "postgres", free_port())
        self.nats = NatsServer(self.workdir / "nats", free_port())
        self.mongo = MongoServer(self.workdir / "mongo", free_port())
        self.command_addr = f"{LOOPBACK}:{free_port()}"
        self.query_addr = f"{LOOPBACK}:{free_port()}"
        self.services = {
            "command_service": ServiceProcess(
                "command_service", "command_service", self.workdir / "command_service.log", self.command_addr
            ),
            "projector": ServiceProcess("projector", "projector", self.workdir / "projector.log"),
            "query_service": ServiceProcess(
                "query_service", "query_service", self.workdir / "query_service.log", self.query_addr
            ),
        }

    @property
    def servers(self) -> list[ServerProcess]:
        return [self.postgres, self.nats, self.mongo]

    def start_servers(self) -> None:
        for server in self.servers:
            server.start(timeout=SERVER_START_TIMEOUT)

    def service_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "CQRS_POSTGRES_DSN": self.postgres.dsn,
                "CQRS_NATS_URL": self.nats.url,
                "CQRS_MONGO_URL": self.mongo.url,
                "CQRS_MONGO_DATABASE": self.mongo_database,
                "CQRS_COMMAND_LISTEN": self.command_addr,
                "CQRS_QUERY_LISTEN": self.query_addr,
                "CQRS_LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1",
            }
        )
        # Metrics ports of a `make dev` on this machine must not clash with ours: let the OS pick them.
        for name in ("CQRS_COMMAND_METRICS_PORT", "CQRS_PROJECTOR_METRICS_PORT", "CQRS_QUERY_METRICS_PORT"):
            env[name] = str(free_port())
        return env

    def migrate(self) -> None:
        result = subprocess.run(
            [sys.executable, "-m", "cqrsctl.main", "migrate"],
            env=self.service_env(),
            capture_output=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise StackError(f"migration failed ({result.returncode}): {result.stderr.decode(errors='replace')}")

    def start_service(self, name: str) -> None:
        self.services[name].start(self.service_env())

    def stop_service(self, name: str) -> None:
        self.services[name].stop()

    def start_services(self) -> None:
        for name in self.services:
            self.start_service(name)

    def check_alive(self) -> None:
        """Raise `StackError` when a service that should run has died (with its log tail)."""
        for service in self.services.values():
            if service.process is not None and service.process.poll() is not None:
                raise StackError(
                    f"{service.name} exited with code {service.process.returncode}; "
                    f"last lines of {service.log_path}:\n{log_tail(service.log_path)}"
                )

    def stop(self) -> list[BaseException]:
        """Stop the services, then the servers; return the errors met."""
        for service in self.services.values():
            with contextlib.suppress(Exception):
                service.stop()
        return stop_all(list(reversed(self.servers)))
