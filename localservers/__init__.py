"""The local stack's processes: the three real servers (PostgreSQL, NATS JetStream, the MongoDB wire server) and
our own services, each run as a child process on loopback.

Used by `make dev` (`cqrsctl.dev`), the test fixtures (`tests/conftest.py`, `tests/faults/`) and the benchmark
(`bench/`). One module a job: `ports` (free ports, waiting for a listener), `process` (how a child is spawned,
logged and stopped), `server` (the server base class), `postgres`, `nats`, `nats_cluster` (a JetStream cluster of
N nodes), `mongo`, and `services` (the one launcher of `python -m <service>` processes).
"""

from localservers.mongo import MongoServer
from localservers.nats import ExternalNatsServer, NatsHandle, NatsServer
from localservers.nats_cluster import DEFAULT_SYNC_INTERVAL, NatsCluster, NatsClusterNode, NodePorts
from localservers.ports import LOOPBACK, ephemeral_range_start, free_port, port_is_free, split_address, wait_for_port
from localservers.postgres import PostgresServer
from localservers.process import (
    ChildProcess,
    RunAs,
    ServerStartError,
    find_binary,
    launch_command,
    log_tail,
    with_parent_death_signal,
)
from localservers.server import ServerProcess, stop_all
from localservers.services import SERVICE_READY_TIMEOUT, SERVICE_STOP_TIMEOUT, ServiceProcess, stop_services

__all__ = [
    "DEFAULT_SYNC_INTERVAL",
    "LOOPBACK",
    "SERVICE_READY_TIMEOUT",
    "SERVICE_STOP_TIMEOUT",
    "ChildProcess",
    "ExternalNatsServer",
    "MongoServer",
    "NatsCluster",
    "NatsClusterNode",
    "NatsHandle",
    "NatsServer",
    "NodePorts",
    "PostgresServer",
    "RunAs",
    "ServerProcess",
    "ServerStartError",
    "ServiceProcess",
    "ephemeral_range_start",
    "find_binary",
    "free_port",
    "launch_command",
    "log_tail",
    "port_is_free",
    "split_address",
    "stop_all",
    "stop_services",
    "wait_for_port",
    "with_parent_death_signal",
]
