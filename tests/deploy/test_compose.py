"""deploy/compose.yaml, checked statically (`docker compose config` needs Docker, which is not here).

Parsed as YAML (merge keys resolved as Compose does), then: the services and their commands, the variables each
of our services gets (all of them read by the code that runs), pinned images, health checks, a dependency graph
without cycles whose conditions exist, and ports published on loopback only.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from tests.deploy.support import DEPLOY, env_read_by, load_yaml_documents

COMPOSE = DEPLOY / "compose.yaml"
OUR_IMAGE = "cqrs-orders:local"
ENTRY = {
    "migrate": "cqrsctl.main",
    "command-service": "command_service",
    "query-service": "query_service",
    "projector": "projector",
}
SERVERS = {"postgres", "nats", "mongo"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    (doc,) = load_yaml_documents(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    return doc


def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = compose["services"]
    return result


def test_services_are_the_servers_the_migration_and_the_three_processes(compose: dict[str, Any]) -> None:
    assert set(services(compose)) == SERVERS | set(ENTRY)
    for name, module in ENTRY.items():
        service = services(compose)[name]
        assert service["image"] == OUR_IMAGE
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert service["command"][0] == module, f"{name} must run `python -m {module}`"
    assert services(compose)["migrate"]["command"] == ["cqrsctl.main", "migrate"]
    assert services(compose)["migrate"]["restart"] == "no"


def test_every_variable_is_one_the_code_reads(compose: dict[str, Any]) -> None:
    readers = env_read_by()
    for name, module in ENTRY.items():
        environment = services(compose)[name].get("environment", {})
        assert isinstance(environment, dict), f"{name}: use the mapping form"
        unknown = set(environment) - readers[module]
        assert not unknown, f"{name}: {sorted(unknown)} are not read by `python -m {module}`"


def test_services_point_at_the_compose_servers(compose: dict[str, Any]) -> None:
    env = {name: services(compose)[name].get("environment", {}) for name in ENTRY}
    postgres = services(compose)["postgres"]["environment"]
    dsn = f"postgresql://{postgres['POSTGRES_USER']}:{postgres['POSTGRES_PASSWORD']}@postgres:5432/{postgres['POSTGRES_DB']}"
    assert env["migrate"]["CQRS_POSTGRES_DSN"] == dsn
    assert env["command-service"]["CQRS_POSTGRES_DSN"] == dsn
    for name in ("command-service", "projector"):
        assert env[name]["CQRS_NATS_URL"] == "nats://nats:4222"
    mongo_command = services(compose)["mongo"]["command"]
    replica_set = mongo_command[mongo_command.index("--replSet") + 1]
    for name in ("query-service", "projector"):
        assert env[name]["CQRS_MONGO_URL"] == f"mongodb://mongo:27017/?replicaSet={replica_set}"
    assert env["command-service"]["CQRS_COMMAND_LISTEN"] == "0.0.0.0:50051"
    assert env["query-service"]["CQRS_QUERY_LISTEN"] == "0.0.0.0:50052"
    assert env["projector"]["CQRS_PROJECTOR_METRICS_PORT"] == "9102"
    assert env["query-service"]["CQRS_QUERY_METRICS_PORT"] == "9103"
    for name in ("command-service", "query-service", "projector"):  # published ports need a non-loopback bind
        assert env[name]["CQRS_METRICS_HOST"] == "0.0.0.0"


def test_servers_are_real_pinned_images_with_volumes(compose: dict[str, Any]) -> None:
    expected = {"postgres": r"postgres:18\.\d+-\w+", "nats": r"nats:2\.\d+\.\d+-alpine", "mongo": r"mongo:8\.0\.\d+"}
    for name, pattern in expected.items():
        service = services(compose)[name]
        assert re.fullmatch(pattern, service["image"]), f"{name}: pin an exact version, got {service['image']}"
        assert service["volumes"] and all(v.split(":")[0] in compose["volumes"] for v in service["volumes"])
    nats = services(compose)["nats"]
    assert "--jetstream" in nats["command"] and "--store_dir=/data" in nats["command"]
    assert "nats-data:/data" in nats["volumes"]
    mongo = services(compose)["mongo"]
    assert "--replSet" in mongo["command"]
    assert "rs.initiate" in " ".join(mongo["healthcheck"]["test"]), "the health check initiates the replica set"


def test_our_containers_are_locked_down(compose: dict[str, Any]) -> None:
    for name in ENTRY:
        service = services(compose)[name]
        assert service["read_only"] is True and "/tmp" in service["tmpfs"], name
        assert service["cap_drop"] == ["ALL"] and "no-new-privileges:true" in service["security_opt"], name
        assert "user" not in service, f"{name}: runs as the image's non-root user"


def test_health_checks_are_valid_commands(compose: dict[str, Any]) -> None:
    for name, service in services(compose).items():
        if name == "migrate":
            continue
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", f"{name}: exec form"
        if test[1] == "python":
            assert test[2] == "-c"
            compile(test[3], f"<{name} healthcheck>", "exec")  # the snippet is valid Python


def test_dependency_graph_is_acyclic_and_waits_for_readiness(compose: dict[str, Any]) -> None:
    graph: dict[str, dict[str, str]] = {}
    for name, service in services(compose).items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: use the long form with conditions"
        graph[name] = {dep: spec["condition"] for dep, spec in depends.items()}
        for dep, condition in graph[name].items():
            assert dep in services(compose), f"{name} depends on unknown {dep}"
            assert condition in CONDITIONS, condition
            if condition == "service_healthy":
                assert "healthcheck" in services(compose)[dep], f"{name} waits for {dep} to be healthy; it has no check"

    visiting: set[str] = set()
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> None:
        assert node not in visiting, f"dependency cycle: {' -> '.join([*path, node])}"
        if node in done:
            return
        visiting.add(node)
        for dep in graph[node]:
            visit(dep, [*path, node])
        visiting.discard(node)
        done.add(node)

    for node in graph:
        visit(node, [])
    assert graph["migrate"] == {"postgres": "service_healthy"}
    assert graph["command-service"]["migrate"] == "service_completed_successfully"
    assert graph["command-service"]["nats"] == "service_healthy"
    assert graph["query-service"]["mongo"] == "service_healthy"
    assert {"nats", "mongo"} <= set(graph["projector"])


def test_ports_are_published_on_loopback_only(compose: dict[str, Any]) -> None:
    published: dict[int, str] = {}
    for name, service in services(compose).items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short form HOST_IP:HOST:CONTAINER"
            match = re.fullmatch(r"127\.0\.0\.1:(\d+):(\d+)", port)
            assert match, f"{name}: {port} must be published on 127.0.0.1 only"
            host_port = int(match.group(1))
            assert host_port not in published, f"{name} and {published.get(host_port)} both publish {host_port}"
            published[host_port] = name
    assert {50051, 50052, 9101, 9102, 9103} <= set(published)
