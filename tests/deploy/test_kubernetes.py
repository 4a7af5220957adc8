"""The Kubernetes manifests (deploy/k8s): every overlay builds with the pinned kustomize, every rendered
manifest passes `kubernetes-validate --strict`, and the properties the issue asks for hold in the rendered output:
secret references only, probes, security context, graceful termination, autoscaling, disruption budgets,
topology spread and a network policy that lets only the necessary flows through.

The security scan (checkov) is in test_security_scan.py.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.conftest import Rendered
from tests.deploy.support import K8S, OVERLAYS, Doc, env_read_by, kustomize, load_yaml_documents, run, tool

# Oldest Kubernetes the manifests are meant for (lifecycle.preStop.sleep is on by default from 1.30) and the newest
# schema kubernetes-validate knows.
K8S_VERSIONS = ("1.30.0", "1.37.0")

APP_DEPLOYMENTS = ("command-service", "query-service", "projector")
GRPC_DEPLOYMENTS = {"command-service": 50051, "query-service": 50052}
ENTRY_MODULE = {"command-service": "command_service", "query-service": "query_service", "projector": "projector"}
CONNECTION_SECRET = "cqrs-connections"
CONNECTION_KEYS = {"postgres-dsn", "nats-url", "mongo-url"}
# PostgreSQL's default max_connections is 100 (3 reserved for superusers); leave room for operators and tools.
POSTGRES_CONNECTION_BUDGET = 90


def pod_spec(doc: Doc) -> dict[str, Any]:
    spec: dict[str, Any] = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: Doc) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def app_workloads(r: Rendered) -> list[Doc]:
    """Workloads that run our image (the three Deployments and the migration Job)."""
    return [d for d in r.workloads() if any("cqrs-orders" in c["image"] for c in containers(d))]


def strip_hash(name: str) -> str:
    """`cqrs-connections-g4k7k8fb9t` -> `cqrs-connections` (kustomize generators append a content hash)."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def config_map(r: Rendered) -> dict[str, str]:
    maps = [d for d in r.of_kind("ConfigMap") if strip_hash(d["metadata"]["name"]) == "cqrs-config"]
    assert len(maps) == 1, f"{r.name}: expected one cqrs-config ConfigMap"
    data: dict[str, str] = maps[0]["data"]
    return data


# --- build and schema validation ---------------------------------------------------------------------------------


def test_base_builds_and_holds_no_secret_values() -> None:
    docs = load_yaml_documents(kustomize(K8S / "base"))
    assert not [d for d in docs if d["kind"] == "Secret"], "the base must only reference Secrets, never define one"
    assert all("namespace" not in d["metadata"] for d in docs), "the base names no namespace; overlays do"
    images = {c["image"] for d in docs if d["kind"] in ("Deployment", "Job") for c in containers(d)}
    assert images == {"cqrs-orders"}, f"the base refers to the image by its placeholder name only, got {images}"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_rendered_manifest_validates_strictly(
    rendered: dict[str, Rendered], version: str, tmp_path: Path
) -> None:
    files = []
    for name, r in rendered.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(r.text, encoding="utf-8")
        files.append(path)
    done = run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", version, *files])
    report = done.stdout + done.stderr
    assert done.returncode == 0, f"kubernetes-validate --strict -k {version} failed:\n{report}"
    assert "ERROR" not in report and "WARN" not in report, report
    passed = report.count(" passed for resource ")
    total = sum(len(r.docs) for r in rendered.values())
    assert passed == total, f"only {passed} of {total} resources were validated:\n{report}"


def test_strict_validation_rejects_an_unknown_field(rendered: dict[str, Rendered], tmp_path: Path) -> None:
    """The validator really checks nested fields (guards against a silently toothless tool)."""
    text = rendered["prod"].text.replace("        lifecycle:\n", "        lifecycle:\n          preStopp: {}\n", 1)
    assert "preStopp" in text
    path = tmp_path / "broken.yaml"
    path.write_text(text, encoding="utf-8")
    done = run([tool("kubernetes-validate"), "--strict", "--kubernetes-version", K8S_VERSIONS[0], "--quiet", path])
    assert done.returncode != 0 and "preStopp" in done.stdout + done.stderr, done.stdout + done.stderr


# --- what is deployed --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_deploys_three_services_and_the_migration(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    for name in APP_DEPLOYMENTS:
        deployment = r.get("Deployment", name)
        (container,) = pod_spec(deployment)["containers"]
        assert container["args"] == [ENTRY_MODULE[name]]
    job = r.get("Job", "cqrs-migrate")
    (container,) = pod_spec(job)["containers"]
    assert container["args"] == ["cqrsctl.main", "migrate"]
    assert pod_spec(job)["restartPolicy"] in ("OnFailure", "Never")
    # The read-model rebuild Job backfills new or changed projections on deployment (guarantee 9).
    rebuild = r.get("Job", "cqrs-rebuild")
    (container,) = pod_spec(rebuild)["containers"]
    assert container["args"][:4] == ["cqrsctl.main", "rebuild", "--if-needed", "--cutover"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"]["key"] for e in container["env"] if "valueFrom" in e}
    assert secrets == {"CQRS_POSTGRES_DSN": "postgres-dsn", "CQRS_MONGO_URL": "mongo-url"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_everything_lives_in_the_overlay_namespace_with_restricted_pod_security(
    rendered: dict[str, Rendered], overlay: str
) -> None:
    r = rendered[overlay]
    (namespace,) = r.of_kind("Namespace")
    name = namespace["metadata"]["name"]
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in r.docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == name, f"{doc['kind']} {doc['metadata']['name']}"


def test_overlay_images_are_pinned_references(rendered: dict[str, Rendered]) -> None:
    expected = {"dev": "cqrs-orders:dev", "prod": "registry.example.com/cqrs-orders:0.1.0"}
    for overlay, r in rendered.items():
        for doc in r.workloads():
            for c in containers(doc):
                image = c["image"]
                assert re.search(r":[\w.-]+(@sha256:[0-9a-f]{64})?$", image), f"{overlay}: {image} has no tag"
                assert not image.endswith(":latest"), f"{overlay}: {image}"
        app_images = {c["image"] for d in app_workloads(r) for c in containers(d)}
        assert app_images == {expected[overlay]}, f"{overlay}: {app_images}"


# --- secrets and configuration -----------------------------------------------------------------------------------


def test_prod_defines_no_secret_only_references_it(rendered: dict[str, Rendered]) -> None:
    prod = rendered["prod"]
    assert not prod.of_kind("Secret"), "prod takes the connection URLs from a Secret created outside the repo"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_connection_urls_come_only_from_the_connection_secret(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    for doc in app_workloads(r):
        for c in containers(doc):
            for env in c.get("env", []):
                if env["name"] in ("CQRS_POSTGRES_DSN", "CQRS_NATS_URL", "CQRS_MONGO_URL"):
                    assert "value" not in env, f"{env['name']} must come from a Secret, not a literal"
                    ref = env["valueFrom"]["secretKeyRef"]
                    assert strip_hash(ref["name"]) == CONNECTION_SECRET, ref
                    assert ref["key"] in CONNECTION_KEYS, ref
            for source in c.get("envFrom", []):
                assert "secretRef" not in source, "secrets are referenced key by key"
    assert not re.search(r"(postgres(ql)?|nats|mongodb(\+srv)?)://[^\s\"']*@", config_map_text(r)), (
        "credentials in the ConfigMap"
    )


def config_map_text(r: Rendered) -> str:
    return "\n".join(f"{k}={v}" for k, v in config_map(r).items())


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_variable_set_is_one_the_code_reads(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    readers = env_read_by()
    mounted_by: set[str] = set()
    for doc in app_workloads(r):
        for c in containers(doc):
            module = c["args"][0]
            known = readers[module]
            for env in c.get("env", []):
                assert env["name"] in known, f"{doc['metadata']['name']}: {env['name']} is not read by {module}"
            if c.get("envFrom"):
                mounted_by |= known
    unread = set(config_map(r)) - mounted_by
    assert not unread, f"ConfigMap keys no service reads: {sorted(unread)}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_postgres_connections_fit_the_server(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    pool_max = int(config_map(r)["CQRS_POSTGRES_POOL_MAX"])
    max_replicas = r.get("HorizontalPodAutoscaler", "command-service")["spec"]["maxReplicas"]
    # Each replica: its pool plus the relay's dedicated connection (advisory lock, LISTEN); + the migration Job
    # (1) and the rebuild Job (its pool of 2).
    total = max_replicas * (pool_max + 1) + 1 + 2
    assert total <= POSTGRES_CONNECTION_BUDGET, (
        f"{overlay}: {max_replicas} command-service replicas x (pool {pool_max} + relay 1) + Jobs 3 = {total}"
    )


def test_dev_secret_points_at_the_in_cluster_servers(rendered: dict[str, Rendered]) -> None:
    dev = rendered["dev"]
    (secret,) = [s for s in dev.of_kind("Secret") if strip_hash(s["metadata"]["name"]) == CONNECTION_SECRET]
    values = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert set(values) == CONNECTION_KEYS
    services = {s["metadata"]["name"]: s for s in dev.of_kind("Service")}
    for key, service, port in (
        ("postgres-dsn", "postgres", 5432),
        ("nats-url", "nats", 4222),
        ("mongo-url", "mongo", 27017),
    ):
        url = urlsplit(values[key])
        host = url.hostname or ""
        assert host.split(".")[-1] == service and service in services, f"{key}: {values[key]}"
        assert url.port == port and port in [p["port"] for p in services[service]["spec"]["ports"]]
    (mongod,) = pod_spec(dev.get("StatefulSet", "mongo"))["containers"]
    assert "--replSet=rs0" in mongod["args"] and "replicaSet=rs0" in values["mongo-url"]
    init = pod_spec(dev.get("Job", "mongo-rs-init"))["containers"][0]
    assert "rs.initiate" in " ".join(init["command"]) and "mongo-0.mongo:27017" in " ".join(init["command"])


def test_dev_runs_single_replica_servers_with_persistent_volumes(rendered: dict[str, Rendered]) -> None:
    dev = rendered["dev"]
    for name in ("postgres", "nats", "mongo"):
        sts = dev.get("StatefulSet", name)
        assert sts["spec"]["replicas"] == 1
        claims = [t["metadata"]["name"] for t in sts["spec"]["volumeClaimTemplates"]]
        assert claims == ["data"], name
    (nats,) = pod_spec(dev.get("StatefulSet", "nats"))["containers"]
    assert "--jetstream" in nats["args"] and "--store_dir=/data" in nats["args"]
    assert {"name": "data", "mountPath": "/data"} in nats["volumeMounts"]


# --- probes, lifecycle, resources, security ----------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_services_probe_the_standard_health_service(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    for name, port in GRPC_DEPLOYMENTS.items():
        (c,) = pod_spec(r.get("Deployment", name))["containers"]
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["grpc"] == port
        # Readiness: grpc.health.v1 overall status (SERVING only while the database answers).
        assert c["readinessProbe"]["grpc"] == {"port": port, "service": ""}
        # Liveness must not depend on the databases: the `liveness` health name is SERVING whatever they do.
        assert c["livenessProbe"]["grpc"] == {"port": port, "service": "liveness"}
        assert "startupProbe" in c


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_projector_liveness_is_its_metrics_endpoint(rendered: dict[str, Rendered], overlay: str) -> None:
    (c,) = pod_spec(rendered[overlay].get("Deployment", "projector"))["containers"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"metrics": 9102}
    assert c["livenessProbe"]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert {"name": "CQRS_PROJECTOR_METRICS_PORT", "value": "9102"} in c["env"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_grpc_services_drain_before_they_stop(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    grace = float(config_map(r)["CQRS_GRACE_SECONDS"])
    for name in GRPC_DEPLOYMENTS:
        spec = pod_spec(r.get("Deployment", name))
        (c,) = spec["containers"]
        pause = c["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pause >= 3, "long enough for endpoint removal to reach kube-proxy and clients"
        assert spec["terminationGracePeriodSeconds"] > pause + grace, (
            f"{name}: terminationGracePeriodSeconds must exceed preStop {pause}s + CQRS_GRACE_SECONDS {grace}s"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_pod_is_locked_down(rendered: dict[str, Rendered], overlay: str) -> None:
    for doc in rendered[overlay].workloads():
        where = f"{overlay}: {doc['kind']} {doc['metadata']['name']}"
        spec = pod_spec(doc)
        assert spec["automountServiceAccountToken"] is False, where
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] >= 10000, where
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for c in containers(doc):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc["runAsNonRoot"] is True, where
            assert sc["capabilities"] == {"drop": ["ALL"]}, where
            assert sc.get("privileged", False) is False, where
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: resources.{kind}"
        for volume in spec.get("volumes", []):
            assert set(volume) <= {"name", "emptyDir", "configMap", "secret", "projected"}, f"{where}: {volume}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_app_containers_have_a_writable_tmp(rendered: dict[str, Rendered], overlay: str) -> None:
    for doc in app_workloads(rendered[overlay]):
        volumes = {v["name"]: v for v in pod_spec(doc).get("volumes", [])}
        for c in containers(doc):
            (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert "emptyDir" in volumes[mount["name"]]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_deployments_spread_over_zones_and_nodes(rendered: dict[str, Rendered], overlay: str) -> None:
    for name in APP_DEPLOYMENTS:
        spec = pod_spec(rendered[overlay].get("Deployment", name))
        keys = {t["topologyKey"] for t in spec["topologySpreadConstraints"]}
        assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name
        for t in spec["topologySpreadConstraints"]:
            assert t["labelSelector"]["matchLabels"] == {"app.kubernetes.io/name": name}


# --- scaling and availability ------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_deployment_has_an_autoscaler_and_a_disruption_budget(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    for name in APP_DEPLOYMENTS:
        deployment = r.get("Deployment", name)
        assert "replicas" not in deployment["spec"], f"{name}: the HPA owns the replica count"
        hpa = r.get("HorizontalPodAutoscaler", name)
        assert hpa["apiVersion"] == "autoscaling/v2"
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        pdb = r.get("PodDisruptionBudget", name)
        assert pdb["apiVersion"] == "policy/v1"
        assert pdb["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        assert "maxUnavailable" in pdb["spec"]


def test_prod_runs_more_replicas_than_dev(rendered: dict[str, Rendered]) -> None:
    for name in APP_DEPLOYMENTS:
        dev = rendered["dev"].get("HorizontalPodAutoscaler", name)["spec"]["minReplicas"]
        prod = rendered["prod"].get("HorizontalPodAutoscaler", name)["spec"]["minReplicas"]
        assert prod > dev, name
    for name in GRPC_DEPLOYMENTS:
        assert rendered["prod"].get("HorizontalPodAutoscaler", name)["spec"]["minReplicas"] >= 3, name


def test_prod_spreads_every_service_over_nodes_strictly(rendered: dict[str, Rendered]) -> None:
    """In prod a lost node takes at most one replica's share with it (for the projector: its partitions)."""
    for name in APP_DEPLOYMENTS:
        spec = pod_spec(rendered["prod"].get("Deployment", name))
        (by_node,) = [t for t in spec["topologySpreadConstraints"] if t["topologyKey"] == "kubernetes.io/hostname"]
        assert by_node["whenUnsatisfiable"] == "DoNotSchedule", name


# --- partitioned projection (README, "Scaling") ------------------------------------------------------------------

STREAM_SETTINGS = ("CQRS_STREAM_NAME", "CQRS_SUBJECT_PREFIX", "CQRS_STREAM_PARTITIONS", "CQRS_STREAM_REPLICAS")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_process_that_creates_the_stream_gets_the_same_stream_settings(
    rendered: dict[str, Rendered], overlay: str
) -> None:
    """The relay (command_service) and the projector both create the stream when it is missing, and whichever
    starts first fixes its partitions and replicas: both take them from the one ConfigMap, neither overrides them."""
    r = rendered[overlay]
    settings = config_map(r)
    assert set(STREAM_SETTINGS) <= set(settings), f"{overlay}: the ConfigMap must set {STREAM_SETTINGS}"
    assert int(settings["CQRS_STREAM_PARTITIONS"]) >= 2
    for name in ("command-service", "projector"):
        (c,) = pod_spec(r.get("Deployment", name))["containers"]
        maps = [strip_hash(s["configMapRef"]["name"]) for s in c.get("envFrom", []) if "configMapRef" in s]
        assert maps == ["cqrs-config"], f"{overlay}: {name} mounts {maps}"
        overridden = {e["name"] for e in c.get("env", [])} & set(STREAM_SETTINGS)
        assert not overridden, f"{overlay}: {name} overrides {sorted(overridden)} of the shared ConfigMap"
        assert set(STREAM_SETTINGS) <= env_read_by()[ENTRY_MODULE[name]], name


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_projector_replicas_fit_the_partitions(rendered: dict[str, Rendered], overlay: str) -> None:
    """At least two projectors (a lost one's partitions have somewhere to go), never more than partitions (one
    beyond would own none), drained one at a time, with a lease that moves a dead replica's partitions in seconds."""
    r = rendered[overlay]
    settings = config_map(r)
    partitions = int(settings["CQRS_STREAM_PARTITIONS"])
    hpa = r.get("HorizontalPodAutoscaler", "projector")["spec"]
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"] <= partitions, f"{overlay}: {hpa} for {partitions}"
    assert r.get("PodDisruptionBudget", "projector")["spec"]["maxUnavailable"] == 1
    lease = float(settings["CQRS_PROJECTOR_LEASE_SECONDS"])
    assert 5 <= lease <= 30, f"{overlay}: CQRS_PROJECTOR_LEASE_SECONDS={lease}"
    assert "CQRS_PROJECTOR_LEASE_SECONDS" in env_read_by()["projector"]


def test_prod_expects_replicated_servers_and_dev_a_single_one(rendered: dict[str, Rendered]) -> None:
    """prod: the stream on three JetStream servers, projector writes acknowledged by a MongoDB majority. dev: one
    nats-server, on which JetStream would refuse a stream of three replicas."""
    prod, dev = config_map(rendered["prod"]), config_map(rendered["dev"])
    assert prod["CQRS_STREAM_REPLICAS"] == "3"
    assert prod["CQRS_MONGO_WRITE_CONCERN"] == "majority"
    assert dev["CQRS_STREAM_REPLICAS"] == "1"
    assert rendered["dev"].get("StatefulSet", "nats")["spec"]["replicas"] == 1
    assert rendered["prod"].get("HorizontalPodAutoscaler", "projector")["spec"]["minReplicas"] >= 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_select_pods_and_name_their_ports(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    for service in r.of_kind("Service"):
        selector = service["spec"]["selector"]
        targets = [d for d in r.workloads() if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert targets, f"Service {service['metadata']['name']} selects no pods"
        port_names = {p.get("name") for d in targets for c in containers(d) for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, f"{service['metadata']['name']}: {port}"


# --- network policy ----------------------------------------------------------------------------------------------


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert "matchExpressions" not in selector, "this evaluator supports matchLabels only"
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


class Pod:
    def __init__(self, namespace: str, labels: dict[str, str], *, external: bool = False) -> None:
        self.namespace = namespace
        self.ns_labels = {"kubernetes.io/metadata.name": namespace}
        self.labels = labels
        self.external = external  # an address outside the cluster (managed database), no pod or namespace


def _peer_matches(peer: dict[str, Any], policy_ns: str, pod: Pod) -> bool:
    if "ipBlock" in peer:
        return pod.external
    if pod.external:
        return False
    ns_ok = (
        pod.namespace == policy_ns
        if "namespaceSelector" not in peer
        else _selects(peer["namespaceSelector"], pod.ns_labels)
    )
    pod_ok = "podSelector" not in peer or _selects(peer["podSelector"], pod.labels)
    return ns_ok and pod_ok


def _rule_allows(rule: dict[str, Any], peers_key: str, policy_ns: str, peer: Pod, port: int, protocol: str) -> bool:
    peers = rule.get(peers_key)
    if peers and not any(_peer_matches(p, policy_ns, peer) for p in peers):
        return False
    ports = rule.get("ports")
    return not ports or any(p.get("protocol", "TCP") == protocol and p["port"] == port for p in ports)


def _side_allows(policies: list[Doc], direction: str, pod: Pod, peer: Pod, port: int, protocol: str) -> bool:
    if pod.external:
        return True  # outside the cluster: no NetworkPolicy applies
    key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
    selecting = [
        p
        for p in policies
        if p["metadata"]["namespace"] == pod.namespace
        and direction in p["spec"]["policyTypes"]
        and _selects(p["spec"]["podSelector"], pod.labels)
    ]
    if not selecting:
        return True
    return any(
        _rule_allows(rule, peers_key, p["metadata"]["namespace"], peer, port, protocol)
        for p in selecting
        for rule in p["spec"].get(key, [])
    )


def allowed(r: Rendered, src: Pod, dst: Pod, port: int, protocol: str = "TCP") -> bool:
    policies = r.of_kind("NetworkPolicy")
    return _side_allows(policies, "Egress", src, dst, port, protocol) and _side_allows(
        policies, "Ingress", dst, src, port, protocol
    )


def _pods(r: Rendered) -> dict[str, Pod]:
    return {
        d["metadata"]["name"]: Pod(d["metadata"]["namespace"], d["spec"]["template"]["metadata"]["labels"])
        for d in r.workloads()
    }


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_starts_from_default_deny(rendered: dict[str, Rendered], overlay: str) -> None:
    deny = rendered[overlay].get("NetworkPolicy", "default-deny-all")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    for policy in rendered[overlay].of_kind("NetworkPolicy"):
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{policy['metadata']['name']}: an ingress rule without `from` admits everyone"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policy_lets_only_the_necessary_flows_through(rendered: dict[str, Rendered], overlay: str) -> None:
    r = rendered[overlay]
    pods = _pods(r)
    command, query, projector, migrate, rebuild = (
        pods[n] for n in ("command-service", "query-service", "projector", "cqrs-migrate", "cqrs-rebuild")
    )
    client = Pod("shop", {"cqrs-orders/client": "true"})
    stranger = Pod("shop", {"app": "something-else"})
    monitoring = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    dns = Pod("kube-system", {"k8s-app": "kube-dns"})
    if overlay == "dev":
        postgres, nats, mongo = pods["postgres"], pods["nats"], pods["mongo"]
    else:  # managed services outside the cluster
        postgres = nats = mongo = Pod("", {}, external=True)

    expect = [
        # who may call the gRPC APIs
        (client, command, 50051, True),
        (client, query, 50052, True),
        (stranger, command, 50051, False),
        (stranger, query, 50052, False),
        (query, command, 50051, False),
        (client, command, 9101, False),
        (client, projector, 9102, False),
        (client, query, 9103, False),
        # metrics scraping from the monitoring namespace only, metrics ports only
        (monitoring, command, 9101, True),
        (monitoring, projector, 9102, True),
        (monitoring, query, 9103, True),
        (monitoring, query, 50052, False),
        (monitoring, command, 50051, False),
        (stranger, projector, 9102, False),
        # each process reaches only its own dependencies
        (command, postgres, 5432, True),
        (command, nats, 4222, True),
        (command, mongo, 27017, False),
        (projector, nats, 4222, True),
        (projector, mongo, 27017, True),
        (projector, postgres, 5432, False),
        (query, mongo, 27017, True),
        (query, postgres, 5432, False),
        (query, nats, 4222, False),
        (migrate, postgres, 5432, True),
        (migrate, nats, 4222, False),
        (migrate, mongo, 27017, False),
        (rebuild, postgres, 5432, True),
        (rebuild, mongo, 27017, True),
        (rebuild, nats, 4222, False),
        (client, rebuild, 9104, False),
        (monitoring, rebuild, 9104, True),
    ]
    wrong = [
        f"{_name(pods, s)} -> {_name(pods, d)}:{port} should be {'allowed' if ok else 'denied'}"
        for s, d, port, ok in expect
        if allowed(r, s, d, port) != ok
    ]
    assert not wrong, f"{overlay}:\n" + "\n".join(wrong)
    for name, pod in pods.items():
        assert allowed(r, pod, dns, 53, "UDP") and allowed(r, pod, dns, 53, "TCP"), f"{name} cannot resolve names"
        assert not allowed(r, pod, stranger, 443), f"{name} may reach arbitrary pods"
    if overlay == "dev":
        assert not allowed(r, stranger, postgres, 5432) and not allowed(r, query, postgres, 5432)
        assert allowed(r, pods["mongo-rs-init"], mongo, 27017)


def _name(pods: dict[str, Pod], pod: Pod) -> str:
    for name, candidate in pods.items():
        if candidate is pod:
            return name
    return "external" if pod.external else f"{pod.namespace}/{pod.labels}"
