"""The local stack for one benchmark run: the three real servers and our three services, on free loopback ports.

Everything lives in a fresh temporary folder (data directories and log files), so a run never sees the data of
`make dev` or of an earlier run. The servers are the `localservers` classes the tests use; the services are started
by its one launcher (`localservers.ServiceProcess`) as `python -m <module>` subprocesses configured only by
environment variables, as `cqrsctl.dev` does, except that their output goes to log files (a benchmark prints one
table, not service logs).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from localservers import (
    LOOPBACK,
    MongoServer,
    NatsServer,
    PostgresServer,
    ServerProcess,
    ServerStartError,
    ServiceProcess,
    free_port,
    stop_all,
)

SERVER_START_TIMEOUT = 90.0


class StackError(RuntimeError):
    """A server or service failed to start or died."""


METRICS_PORT_VARIABLES = {
    "command_service": "CQRS_COMMAND_METRICS_PORT",
    "projector": "CQRS_PROJECTOR_METRICS_PORT",
    "query_service": "CQRS_QUERY_METRICS_PORT",
}


@dataclass
class BenchStack:
    """PostgreSQL, NATS JetStream, the MongoDB-wire server and (later) the three services."""

    workdir: Path
    postgres: PostgresServer = field(init=False)
    nats: NatsServer = field(init=False)
    mongo: MongoServer = field(init=False)
    services: dict[str, ServiceProcess] = field(default_factory=dict)
    mongo_database: str = "cqrs"
    # The /metrics port of each running service (chosen anew at every start).
    metrics_ports: dict[str, int] = field(default_factory=dict)

    def metrics_url(self, name: str) -> str:
        return f"http://{LOOPBACK}:{self.metrics_ports[name]}/metrics"

    def __post_init__(self) -> None:
        self.postgres = PostgresServer(self.workdir / "postgres", free_port())
        self.nats = NatsServer(self.workdir / "nats", free_port())
        self.mongo = MongoServer(self.workdir / "mongo", free_port())
        self.command_addr = f"{LOOPBACK}:{free_port()}"
        self.query_addr = f"{LOOPBACK}:{free_port()}"
        self.services = {
            name: ServiceProcess(name, listen=listen, log_path=self.workdir / f"{name}.log")
            for name, listen in (
                ("command_service", self.command_addr),
                ("projector", None),
                ("query_service", self.query_addr),
            )
        }

    @property
    def servers(self) -> list[ServerProcess]:
        return [self.postgres, self.nats, self.mongo]

    def start_servers(self) -> None:
        for server in self.servers:
            server.start(timeout=SERVER_START_TIMEOUT)

    def service_env(self) -> dict[str, str]:
        env = {**MongoServer.CLIENT_ENV, **os.environ}  # what the environment sets (a variant's setting) wins
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
        """Start one service and wait until its gRPC port listens (raise `StackError` when it does not)."""
        service = self.services[name]
        if service.running:
            raise StackError(f"{name} is already running")
        env = self.service_env()
        variable = METRICS_PORT_VARIABLES.get(name)
        if variable is not None:
            self.metrics_ports[name] = int(env[variable])
        service.start(env)
        try:
            # The projector listens on no gRPC port: it is ready once its metrics are (the bench scrapes them).
            service.wait_ready(also=None if variable is None else f"{LOOPBACK}:{env[variable]}")
        except ServerStartError as exc:
            raise StackError(str(exc)) from exc

    def stop_service(self, name: str) -> None:
        self.services[name].stop()

    def start_services(self) -> None:
        for name in self.services:
            self.start_service(name)

    def check_alive(self) -> None:
        """Raise `StackError` when a service that should run has died (with its log tail)."""
        for service in self.services.values():
            if service.returncode is not None:
                raise StackError(
                    f"{service.name} exited with code {service.returncode}; "
                    f"last lines of {service.log_path}:\n{service.tail()}"
                )

    def stop(self) -> list[BaseException]:
        """Stop the services, then the servers; return the errors met."""
        for service in self.services.values():
            with contextlib.suppress(Exception):
                service.stop()
        return stop_all(list(reversed(self.servers)))
