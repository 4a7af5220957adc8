"""A JetStream cluster of N `nats-server` processes on loopback (3 by default), each node killable on its own.

Every node has its own store directory, `server_name`, client port, cluster (route) port and monitoring port, routes
to all the others, and is started from a generated config file (`nats-server -c`), so that JetStream's
`sync_interval` is written down instead of left implicit.

Why `sync_interval: 2m` (nats-server's own default, stated explicitly): a node hands each write to the operating
system (for a replicated stream: its raft log) before the write counts, and fsyncs only every `sync_interval`; with
3 replicas a publish is acknowledged once a quorum (2 of 3 nodes) holds it. A node killed with SIGKILL loses
nothing either way: what it wrote is in the kernel's page cache, and the other two hold the message too (the fault
test proves it). Only an OS crash of a majority of nodes before their next fsync can lose acknowledged messages;
here all nodes share one kernel, and PostgreSQL stays the source of truth. `always` (fsync every write before the
ack) is the strongest setting and the slowest: pass `sync_interval="always"` to run the cluster that way.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localservers.nats import NatsServer
from localservers.ports import LOOPBACK, free_port
from localservers.process import ServerStartError, find_binary, log_tail
from localservers.server import stop_all

#: nats-server's default fsync interval, written into every node's config (see the module docstring for why).
DEFAULT_SYNC_INTERVAL = "2m"
DEFAULT_CLUSTER_NAME = "cqrs-local"


@dataclass(frozen=True)
class NodePorts:
    """The three ports of one node: clients, routes to the other nodes, HTTP monitoring (`/healthz`)."""

    client: int
    cluster: int
    monitor: int

    @classmethod
    def free(cls, host: str = LOOPBACK) -> NodePorts:
        """Three ports nothing listens on right now."""
        return cls(free_port(host), free_port(host), free_port(host))


class NatsClusterNode(NatsServer):
    """One node of a `NatsCluster`: `nats-server -c <generated config>` with JetStream and routes to its peers.

    `start()` returns once the node's `/healthz` says OK, i.e. JetStream has a meta leader and this node is current
    with it. A node of a cluster without a quorum yet cannot get there, so the cluster starts all its nodes first
    (`start(wait_healthy=False)`) and then waits for each. A restarted node's stream replicas may still be catching
    up when `/healthz` is already OK (seen with 2.15): who needs them current checks the stream's
    `cluster.replicas` (`current`, `lag`).
    """

    def __init__(
        self,
        data_dir: Path,
        ports: NodePorts,
        peers: Sequence[int],
        *,
        server_name: str,
        cluster_name: str = DEFAULT_CLUSTER_NAME,
        sync_interval: str = DEFAULT_SYNC_INTERVAL,
        host: str = LOOPBACK,
    ) -> None:
        self.name = server_name  # before the base class: it names the log file
        super().__init__(data_dir, ports.client, host)
        self.ports = ports
        self.peers = list(peers)
        self.cluster_name = cluster_name
        self.sync_interval = sync_interval
        self._wait_healthy = True

    @property
    def config_path(self) -> Path:
        """The generated config file, next to the log."""
        return self.data_dir.parent / f"{self.name}.conf"

    @property
    def monitor_url(self) -> str:
        """Base URL of the HTTP monitoring endpoints (`/healthz`, `/varz`, `/jsz`)."""
        return f"http://{self.host}:{self.ports.monitor}"

    def config_text(self) -> str:
        """The node's nats-server config (JSON-quoted strings are valid in nats-server's config syntax)."""
        q = json.dumps
        routes = ", ".join(q(f"nats-route://{self.host}:{port}") for port in self.peers)
        return (
            f"server_name: {q(self.name)}\n"
            f"listen: {q(self.address)}\n"
            f"http: {q(f'{self.host}:{self.ports.monitor}')}\n"
            "jetstream {\n"
            f"  store_dir: {q(str(self.data_dir))}\n"
            f"  sync_interval: {q(self.sync_interval)}\n"
            "}\n"
            "cluster {\n"
            f"  name: {q(self.cluster_name)}\n"
            f"  listen: {q(f'{self.host}:{self.ports.cluster}')}\n"
            f"  routes: [{routes}]\n"
            "}\n"
        )

    def prepare(self) -> None:
        """Create the store directory and (re)write the config file."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(self.config_text())

    def command(self) -> list[str]:
        """`nats-server -c <config>`."""
        return [find_binary("nats-server"), "-c", str(self.config_path)]

    def start(self, timeout: float = 60.0, *, wait_healthy: bool = True) -> None:
        """Start the node; with `wait_healthy` (default) return only once its `/healthz` is OK."""
        self._wait_healthy = wait_healthy
        try:
            super().start(timeout)
        finally:
            self._wait_healthy = True

    def wait_ready(self, deadline: float) -> None:
        """Once the client port is open: wait for `/healthz` unless the cluster start asked not to."""
        if self._wait_healthy:
            self.wait_healthy(deadline)

    def health(self) -> tuple[bool, str]:
        """(healthy, detail) from `/healthz`: JetStream enabled and current with the meta leader."""
        try:
            with urllib.request.urlopen(f"{self.monitor_url}/healthz", timeout=2) as reply:
                return reply.status == 200, reply.read().decode(errors="replace")
        except urllib.error.HTTPError as exc:  # 503 with the reason in the body
            return False, exc.read().decode(errors="replace")
        except OSError as exc:
            return False, repr(exc)

    def wait_healthy(self, deadline: float) -> None:
        """Poll `/healthz` until OK; `ServerStartError` at `deadline` (monotonic) or if the process exits."""
        detail = "never asked"
        while True:
            self._check_alive(self.name)
            healthy, detail = self.health()
            if healthy:
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"timed out waiting for {self.name} on {self.address} to report healthy at "
                    f"{self.monitor_url}/healthz (last: {detail}); last lines of {self.log_path}:\n"
                    f"{log_tail(self.log_path)}"
                )
            time.sleep(0.1)

    def monitoring(self, endpoint: str) -> dict[str, Any]:
        """A monitoring endpoint's JSON, e.g. `varz` (configuration) or `jsz?streams=true` (this node's streams)."""
        with urllib.request.urlopen(f"{self.monitor_url}/{endpoint}", timeout=5) as reply:
            answer: dict[str, Any] = json.load(reply)
            return answer


class NatsCluster:
    """N JetStream-enabled nats-server nodes on loopback that route to one another.

    Node `i` keeps its store in `base_dir/nats<i>/data` (log and config next to it); `kill(i)` and `start_node(i)`
    crash and bring back one node on the same ports and store. `url` is the comma-separated list
    `CQRS_NATS_URL` takes.
    """

    def __init__(
        self,
        base_dir: Path,
        size: int = 3,
        *,
        ports: Sequence[NodePorts] | None = None,
        cluster_name: str = DEFAULT_CLUSTER_NAME,
        sync_interval: str = DEFAULT_SYNC_INTERVAL,
        host: str = LOOPBACK,
    ) -> None:
        if ports is None:
            ports = [NodePorts.free(host) for _ in range(size)]
        if len(ports) < 2:
            raise ValueError("a cluster needs at least 2 nodes (3 for a quorum that survives one loss)")
        self.base_dir = Path(base_dir)
        self.nodes = [
            NatsClusterNode(
                self.base_dir / f"nats{i}" / "data",
                node_ports,
                [other.cluster for j, other in enumerate(ports) if j != i],
                server_name=f"nats{i}",
                cluster_name=cluster_name,
                sync_interval=sync_interval,
                host=host,
            )
            for i, node_ports in enumerate(ports)
        ]

    @property
    def urls(self) -> list[str]:
        """Every node's client URL."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs, comma-separated (the form of `CQRS_NATS_URL`)."""
        return ",".join(self.urls)

    def node(self, server_name: str) -> NatsClusterNode:
        """The node with that `server_name` (as JetStream reports a stream's leader)."""
        for node in self.nodes:
            if node.name == server_name:
                return node
        raise KeyError(f"no node named {server_name!r} in {[n.name for n in self.nodes]}")

    def start(self, timeout: float = 60.0) -> None:
        """Start every node, then wait until each is healthy (a meta leader needs a quorum, so not one by one)."""
        deadline = time.monotonic() + timeout
        try:
            for node in self.nodes:
                if not node.running:
                    node.start(max(1.0, deadline - time.monotonic()), wait_healthy=False)
            for node in self.nodes:
                node.wait_healthy(deadline)
        except BaseException:
            self.stop(timeout=10.0)
            raise

    def start_node(self, index: int, timeout: float = 60.0) -> None:
        """Bring one node back on its ports and store; returns once it has caught up (`/healthz` OK)."""
        self.nodes[index].start(timeout)

    def kill(self, index: int) -> None:
        """SIGKILL one node, as a crash would."""
        self.nodes[index].kill()

    def stop(self, timeout: float = 20.0) -> None:
        """Stop every node cleanly (continuing past failures); raise the first error met."""
        errors = stop_all(self.nodes, timeout)
        if errors:
            raise errors[0]

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<NatsCluster {self.nodes!r}>"
