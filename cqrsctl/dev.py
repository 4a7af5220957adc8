"""`make dev`: the whole system on this machine, on loopback, with one command.

Starts PostgreSQL, NATS JetStream and the MongoDB wire server (data under `./.data`, kept across restarts),
applies the event-store migration, then runs command_service, projector and query_service as child processes
with their output prefixed by name. Ctrl-C (or SIGTERM) stops the services, then the servers, and exits 0; a
service that dies on its own stops everything with a non-zero exit.

Environment:
  CQRS_DEV_POSTGRES_PORT / CQRS_DEV_NATS_PORT / CQRS_DEV_MONGO_PORT   ports of the local servers
                                                                      (55432 / 54222 / 57017)
  CQRS_DEV_DATA_DIR                                                   data folder (./.data)
  CQRS_DEV_NATS_NODES                                                 3: a 3-node JetStream cluster (client ports
                                                                      from CQRS_DEV_NATS_PORT up, routes +100,
                                                                      monitoring +200) and CQRS_STREAM_REPLICAS=3
  CQRS_POSTGRES_DSN / CQRS_NATS_URL / CQRS_MONGO_URL                  use this external server instead
  CQRS_COMMAND_LISTEN / CQRS_QUERY_LISTEN                             gRPC listen addresses
                                                                      (127.0.0.1:50051 / 127.0.0.1:50052)
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from cqrsctl.stores import MONGO, NATS, POSTGRES, Store, env_int, redact
from localservers import (
    SERVICE_READY_TIMEOUT,
    SERVICE_STOP_TIMEOUT,
    MongoServer,
    NatsCluster,
    NatsServer,
    NodePorts,
    PostgresServer,
    ServerProcess,
    ServerStartError,
    ServiceProcess,
    port_is_free,
    split_address,
    stop_all,
    stop_services,
)

DEFAULT_COMMAND_LISTEN = "127.0.0.1:50051"
DEFAULT_QUERY_LISTEN = "127.0.0.1:50052"
# command_service, projector, query_service; `cqrs status` looks at the first two by default.
DEFAULT_METRICS_PORTS = ("9101", "9102", "9103")
SERVER_START_TIMEOUT = 90.0
MIGRATE_TIMEOUT = 120.0

_print_lock = threading.Lock()


def say(message: str = "") -> None:
    """Print a launcher message, never interleaved mid-line with the services' output."""
    with _print_lock:
        print(message, flush=True)


class Shutdown(BaseException):
    """Raised from the signal handler: Ctrl-C or SIGTERM asked us to stop everything."""


class ServiceExited(Exception):
    """A service or server exited while it should be running."""


def _service(name: str, listen: str | None) -> ServiceProcess:
    """One of our three processes, run as `python -m <name>`, its output copied to ours prefixed by its name."""
    prefix = f"{name:<15}| "

    def on_line(line: str) -> None:
        with _print_lock:
            sys.stdout.write(prefix + line + "\n")
            sys.stdout.flush()

    return ServiceProcess(name, listen=listen, on_line=on_line)


@dataclass
class Endpoint:
    """Where one server is: started here (`server` set) or external (from the environment)."""

    label: str
    url: str
    server: ServerProcess | None
    note: str = ""  # what the table says instead of the server's log


@contextlib.contextmanager
def _signals_raise_shutdown() -> Iterator[None]:
    """Turn SIGINT/SIGTERM/SIGHUP into `Shutdown` inside the block; ignore them afterwards, while we clean up."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Shutdown(signal.Signals(signum).name)

    # SIGHUP too: closing the terminal must not orphan the servers (they run in their own sessions).
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in signals}
    try:
        yield
    finally:
        # Cleanup is bounded; a second Ctrl-C must not interrupt it halfway and leave servers behind.
        for sig in previous:
            signal.signal(sig, signal.SIG_IGN)


def _start_servers(data_dir: Path, started: list[ServerProcess]) -> list[Endpoint]:
    """Start each server not given by the environment; `started` collects them for the cleanup."""
    endpoints: list[Endpoint] = []
    # The ports are the ones the `cqrs` tools default to (`cqrsctl.stores`).
    specs: list[tuple[str, Store, type[ServerProcess], str]] = [
        ("PostgreSQL", POSTGRES, PostgresServer, "postgres"),
        ("NATS JetStream", NATS, NatsServer, "nats"),
        ("MongoDB (SecantusDB)", MONGO, MongoServer, "mongo"),
    ]
    for label, store, kind, sub in specs:
        external = os.environ.get(store.variable, "").strip()
        if external:
            say(f"using external {label} from {store.variable}: {redact(external)}")
            endpoints.append(Endpoint(label, external, None))
            continue
        port = store.dev_port()
        if kind is NatsServer and _nats_nodes() > 1:
            endpoints.append(_start_nats_cluster(data_dir, port, started))
            continue
        server = kind(data_dir / sub, port)
        say(f"starting {label} on {server.address} ...")
        began = time.monotonic()
        server.start(timeout=SERVER_START_TIMEOUT)
        started.append(server)
        say(f"  {label} ready in {time.monotonic() - began:.1f}s (pid {server.pid})")
        endpoints.append(Endpoint(label, server.url, server))
    return endpoints


def _nats_nodes() -> int:
    return env_int("CQRS_DEV_NATS_NODES", 1)


def _start_nats_cluster(data_dir: Path, first_port: int, started: list[ServerProcess]) -> Endpoint:
    """A JetStream cluster of `CQRS_DEV_NATS_NODES` nodes; its data is apart from the single server's."""
    size = _nats_nodes()
    ports = [NodePorts(first_port + i, first_port + 100 + i, first_port + 200 + i) for i in range(size)]
    cluster = NatsCluster(data_dir / "nats-cluster", ports=ports)
    say(f"starting a {size}-node NATS JetStream cluster on {cluster.url} ...")
    began = time.monotonic()
    cluster.start(timeout=SERVER_START_TIMEOUT)
    started.extend(cluster.nodes)
    say(f"  NATS JetStream cluster ready in {time.monotonic() - began:.1f}s")
    for node in cluster.nodes:
        say(f"  {node.name}: {node.url}  monitoring {node.monitor_url}  log {_relative(node.log_path)}")
    return Endpoint(f"NATS JetStream ({size} nodes)", cluster.url, None, f"logs {_relative(cluster.base_dir)}")


def _metrics_ports() -> dict[str, str]:
    """Each service's metrics port: the environment's, else one apart per service where `cqrs status` looks."""
    names = ("CQRS_COMMAND_METRICS_PORT", "CQRS_PROJECTOR_METRICS_PORT", "CQRS_QUERY_METRICS_PORT")
    return {name: os.environ.get(name, default) for name, default in zip(names, DEFAULT_METRICS_PORTS, strict=True)}


def _service_env(postgres: str, nats: str, mongo: str, command_listen: str, query_listen: str) -> dict[str, str]:
    env = dict(os.environ)
    if _nats_nodes() > 1:  # the stream the relay creates is replicated on every node (3 for a 3-node cluster)
        env.setdefault("CQRS_STREAM_REPLICAS", str(min(_nats_nodes(), 5)))
    env.update(
        {
            "CQRS_POSTGRES_DSN": postgres,
            "CQRS_NATS_URL": nats,
            "CQRS_MONGO_URL": mongo,
            "CQRS_COMMAND_LISTEN": command_listen,
            "CQRS_QUERY_LISTEN": query_listen,
            "PYTHONUNBUFFERED": "1",
            **_metrics_ports(),
        }
    )
    return env


def _migrate(env: dict[str, str]) -> None:
    say("applying the event-store migration (python -m cqrsctl.main migrate) ...")
    result = subprocess.run(
        [sys.executable, "-m", "cqrsctl.main", "migrate"], env=env, timeout=MIGRATE_TIMEOUT, check=False
    )
    if result.returncode != 0:
        raise ServiceExited(f"migration failed with exit code {result.returncode}")


def _check_listen_free(services: list[ServiceProcess]) -> None:
    for service in services:
        if service.listen is None:
            continue
        host, port = split_address(service.listen)
        if not port_is_free(host, port):
            raise ServiceExited(
                f"{service.name} cannot listen on {service.listen}: the port is in use (another `make dev`?)"
            )


def _wait_services_ready(services: list[ServiceProcess]) -> None:
    for service in services:
        try:
            service.wait_ready(SERVICE_READY_TIMEOUT)
        except ServerStartError as exc:
            raise ServiceExited(str(exc)) from None
    for service in services:
        if service.returncode is not None:
            raise ServiceExited(f"{service.name} exited with code {service.returncode} while starting")


def _print_table(endpoints: list[Endpoint], services: list[ServiceProcess], data_dir: Path) -> None:
    rows: list[tuple[str, str, str]] = []
    for endpoint in endpoints:
        if endpoint.note:
            rows.append((endpoint.label, endpoint.url, endpoint.note))
        elif endpoint.server is None:
            rows.append((endpoint.label, redact(endpoint.url), "external"))
        else:
            rows.append((endpoint.label, endpoint.url, f"log {_relative(endpoint.server.log_path)}"))
    for service in services:
        where = f"gRPC {service.listen}" if service.listen else "(no port: JetStream consumer)"
        rows.append((service.name, where, f"pid {service.pid}"))
    width = max(len(r[0]) for r in rows)
    url_width = max(len(r[1]) for r in rows)
    lines = [f"  {label:<{width}}  {where:<{url_width}}  {note}" for label, where, note in rows]
    rule = "=" * max(len(line) for line in lines)
    command_listen = services[0].listen or DEFAULT_COMMAND_LISTEN
    query_listen = services[2].listen or DEFAULT_QUERY_LISTEN
    demo = "cqrs demo"
    if command_listen != DEFAULT_COMMAND_LISTEN:
        demo += f" --command-addr {command_listen}"
    if query_listen != DEFAULT_QUERY_LISTEN:
        demo += f" --query-addr {query_listen}"
    say(rule)
    say("The CQRS dev stack is running:")
    for line in lines:
        say(line)
    say(f"  data: {_relative(data_dir)}  (kept across restarts; `make clean-data` wipes it)")
    say(f"Try it from another terminal:  {demo}   (or .venv/bin/{demo})")
    ports = _metrics_ports()
    command, projector, query = (ports[f"CQRS_{name}_METRICS_PORT"] for name in ("COMMAND", "PROJECTOR", "QUERY"))
    status = "cqrs status"
    if (command, projector) != DEFAULT_METRICS_PORTS[:2]:
        status += (
            f" --command-metrics http://127.0.0.1:{command}/metrics"
            f" --projector-metrics http://127.0.0.1:{projector}/metrics"
        )
    metrics = f"metrics: command :{command}, projector :{projector}, query :{query}"
    say(f"Replication lag and backlog:   {status}   ({metrics})")
    say("Audit the read model:          cqrs verify   (the cqrs tools default to this stack's servers)")
    say("Ctrl-C stops everything.")
    say(rule)


def _relative(path: Path) -> str:
    try:
        return f"./{path.relative_to(Path.cwd())}"
    except ValueError:
        return str(path)


def _watch(services: list[ServiceProcess], servers: list[ServerProcess]) -> None:
    """Block until a service or server exits (raise `ServiceExited`) or a signal raises `Shutdown`."""
    while True:
        for service in services:
            code = service.returncode
            if code is not None:
                raise ServiceExited(f"{service.name} exited unexpectedly with code {code}")
        for server in servers:
            if not server.running:
                raise ServiceExited(
                    f"{server.name} exited unexpectedly with code {server.returncode}; see {server.log_path}"
                )
        time.sleep(0.5)


def _stop_services(services: list[ServiceProcess]) -> None:
    running = [s for s in services if s.running]
    if running:
        say(f"stopping {', '.join(s.name for s in running)} ...")
    for name in stop_services(services, SERVICE_STOP_TIMEOUT):
        say(f"{name} did not stop within {SERVICE_STOP_TIMEOUT:.0f}s: killed it")


def run() -> int:
    """Run the dev stack until Ctrl-C/SIGTERM (exit code 0) or until something fails (exit code 1)."""
    data_dir = Path(os.environ.get("CQRS_DEV_DATA_DIR", ".data")).resolve()
    command_listen = os.environ.get("CQRS_COMMAND_LISTEN", DEFAULT_COMMAND_LISTEN)
    query_listen = os.environ.get("CQRS_QUERY_LISTEN", DEFAULT_QUERY_LISTEN)
    services = [
        _service("command_service", command_listen),
        _service("projector", None),
        _service("query_service", query_listen),
    ]
    servers: list[ServerProcess] = []
    exit_code = 0
    try:
        with _signals_raise_shutdown():
            try:
                data_dir.mkdir(parents=True, exist_ok=True)
                _check_listen_free(services)
                endpoints = _start_servers(data_dir, servers)
                env = _service_env(endpoints[0].url, endpoints[1].url, endpoints[2].url, command_listen, query_listen)
                if isinstance(endpoints[2].server, MongoServer):  # the local stand-in, not an external MongoDB
                    env = {**MongoServer.CLIENT_ENV, **env}  # what the environment sets wins
                _migrate(env)
                for service in services:
                    say(f"starting {service.name} (python -m {service.module}) ...")
                    service.start(env)
                _wait_services_ready(services)
                _print_table(endpoints, services, data_dir)
                _watch(services, servers)
            except (ServiceExited, ServerStartError, OSError, subprocess.TimeoutExpired) as exc:
                say(f"\nERROR: {exc}")
                if "already in use" in str(exc):
                    say("(another `make dev` still running? ports: CQRS_DEV_POSTGRES_PORT, CQRS_DEV_NATS_PORT,")
                    say(" CQRS_DEV_MONGO_PORT, CQRS_COMMAND_LISTEN, CQRS_QUERY_LISTEN)")
                say("stopping everything ...")
                exit_code = 1
    except Shutdown as signal_name:
        say(f"\n{signal_name} received: stopping everything ...")
    finally:
        _stop_services(services)
        errors = stop_all(list(reversed(servers)))
        for error in errors:
            say(f"ERROR while stopping a server: {error}")
            exit_code = exit_code or 1
        say("dev stack stopped." if exit_code == 0 else "dev stack stopped after a failure.")
    return exit_code


def main() -> None:
    """Entry point of `python -m cqrsctl.dev`."""
    sys.exit(run())


if __name__ == "__main__":
    main()
