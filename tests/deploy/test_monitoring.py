"""The monitoring files of deploy/monitoring: the Prometheus rules (plain file and the PrometheusRule generated from
it), their promtool unit tests, the Grafana dashboard and the example scrape configuration.

promtool is Debian's (`prometheus` package, which `make tools` installs on CI); a missing promtool fails these tests
with what to run, it never skips them. Every metric an alert or a panel names must be one the code exports: the
names are collected from the code's prometheus_client constructors (tests/deploy/test_monitoring.py's own AST scan,
checked against the metric classes' registries) and from the recording rules.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.deploy.conftest import Rendered
from tests.deploy.support import DEPLOY, ROOT, Doc, load_yaml_documents, run, tool

MONITORING = DEPLOY / "monitoring"
RULES = MONITORING / "alerts.rules.yml"
RULE_TESTS = MONITORING / "alerts.test.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
SCRAPE_CONFIG = MONITORING / "prometheus.yml"
PROMETHEUS_RULE = DEPLOY / "k8s" / "base" / "prometheusrule.yaml"
README = ROOT / "README.md"
RUNBOOK = "README.md#alerts-and-dashboard"
SEVERITIES = {"critical", "warning"}
OVERLAY_NAMESPACES = {"dev": "cqrs-dev", "prod": "cqrs"}

# Where the code defines its metrics, and the series Prometheus itself makes.
METRIC_PACKAGES = ("core", "command_service", "projector", "query_service", "cqrsctl")
PROMETHEUS_SERIES = {"up", "ALERTS", "ALERTS_FOR_STATE"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found on PATH: run `make tools` (as root it installs Debian's `prometheus` package; "
            "otherwise it says what to install)",
            pytrace=False,
        )
    return path


def run_promtool(*args: str | Path, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def load_yaml(path: Path) -> Any:
    (doc,) = load_yaml_documents(path.read_text(encoding="utf-8"))
    return doc


@cache
def rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = load_yaml(RULES)["groups"]
    return groups


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for g in rule_groups() for r in g["rules"] if "alert" in r}


def recorded_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


def dashboard_targets() -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the dashboard."""
    panels = json.loads(DASHBOARD.read_text(encoding="utf-8"))["panels"]
    return [(p["title"], t["expr"]) for p in panels if p["type"] != "row" for t in p["targets"]]


# --- the rules ---------------------------------------------------------------------------------------------------


def test_rules_pass_promtool_check() -> None:
    done = run_promtool("check", "rules", RULES)
    assert done.returncode == 0, done.stdout + done.stderr


def test_rule_unit_tests_pass() -> None:
    done = run_promtool("test", "rules", RULE_TESTS.name, cwd=MONITORING)
    assert done.returncode == 0 and "SUCCESS" in done.stdout, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    cases = [case for test in load_yaml(RULE_TESTS)["tests"] for case in test.get("alert_rule_test", [])]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    stays_silent = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert load_yaml(RULE_TESTS)["rule_files"] == [RULES.name]
    assert not set(alerts()) - fires, f"alerts never tested firing: {sorted(set(alerts()) - fires)}"
    assert not set(alerts()) - stays_silent, f"alerts never tested silent: {sorted(set(alerts()) - stays_silent)}"
    assert not (fires | stays_silent) - set(alerts()), "alert_rule_test names an alert that does not exist"


def test_every_alert_tells_the_operator_what_is_wrong_and_what_to_do() -> None:
    assert len(alerts()) >= 15
    for name, rule in alerts().items():
        assert re.fullmatch(r"Cqrs[A-Z]\w+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook"}, name
        assert annotations["runbook"] == RUNBOOK, name
        assert "`" in annotations["description"], f"{name}: the description names no command to run"
        assert "for" in rule, f"{name}: an alert without `for:` fires on one bad evaluation"


def test_the_alerts_the_issue_asks_for_exist() -> None:
    """Issue 13: time-to-queryable SLO, outbox backlog age, no active relay, parked streams, unowned partitions,
    dependency errors."""
    wanted = {
        "CqrsTimeToQueryableBudgetBurnFast": "cqrs:time_to_queryable_slow_ratio",
        "CqrsOutboxBacklogAging": "cqrs_outbox_oldest_age_seconds",
        "CqrsNoActiveRelay": "cqrs_relay_active",
        "CqrsPoisonedStreams": "cqrs_projector_parked_streams",
        "CqrsUnownedPartitions": "cqrs_projector_partitions_owned",
        "CqrsDependencyErrors": "cqrs_dependency_call_errors_total",
    }
    for name, metric in wanted.items():
        assert name in alerts(), f"no alert {name}"
        assert metric in alerts()[name]["expr"], f"{name} does not watch {metric}"


def test_readme_runbook_covers_every_alert() -> None:
    text = README.read_text(encoding="utf-8")
    heading = re.search(r"^### Alerts and dashboard\n(.*?)(?=^#{1,3} )", text, re.M | re.S)
    assert heading, "README.md has no '### Alerts and dashboard' section (the runbook the alerts link to)"
    section = heading.group(1)
    missing = [name for name in alerts() if f"`{name}`" not in section]
    assert not missing, f"alerts without a runbook entry in README.md: {missing}"


def test_prometheus_rule_is_generated_from_the_rules_file() -> None:
    done = subprocess.run(
        [sys.executable, str(MONITORING / "generate.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rule = load_yaml(PROMETHEUS_RULE)
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"]["groups"] == rule_groups()


# A PrometheusRule's schema, written from the Prometheus Operator's API reference (monitoring.coreos.com/v1) and
# strict like `kubernetes-validate --strict`: unknown fields are errors (the CRD itself would prune them silently).
_DURATION = {
    "type": "string",
    "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$",
}
_STRING_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["expr"],
    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
    "properties": {
        "alert": {"type": "string", "minLength": 1},
        "record": {"type": "string", "pattern": r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"},
        "expr": {"anyOf": [{"type": "integer"}, {"type": "string", "minLength": 1}]},
        "for": _DURATION,
        "keep_firing_for": _DURATION,
        "labels": _STRING_MAP,
        "annotations": _STRING_MAP,
    },
}
PROMETHEUS_RULE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253},
                "namespace": {"type": "string"},
                "labels": _STRING_MAP,
                "annotations": _STRING_MAP,
            },
        },
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["name"],
                        "properties": {
                            "name": {"type": "string", "minLength": 1},
                            "interval": _DURATION,
                            "query_offset": _DURATION,
                            "limit": {"type": "integer"},
                            "labels": _STRING_MAP,
                            "partial_response_strategy": {"type": "string"},
                            "rules": {"type": "array", "items": _RULE},
                        },
                    },
                }
            },
        },
    },
}


def schema_errors(docs: list[Doc]) -> list[list[str]]:
    """The validation errors of each document against PROMETHEUS_RULE_SCHEMA (jsonschema of the tools venv)."""
    script = (
        "import json, sys, jsonschema\n"
        "schema, docs = json.load(sys.stdin)\n"
        "v = jsonschema.Draft202012Validator(schema)\n"
        "print(json.dumps([[f'{list(e.absolute_path)}: {e.message}' for e in v.iter_errors(d)] for d in docs]))\n"
    )
    done = run([tool("python"), "-c", script], input_text=json.dumps([PROMETHEUS_RULE_SCHEMA, docs]), timeout=60)
    assert done.returncode == 0, done.stderr
    errors: list[list[str]] = json.loads(done.stdout)
    return errors


def test_both_overlays_deploy_the_rules_as_a_valid_prometheus_rule(rendered: dict[str, Rendered]) -> None:
    for overlay, r in rendered.items():
        (rule,) = r.custom
        assert rule["kind"] == "PrometheusRule", overlay
        assert rule["metadata"]["namespace"] == OVERLAY_NAMESPACES[overlay], overlay
        assert rule["spec"]["groups"] == rule_groups(), f"{overlay}: kustomize changed the rules"
        names = [g["name"] for g in rule["spec"]["groups"]]
        assert len(names) == len(set(names)), "group names are the list's map key: they must be unique"
    errors = schema_errors([r.custom[0] for r in rendered.values()])
    assert errors == [[] for _ in rendered], errors


def test_the_prometheus_rule_schema_rejects_a_misspelt_field(rendered: dict[str, Rendered]) -> None:
    rule = json.loads(json.dumps(rendered["prod"].custom[0]))
    rule["spec"]["groups"][0]["rules"][-1]["fro"] = "5m"
    rule["spec"]["groups"][1]["rules"][0]["for"] = "five minutes"
    (errors,) = schema_errors([rule])
    assert any("'fro' was unexpected" in e for e in errors), errors
    assert any("five minutes" in e for e in errors), errors


# --- metric names: the rules and the dashboard name only what the code exports -----------------------------------

_PROMETHEUS_TYPES = {
    "Counter": ("_total", "_created"),
    "Gauge": ("",),
    "Histogram": ("_bucket", "_count", "_sum", "_created"),
    "Summary": ("", "_count", "_sum", "_created"),
    "Info": ("_info",),
    "Enum": ("",),
}


def _series_names(kind: str, name: str) -> set[str]:
    base = name.removesuffix("_total") if kind == "Counter" else name
    return {base + suffix for suffix in _PROMETHEUS_TYPES[kind]}


def _first_arg(call: ast.Call, index: int) -> ast.expr | None:
    if len(call.args) > index:
        return call.args[index]
    return next((k.value for k in call.keywords if k.arg == "name"), None)


def _callee(call: ast.Call) -> str | None:
    func = call.func
    return func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else None


@cache
def code_metric_names() -> frozenset[str]:
    """Series names of every metric the code defines, found by reading it (ast): calls of prometheus_client's
    metric classes with a literal name, and calls of wrappers that pass one of their parameters on as the name
    (e.g. a class whose `__init__(self, name, ...)` builds a Histogram(name, ...))."""
    trees = [
        ast.parse(p.read_text(encoding="utf-8")) for pkg in METRIC_PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))
    ]
    # callee name -> (metric kind, position of the name argument)
    makers: dict[str, tuple[str, int]] = {}
    for tree in trees:
        imported = {
            alias.asname or alias.name: alias.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module == "prometheus_client"
            for alias in node.names
            if alias.name in _PROMETHEUS_TYPES
        }
        makers.update({local: (kind, 0) for local, kind in imported.items()})
        owners = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
        for owner in owners:
            functions = [n for n in owner.body if isinstance(n, ast.FunctionDef)]
            for func in functions:
                params = [a.arg for a in func.args.args]
                for call in (n for n in ast.walk(func) if isinstance(n, ast.Call)):
                    kind = imported.get(_callee(call) or "")
                    arg = _first_arg(call, 0)
                    if kind and isinstance(arg, ast.Name) and arg.id in params:
                        if func.name == "__init__" and isinstance(owner, ast.ClassDef):
                            makers[owner.name] = (kind, params.index(arg.id) - 1)
                        else:
                            makers[func.name] = (kind, params.index(arg.id))
    names: set[str] = set()
    for tree in trees:
        for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
            maker = makers.get(_callee(call) or "")
            if maker is None:
                continue
            arg = _first_arg(call, maker[1])
            if (
                isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and re.fullmatch(r"[a-z_:][\w:]*", arg.value)
            ):
                names |= _series_names(maker[0], arg.value)
    return frozenset(names)


def test_the_metric_scan_finds_what_the_metric_classes_register() -> None:
    """Guards the ast scan above: every series of the services' metric classes, built here, is among its names."""
    from command_service.metrics import OutboxMetrics
    from core.dependency_metrics import DependencyMetrics
    from core.rpc_metrics import RpcMetrics
    from cqrsctl.rebuild.progress import RebuildMetrics
    from projector.metrics import ProjectorMetrics

    registries = [ProjectorMetrics().registry]
    for metric_class in (OutboxMetrics, RpcMetrics, DependencyMetrics, RebuildMetrics):
        registry = CollectorRegistry()
        metric_class(registry)
        registries.append(registry)
    registered = {
        name
        for registry in registries
        for family in registry.collect()
        for name in _series_names(family.type.capitalize(), family.name)
    }
    assert len(registered) > 40
    assert registered <= code_metric_names(), sorted(registered - code_metric_names())


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^}]*\}|\[[^\]]*\]")  # label matchers, ranges and subqueries
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENTIFIER = re.compile(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()")  # not a function call, not in a number
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "by", "without", "on", "ignoring"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (functions, label names, keywords and numbers left out)."""
    text = _LABEL_LISTS.sub(" ", _BRACES.sub(" ", _STRINGS.sub(" ", expr)))
    text = re.sub(r"\boffset\s+\S+", " ", text)
    return {name for name in _IDENTIFIER.findall(text) if name.lower() not in _KEYWORDS}


def test_metric_names_are_read_from_promql() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, job) (rate(a_seconds_bucket{job="x", le=~"1.0|2e3"}[$__rate_interval])))'
        " / on (job) group_left (pod) b_total offset 5m > bool 1e3 and c:rule:rate5m unless vector(1)"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_total", "c:rule:rate5m"}


def test_every_metric_in_the_rules_and_the_dashboard_is_exported_by_the_code() -> None:
    known = code_metric_names() | recorded_names() | PROMETHEUS_SERIES
    expressions = [(f"rule {r.get('alert') or r['record']}", r["expr"]) for g in rule_groups() for r in g["rules"]]
    expressions += [(f"panel {title!r}", expr) for title, expr in dashboard_targets()]
    unknown = [
        f"{where}: {sorted(metric_names(expr) - known)}" for where, expr in expressions if metric_names(expr) - known
    ]
    assert not unknown, "metrics the code does not export:\n" + "\n".join(unknown)
    used = set().union(*(metric_names(expr) for _, expr in expressions))
    assert {"cqrs_projection_lag_seconds_bucket", "cqrs_projector_parked_streams", "up"} <= used


# --- the dashboard -------------------------------------------------------------------------------------------------


def test_dashboard_is_grafana_json_with_a_query_in_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    assert [v["name"] for v in dashboard["templating"]["list"]] == ["datasource"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    topics = ("time to queryable", "commands", "queries", "projector", "outbox", "parked", "dependency", "rebuild")
    partitions = ("partitions owned", "unowned partitions", "handovers", "naks", "redeliveries")
    for topic in topics + partitions:
        assert topic in titles, f"the dashboard has no panel about {topic}"


def test_every_dashboard_expression_parses(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule (JSON is YAML); Grafana's `$__rate_interval` becomes 5m."""
    rules = [
        {"record": f"dashboard:panel_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (_, expr) in enumerate(dashboard_targets())
    ]
    assert not [r for r in rules if "$" in r["expr"]], "a dashboard variable promtool cannot stand in for"
    path = tmp_path / "dashboard.rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    done = run_promtool("check", "rules", path)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the example scrape configuration ----------------------------------------------------------------------------


def test_example_scrape_config_is_valid_and_labels_jobs_by_app_name(tmp_path: Path) -> None:
    """Debian's Prometheus is built without Kubernetes service discovery, so promtool checks a copy whose
    kubernetes_sd_configs is swapped for a static target; the relabelling, the part that matters, is checked."""
    config = load_yaml(SCRAPE_CONFIG)
    assert config["rule_files"] == [RULES.name]
    (job,) = config["scrape_configs"]
    relabel = job["relabel_configs"]
    assert {"source_labels": ["__meta_kubernetes_pod_label_app_kubernetes_io_name"], "target_label": "job"} in relabel
    assert job.pop("kubernetes_sd_configs")[0]["role"] == "pod"
    job["static_configs"] = [{"targets": ["127.0.0.1:9102"]}]
    shutil.copy(RULES, tmp_path / RULES.name)
    path = tmp_path / "prometheus.yml"
    path.write_text(json.dumps(config), encoding="utf-8")
    done = run_promtool("check", "config", path.name, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
