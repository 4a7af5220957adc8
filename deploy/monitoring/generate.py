"""Writes the two generated monitoring files; `--check` only says whether they are up to date (exit 1 if not).

* deploy/k8s/base/prometheusrule.yaml: alerts.rules.yml wrapped in a PrometheusRule (monitoring.coreos.com/v1), for
  clusters run by the Prometheus Operator. Its `spec` is the plain file's text indented, comments and all, so the
  two cannot drift apart (tests/deploy/test_monitoring.py also compares the parsed groups).
* deploy/monitoring/grafana-dashboard.json: the Grafana dashboard, from the panel table below (Grafana's JSON model
  is verbose; a table keeps the queries reviewable). Import it in Grafana and pick the Prometheus data source.

    .venv/bin/python deploy/monitoring/generate.py [--check]

Standard library only: the project's venv has no YAML library, and none is needed to indent text.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MONITORING = Path(__file__).resolve().parent
RULES = MONITORING / "alerts.rules.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
PROMETHEUS_RULE = MONITORING.parent / "k8s" / "base" / "prometheusrule.yaml"

PROMETHEUS_RULE_HEADER = """\
# GENERATED from deploy/monitoring/alerts.rules.yml by deploy/monitoring/generate.py: edit that file, then run
# `.venv/bin/python deploy/monitoring/generate.py`. The alerting rules for clusters run by the Prometheus Operator;
# its Prometheus picks this up when its ruleSelector matches these labels (add the label your Prometheus selects,
# e.g. `release: <name>` of kube-prometheus-stack, with a patch in the overlay).
apiVersion: monitoring.coreos.com/v1
kind: PrometheusRule
metadata:
  name: cqrs-orders
  labels:
    app.kubernetes.io/name: cqrs-orders
    app.kubernetes.io/component: alerts
spec:
"""


def prometheus_rule(rules_text: str) -> str:
    """The PrometheusRule manifest: the rules file below its leading comment block, indented under `spec:`."""
    lines = rules_text.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith("groups:"))
    body = "".join(f"  {line}" if line.strip() else line for line in lines[start:])
    return PROMETHEUS_RULE_HEADER + body


# --- the dashboard ------------------------------------------------------------------------------------------------

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
RATE = "$__rate_interval"  # Grafana's window for rate(): at least four scrape intervals


@dataclass(frozen=True)
class Target:
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    targets: list[Target]
    unit: str = "short"
    width: int = 12
    kind: str = "timeseries"


@dataclass(frozen=True)
class Row:
    title: str
    panels: list[Panel] = field(default_factory=list)


def _quantiles(metric: str, by: str, selector: str = "") -> list[Target]:
    sel = f"{{{selector}}}" if selector else ""
    return [
        Target(f"histogram_quantile({q}, sum by (le{by}) (rate({metric}_bucket{sel}[{RATE}])))", f"p{int(q * 100)}")
        for q in (0.5, 0.9, 0.99)
    ]


def _stage_mean(metric: str, stages: str, process: str) -> Target:
    """Mean seconds per observation of each of `stages` (a regex) of a `core.stage_metrics` histogram."""
    selector = f'{{stage=~"{stages}"}}'
    seconds, count = (f"sum by (stage) (rate({metric}_{part}{selector}[{RATE}]))" for part in ("sum", "count"))
    return Target(f"{seconds} / {count}", f"{process} {{{{stage}}}}")


def _consumer_backlog(gauge: str, legend: str) -> Target:
    """A consumer gauge over all replicas: their sum when the stream is partitioned (each replica reports the
    consumers of its own partitions), else the max (every replica reports the one shared consumer)."""
    return Target(
        f"(sum({gauge}) and on () (max(cqrs_projector_stream_partitions) > 0)) or max({gauge})",
        legend,
    )


def _rpc_row(title: str, job: str, what: str) -> list[Panel]:
    # Server streams (WatchOrder, health Watch) last as long as the client keeps them open: not a latency.
    unary = f'job="{job}", method!~".*/Watch(Order)?"'
    return [
        Panel(
            f"{title} per second by method and status code",
            f"Finished {what} RPCs (cqrs_grpc_server_handled_total); a code other than OK is an error the client saw.",
            [
                Target(
                    f'sum by (method, code) (rate(cqrs_grpc_server_handled_total{{job="{job}"}}[{RATE}]))',
                    "{{method}} {{code}}",
                )
            ],
            unit="reqps",
        ),
        Panel(
            f"{title} latency p99 by method",
            f"Handler time of {what} RPCs, 99th percentile (cqrs_grpc_server_handling_seconds), streams excluded.",
            [
                Target(
                    "histogram_quantile(0.99, sum by (le, method) "
                    f"(rate(cqrs_grpc_server_handling_seconds_bucket{{{unary}}}[{RATE}])))",
                    "{{method}}",
                )
            ],
            unit="s",
        ),
    ]


ROWS = [
    Row(
        "Time to queryable (commit in PostgreSQL -> applied in MongoDB)",
        [
            Panel(
                "Time to queryable",
                "Per event, from its commit to its being applied to the read model (cqrs_projection_lag_seconds); "
                "the relay and JetStream are inside it. SLO: 99 % within 0.5 s.",
                _quantiles("cqrs_projection_lag_seconds", "", 'job="projector"'),
                unit="s",
            ),
            Panel(
                "Events slower than the SLO (0.5 s)",
                "Share of events that took longer than 0.5 s (recording rules of alerts.rules.yml); the budget is 1 %. "
                "The burn-rate alerts fire at 14.4x (1 h) and 6x (6 h) the budget.",
                [
                    Target("cqrs:time_to_queryable_slow_ratio:rate5m", "last 5 min"),
                    Target("cqrs:time_to_queryable_slow_ratio:rate1h", "last hour"),
                    Target("vector(0.01)", "budget"),
                ],
                unit="percentunit",
            ),
            Panel(
                "Where the time goes: mean seconds per event by stage",
                "Relay (cqrs_relay_stage_seconds): commit_to_read (recorded to read from the outbox, the command's "
                "own commit included). Projector (cqrs_projector_stage_seconds): relay_to_stream (recorded to "
                "stored in JetStream), stream_to_fetch (stored to fetched: waiting behind the batch in hand). "
                "Query service (cqrs_query_stage_seconds, per query waiting for consistency tokens): "
                "checkpoint_to_seen (its last checkpoint written to seen by the shared waiter: the waiter's tick), "
                "consistency_wait (the whole wait). core/stage_metrics.py.",
                [
                    _stage_mean("cqrs_relay_stage_seconds", "commit_to_read", "relay"),
                    _stage_mean("cqrs_projector_stage_seconds", "relay_to_stream|stream_to_fetch", "projector"),
                    _stage_mean("cqrs_query_stage_seconds", "checkpoint_to_seen|consistency_wait", "query"),
                ],
                unit="s",
            ),
            Panel(
                "Where the time goes: mean seconds per batch by stage",
                "Relay: publish (until JetStream acked the batch), delete (its outbox rows). Projector: apply (the "
                "MongoDB round trips of a batch), settle (the acks).",
                [
                    _stage_mean("cqrs_relay_stage_seconds", "publish|delete", "relay"),
                    _stage_mean("cqrs_projector_stage_seconds", "apply|settle", "projector"),
                ],
                unit="s",
            ),
        ],
    ),
    Row("Commands (command_service)", _rpc_row("Commands", "command-service", "command")),
    Row("Queries (query_service)", _rpc_row("Queries", "query-service", "query")),
    Row(
        "Projector",
        [
            Panel(
                "Projector throughput",
                "Events per second settled by all projector replicas: applied, recognised as already applied "
                "(redeliveries, replays), held behind a parked stream, parked or dead-lettered; and redeliveries.",
                [
                    Target(f"sum(rate(cqrs_projector_events_applied_total[{RATE}]))", "applied"),
                    Target(f"sum(rate(cqrs_projector_events_duplicate_total[{RATE}]))", "duplicates"),
                    Target(f"sum(rate(cqrs_projector_events_held_total[{RATE}]))", "held behind a park"),
                    Target(f"sum(rate(cqrs_projector_dead_letters_total[{RATE}]))", "parked / dead letters"),
                    Target(f"sum(rate(cqrs_projector_redeliveries_total[{RATE}]))", "redeliveries"),
                ],
                unit="ops",
                width=8,
            ),
            Panel(
                "Consumer backlog",
                "The durable JetStream consumers: events not yet delivered (pending) and delivered but not yet "
                "acknowledged (ack pending). With a partitioned stream each replica reports the consumers of the "
                "partitions it owns, hence the sum; with one shared consumer every replica reports it, hence max.",
                [
                    _consumer_backlog("cqrs_projector_consumer_pending", "pending"),
                    _consumer_backlog("cqrs_projector_consumer_ack_pending", "ack pending"),
                ],
                width=8,
            ),
            Panel(
                "Projector replicas",
                "Replicas Prometheus scrapes, and those whose background loops all run (SERVING).",
                [
                    Target('sum(up{job="projector"})', "scraped"),
                    Target("sum(cqrs_projector_serving)", "serving"),
                ],
                width=8,
            ),
        ],
    ),
    Row(
        "Projector views",
        [
            Panel(
                "Customer statistics writes per second by how",
                "How the projectors wrote customers' order statistics (cqrs_projector_customer_stats_writes_total): "
                "increment (the batch's change added to the statistics it read: the usual way), redone (added again "
                "after another replica's increment overtook it) and recompute (aggregated from all of the customer's "
                "orders, a cost that grows with them: after a restart, a replayed or resumed stream, or a race with "
                "another recompute). Recomputes that stay high mean replicas fighting over the same customers.",
                [
                    Target(
                        f"sum by (how) (rate(cqrs_projector_customer_stats_writes_total[{RATE}]))",
                        "{{how}}",
                    )
                ],
                unit="ops",
            ),
        ],
    ),
    Row(
        "Projector partitions (one lease per partition)",
        [
            Panel(
                "Partitions owned per replica",
                "Partitions each projector replica holds the lease of and consumes "
                "(cqrs_projector_partitions_owned), beside the stream's partition count "
                "(cqrs_projector_stream_partitions; 0: no partition mapping, the replicas share one consumer). "
                "With M replicas each owns about partitions / M.",
                [
                    Target("sum by (instance) (cqrs_projector_partitions_owned)", "{{instance}}"),
                    Target("max(cqrs_projector_stream_partitions)", "stream partitions"),
                ],
                width=6,
            ),
            Panel(
                "Unowned partitions",
                "Stream partitions minus the partitions owned over all replicas: above 0, some orders stop updating "
                "(CqrsUnownedPartitions after a minute); below 0, a partition is owned twice (a moment during a "
                "handover; CqrsPartitionsOwnedTwice after 5 minutes).",
                [
                    Target(
                        "max(cqrs_projector_stream_partitions) - sum(cqrs_projector_partitions_owned)",
                        "unowned",
                    )
                ],
                width=6,
            ),
            Panel(
                "Partition handovers per 5 minutes by direction",
                "Leases claimed, released (rebalance, shutdown) and lost (not renewed in time: CPU throttling, slow "
                "MongoDB; CqrsPartitionLeaseChurn when it goes on). Claims and releases follow replicas joining "
                "and leaving.",
                [
                    Target(
                        "sum by (direction) (increase(cqrs_projector_partition_handovers_total[5m]))",
                        "{{direction}}",
                    )
                ],
                width=6,
            ),
            Panel(
                "Naks and redeliveries per second",
                "Messages negatively acknowledged for redelivery (version gaps, MongoDB failures, handovers: "
                "cqrs_projector_naks_total) and fetched messages JetStream had delivered before "
                "(cqrs_projector_redeliveries_total: naks coming back, and messages of a replica that died "
                "unacknowledged, after the ack wait).",
                [
                    Target(f"sum(rate(cqrs_projector_naks_total[{RATE}]))", "naks"),
                    Target(f"sum(rate(cqrs_projector_redeliveries_total[{RATE}]))", "redeliveries"),
                ],
                unit="ops",
                width=6,
            ),
        ],
    ),
    Row(
        "Outbox and relay (command_service -> JetStream)",
        [
            Panel(
                "Outbox backlog",
                "Events committed but not yet acknowledged by JetStream (cqrs_outbox_backlog).",
                [Target("max(cqrs_outbox_backlog)", "events")],
                width=8,
            ),
            Panel(
                "Oldest unpublished event",
                "Age of the oldest outbox row; alerts at 60 s (warning) and 300 s (critical).",
                [Target("max(cqrs_outbox_oldest_age_seconds)", "age")],
                unit="s",
                width=8,
            ),
            Panel(
                "Replicas relaying",
                "command_service replicas that hold the relay lease (cqrs_relay_active): 1 is right, 0 means no "
                "relay (CqrsNoActiveRelay).",
                [Target('sum(cqrs_relay_active{job="command-service"}) or vector(0)', "relaying")],
                width=8,
            ),
        ],
    ),
    Row(
        "Parked streams and dependencies",
        [
            Panel(
                "Parked streams by kind",
                "Streams waiting behind an event that cannot be applied yet; `cqrs dead-letters list` shows them.",
                [Target("max by (kind) (cqrs_projector_parked_streams)", "{{kind}}")],
            ),
            Panel(
                "Sales facts in flight",
                "Tags of sales facts in the report's shards at each projector's last sweep: the facts whose orders' "
                "checkpoints are not past them yet, or were passed less than about two minutes ago. Level through the "
                "day; a steady climb means orders stuck behind their checkpoints (parked streams) or a sweep failing "
                "(the projector's log says so).",
                [Target("max(cqrs_projector_sales_tags_held)", "tags held")],
            ),
            Panel(
                "Dependencies up",
                "1 while the process's probe of its store answers: PostgreSQL from each command_service, MongoDB "
                "from each projector (lowest replica shown).",
                [
                    Target("min(cqrs_postgres_up)", "PostgreSQL (command_service)"),
                    Target("min(cqrs_projector_mongo_up)", "MongoDB (projector)"),
                ],
                width=8,
            ),
            Panel(
                "Dependency errors per second",
                "Failed calls to PostgreSQL, NATS and MongoDB by process, dependency and operation.",
                [
                    Target(
                        f"sum by (job, dependency, operation) (rate(cqrs_dependency_call_errors_total[{RATE}]))",
                        "{{job}} {{dependency}} {{operation}}",
                    )
                ],
                unit="ops",
                width=8,
            ),
            Panel(
                "Dependency call latency p99",
                "Calls to PostgreSQL, NATS and MongoDB by process and dependency, 99th percentile.",
                [
                    Target(
                        "histogram_quantile(0.99, sum by (le, job, dependency) "
                        f"(rate(cqrs_dependency_call_seconds_bucket[{RATE}])))",
                        "{{job}} {{dependency}}",
                    )
                ],
                unit="s",
                width=8,
            ),
        ],
    ),
    Row(
        "Read-model rebuild (cqrs-rebuild Job)",
        [
            Panel(
                "Rebuild progress",
                "Events left to apply to the generation being built, and the rate it applies them. Empty when no "
                "rebuild runs.",
                [
                    Target("max(cqrs_rebuild_events_remaining)", "events left"),
                    Target(f"sum(rate(cqrs_rebuild_events_applied_total[{RATE}]))", "applied per second"),
                ],
                width=8,
            ),
            Panel(
                "Rebuild state",
                "building -> caught_up -> compared -> switching -> active.",
                [Target("max by (state) (cqrs_rebuild_state) == 1", "{{state}}")],
                width=8,
            ),
            Panel(
                "Rebuild generation",
                "The generation the running rebuild builds or switched to.",
                [Target("max(cqrs_rebuild_generation)", "generation")],
                width=8,
                kind="stat",
            ),
        ],
    ),
]


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    options: dict[str, Any]
    if panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False}, "colorMode": "none"}
    else:
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": options,
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": t.expr, "legendFormat": t.legend}
            for i, t in enumerate(panel.targets)
        ],
    }


def dashboard() -> dict[str, Any]:
    """Grafana's JSON model: a row panel per Row, its panels laid out left to right, 24 columns wide."""
    panels: list[dict[str, Any]] = []
    y = 0
    for row in ROWS:
        panels.append(
            {
                "id": len(panels) + 1,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        y += 1
        x = 0
        for panel in row.panels:
            if x + panel.width > 24:
                x, y = 0, y + 8
            panels.append(_panel_json(panel, len(panels) + 1, x, y))
            x += panel.width
        y += 8
    return {
        "uid": "cqrs-orders",
        "title": "cqrs-orders",
        "description": "Time to queryable, commands and queries, projector and its partitions, outbox, parked "
        "streams, dependencies and rebuilds (deploy/monitoring/generate.py; alerts in alerts.rules.yml).",
        "tags": ["cqrs-orders"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-3h", "to": "now"},
        "annotations": {"list": []},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                }
            ]
        },
        "panels": panels,
    }


def expected_files() -> dict[Path, str]:
    """Each generated file and the text it must have."""
    return {
        PROMETHEUS_RULE: prometheus_rule(RULES.read_text(encoding="utf-8")),
        DASHBOARD: json.dumps(dashboard(), indent=2, ensure_ascii=False) + "\n",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check that the files are up to date")
    args = parser.parse_args()
    stale = []
    for path, text in expected_files().items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale.append(path)
        if not args.check:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if args.check and stale:
        print("out of date (run .venv/bin/python deploy/monitoring/generate.py): " + ", ".join(map(str, stale)))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
