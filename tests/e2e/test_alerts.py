"""A real Prometheus evaluates deploy/monitoring/alerts.rules.yml against the running services.

The three services run as the processes `make dev` and the image run (`python -m <service>`, started by
`localservers.ServiceProcess`) with their /metrics ports open; Debian's `prometheus` (installed by `make tools`) is
started here on a free port with its data in a temporary folder, scraping them every second under the job names
the rules select on. Nothing fires while the system runs; CqrsProjectorDown fires once the projector is stopped.
The rules are used as they are, except that every `for:` is shortened to a few seconds (a copy of the file).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from command_service.migrate import migrate
from localservers import LOOPBACK, ServerProcess, ServerStartError, ServiceProcess, free_port, stop_services
from tests.support import create_database, eventually

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "monitoring" / "alerts.rules.yml"
FOR = "2s"  # every alert's `for:` in the copy Prometheus evaluates
JOBS = {"command_service": "command-service", "projector": "projector", "query_service": "query-service"}
METRICS_PORT = {
    "command_service": "CQRS_COMMAND_METRICS_PORT",
    "projector": "CQRS_PROJECTOR_METRICS_PORT",
    "query_service": "CQRS_QUERY_METRICS_PORT",
}


class PrometheusServer(ServerProcess):
    """Debian's `prometheus` binary: loopback only, its TSDB in `data_dir`, ready when /-/ready answers 200."""

    name = "prometheus"

    def __init__(self, data_dir: Path, port: int, config: Path) -> None:
        super().__init__(data_dir, port)
        self.config = config

    def command(self) -> list[str]:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus not found on PATH: run `make tools` (Debian's `prometheus` package)", pytrace=False)
        return [
            binary,
            f"--config.file={self.config}",
            f"--storage.tsdb.path={self.data_dir}",
            f"--web.listen-address={self.address}",
            "--log.level=warn",
        ]

    def wait_ready(self, deadline: float) -> None:
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            self._check_alive(self.name)
            if time.monotonic() > deadline:
                raise ServerStartError(f"prometheus at {self.address} not ready; log:\n{self.tail()}")
            time.sleep(0.1)

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def api(self, path: str) -> Any:
        """GET /api/v1/<path>; its `data`."""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}", timeout=5) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]


def rules_with_short_for(directory: Path) -> Path:
    """A copy of the rules in which every `for:` is FOR, so the test waits seconds, not minutes."""
    text, count = re.subn(r"(?m)^(\s+for:\s*)\S+$", rf"\g<1>{FOR}", RULES.read_text(encoding="utf-8"))
    assert count >= 15, "the rules have fewer `for:` lines than alerts"
    path = directory / RULES.name
    path.write_text(text, encoding="utf-8")
    return path


async def alerts(prometheus: PrometheusServer) -> list[dict[str, Any]]:
    data = await asyncio.to_thread(prometheus.api, "alerts")
    found: list[dict[str, Any]] = data["alerts"]
    return found


def named(found: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [a for a in found if a["labels"]["alertname"] == name]


@pytest.fixture
async def services(
    postgres_dsn: str, nats_url: str, mongo_url: str, unique_name: str, tmp_path: Path
) -> AsyncIterator[tuple[dict[str, ServiceProcess], dict[str, int]]]:
    """The three services as processes on free ports, with their own database, stream and consumer."""
    dsn = await create_database(postgres_dsn, unique_name)
    await migrate(dsn)
    command_addr, query_addr = f"{LOOPBACK}:{free_port()}", f"{LOOPBACK}:{free_port()}"
    metrics_ports = {name: free_port() for name in JOBS}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CQRS_")}
    env |= {
        "CQRS_POSTGRES_DSN": dsn,
        "CQRS_NATS_URL": nats_url,
        "CQRS_MONGO_URL": mongo_url,
        "CQRS_MONGO_DATABASE": unique_name,
        "CQRS_STREAM_NAME": unique_name.upper(),
        "CQRS_SUBJECT_PREFIX": f"{unique_name}.events",
        "CQRS_PROJECTOR_DURABLE": f"{unique_name}-projector",
        "CQRS_COMMAND_LISTEN": command_addr,
        "CQRS_QUERY_LISTEN": query_addr,
        "CQRS_GRACE_SECONDS": "2",
        "CQRS_LOG_LEVEL": "WARNING",
        "PYTHONUNBUFFERED": "1",
    }
    env |= {METRICS_PORT[name]: str(port) for name, port in metrics_ports.items()}
    listen = {"command_service": command_addr, "projector": None, "query_service": query_addr}
    running = {
        name: ServiceProcess(name, listen=address, log_path=tmp_path / f"{name}.log", cwd=ROOT)
        for name, address in listen.items()
    }
    try:
        for service in running.values():
            service.start(env)
        for service in running.values():
            await asyncio.to_thread(service.wait_ready)
        yield running, metrics_ports
    finally:
        await asyncio.to_thread(stop_services, list(running.values()))


@pytest.fixture
async def prometheus(
    services: tuple[dict[str, ServiceProcess], dict[str, int]], tmp_path: Path
) -> AsyncIterator[PrometheusServer]:
    """Prometheus scraping the services every second under the rules' job names, evaluating the rules every second."""
    _, metrics_ports = services
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_with_short_for(tmp_path))],
        "scrape_configs": [
            {"job_name": JOBS[name], "static_configs": [{"targets": [f"{LOOPBACK}:{port}"]}]}
            for name, port in metrics_ports.items()
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    server = PrometheusServer(tmp_path / "prometheus", free_port(), config_path)
    await asyncio.to_thread(server.start, 60.0)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def test_projector_down_fires_when_the_projector_stops_and_not_while_it_runs(
    services: tuple[dict[str, ServiceProcess], dict[str, int]], prometheus: PrometheusServer
) -> None:
    running, _ = services

    async def all_targets_up() -> list[str] | None:
        data = await asyncio.to_thread(prometheus.api, "targets")
        up = sorted(t["labels"]["job"] for t in data["activeTargets"] if t["health"] == "up")
        return up if up == sorted(JOBS.values()) else None

    await eventually(all_targets_up, what="Prometheus to scrape all three services", timeout=60, interval=0.5)

    async def nothing_firing() -> bool:
        return not [a for a in await alerts(prometheus) if a["state"] == "firing"]

    # Right after the first scrapes a rate() has one sample only; give the system a moment to look healthy.
    await eventually(nothing_firing, what="no alert firing on the healthy system", timeout=30, interval=0.5)
    # Every rule evaluates without error against the real series (e.g. no many-to-many matches).
    groups = (await asyncio.to_thread(prometheus.api, "rules"))["groups"]
    evaluated = {r["name"]: (r["health"], r.get("lastError")) for g in groups for r in g["rules"]}
    in_file = set(re.findall(r"(?m)^\s+- (?:alert|record): (\S+)$", RULES.read_text(encoding="utf-8")))
    assert set(evaluated) == in_file, sorted(set(evaluated) ^ in_file)
    assert {name: state for name, state in evaluated.items() if state[0] != "ok"} == {}
    for _ in range(10):  # ~5 s: at least four evaluations with `for: 2s`
        found = await alerts(prometheus)
        assert not named(found, "CqrsProjectorDown"), f"the projector runs, yet: {found}"
        assert not [a for a in found if a["state"] == "firing"], f"alerts fire on a healthy system: {found}"
        await asyncio.sleep(0.5)

    await asyncio.to_thread(running["projector"].stop)
    assert running["projector"].returncode == 0, running["projector"].tail()

    async def projector_down_firing() -> list[dict[str, Any]] | None:
        return [a for a in named(await alerts(prometheus), "CqrsProjectorDown") if a["state"] == "firing"] or None

    (alert,) = await eventually(projector_down_firing, what="CqrsProjectorDown to fire", timeout=30, interval=0.5)
    assert alert["labels"] == {"alertname": "CqrsProjectorDown", "job": "projector", "severity": "critical"}
    assert "kubectl get pods -l app.kubernetes.io/name=projector" in alert["annotations"]["description"]
