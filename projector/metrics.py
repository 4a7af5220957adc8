"""Prometheus metrics of one projector, in a registry of its own (several projectors may share a process).

`/metrics` is served over HTTP when `CQRS_PROJECTOR_METRICS_PORT` is set (0 picks a free port), by
prometheus_client's own threaded server on `CQRS_METRICS_HOST` (default loopback).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from core.metrics import MetricsServer, start_metrics_server
from core.stage_metrics import StageMetrics
from projector.planning import delivered

if TYPE_CHECKING:
    from projector.settlement import BatchOutcome

log = logging.getLogger(__name__)

# From 1 ms (the projector keeping up) to 60 s (a backlog after an outage); beyond that only the count matters.
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ProjectorMetrics:
    """The projector's metrics, and the optional HTTP server that exposes them."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.lag = Histogram(
            "cqrs_projection_lag_seconds",
            "Seconds from an event's commit in PostgreSQL (recorded_at) to its being applied in MongoDB.",
            buckets=LAG_BUCKETS,
            registry=self.registry,
        )
        self.stages = StageMetrics(
            "cqrs_projector_stage_seconds",
            "Seconds an event or a batch spends in each stage on its way to the read model (core.stage_metrics)",
            self.registry,
        )
        self.applied = Counter(
            "cqrs_projector_events_applied", "Events applied to the read model.", registry=self.registry
        )
        self.duplicates = Counter(
            "cqrs_projector_events_duplicate",
            "Events recognised as already applied (redeliveries, replays) and acknowledged.",
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "cqrs_projector_dead_letters",
            "Events that parked their stream, and messages naming no stream (recorded in dead_letters and terminated).",
            registry=self.registry,
        )
        self.consumer_pending = Gauge(
            "cqrs_projector_consumer_pending",
            "Messages of the stream not yet delivered to the durable consumer.",
            registry=self.registry,
        )
        self.consumer_ack_pending = Gauge(
            "cqrs_projector_consumer_ack_pending",
            "Messages delivered to the durable consumer and not yet acknowledged.",
            registry=self.registry,
        )
        self.redeliveries = Counter(
            "cqrs_projector_redeliveries",
            "Fetched messages that JetStream had delivered before (num_delivered > 1).",
            registry=self.registry,
        )
        self.mongo_up = Gauge(
            "cqrs_projector_mongo_up", "1 while the read model (MongoDB) answers, else 0.", registry=self.registry
        )
        self.parked_streams = Gauge(
            "cqrs_projector_parked_streams",
            "Streams parked behind an event that cannot be applied yet, by kind (poison, needs_upgrade, gap, "
            "write_failed); `cqrs dead-letters list` shows them.",
            ["kind"],
            registry=self.registry,
        )
        self.held_events = Counter(
            "cqrs_projector_events_held",
            "Events of parked streams copied to parked_events and acknowledged (they wait behind the park).",
            registry=self.registry,
        )
        self.serving = Gauge(
            "cqrs_projector_serving",
            "1 while every essential background loop of the projector runs (SERVING), else 0 (NOT_SERVING).",
            registry=self.registry,
        )
        self.loop_restarts = Counter(
            "cqrs_projector_loop_restarts",
            "Background loops restarted after an unexpected end.",
            ["loop"],
            registry=self.registry,
        )
        self.naks = Counter(
            "cqrs_projector_naks",
            "Messages negatively acknowledged for redelivery (version gaps, MongoDB failures, handovers).",
            registry=self.registry,
        )
        self.stream_partitions = Gauge(
            "cqrs_projector_stream_partitions",
            "Partitions the event stream maps its subjects to (0: no mapping, every replica shares one consumer).",
            registry=self.registry,
        )
        self.partitions_owned = Gauge(
            "cqrs_projector_partitions_owned",
            "Partitions this replica holds the lease of and consumes (summed over replicas: every partition once).",
            registry=self.registry,
        )
        self.partition_handovers = Counter(
            "cqrs_projector_partition_handovers",
            "Partition leases taken (claimed), given up for a rebalance or a stop (released), or found expired "
            "or taken by another replica (lost).",
            ["direction"],
            registry=self.registry,
        )
        self.sales_tags_held = Gauge(
            "cqrs_projector_sales_tags_held",
            "Sales facts' tags in the report's shards at the last sweep (the facts in flight; it should not grow with "
            "the day's sales); 0 on a replica that does not sweep (only the owner of partition 0 does).",
            registry=self.registry,
        )
        self.sales_tags_forgotten = Counter(
            "cqrs_projector_sales_tags_forgotten",
            "Sales facts' tags removed from the shards once their orders' checkpoints covered them.",
            registry=self.registry,
        )
        self.customer_stats_writes = Counter(
            "cqrs_projector_customer_stats_writes",
            "Customers' order statistics written, by how: increment (the batch's change added to the statistics it "
            "read), redone (added again to the current statistics after another replica's increment overtook it), "
            "recompute (aggregated from every order of the customer: its cost grows with the customer's orders).",
            ["how"],
            registry=self.registry,
        )
        for how in ("increment", "redone", "recompute"):
            self.customer_stats_writes.labels(how)
        self._exporter: MetricsServer | None = None

    def record_outcome(self, outcome: BatchOutcome) -> None:
        """Counts what one settled batch did (lag of each applied event from its commit)."""
        now = datetime.now(UTC)
        for delivery in outcome.applied:
            self.lag.observe(max(0.0, (now - delivery.recorded.recorded_at).total_seconds()))
        self.applied.inc(len(outcome.applied))
        self.duplicates.inc(outcome.duplicates)
        self.dead_letters.inc(len(outcome.parks) + len(outcome.dead_letters))
        self.held_events.inc(outcome.held)
        self.naks.inc(len(outcome.nak))
        for how, customers in outcome.stats_writes.items():
            if customers:
                self.customer_stats_writes.labels(how).inc(customers)

    def record_stages(self, outcome: BatchOutcome, fetched_at: float) -> None:
        """Per applied event: commit to stored in JetStream (the relay's share), stored to fetched (`fetched_at`,
        a `time.time()`); first deliveries only (a redelivery's wait is the backoff, not the path)."""
        # The labelled children once per batch, not per event (`StageMetrics.observe` looks them up per call).
        relay_to_stream = self.stages.seconds.labels("relay_to_stream")
        stream_to_fetch = self.stages.seconds.labels("stream_to_fetch")
        for delivery in outcome.applied:
            msg = delivery.msg
            if msg is None or delivered(msg) > 1:
                continue
            stored = msg.metadata.timestamp.timestamp()
            # Never a negative duration (two clocks), as `StageMetrics.observe`.
            relay_to_stream.observe(max(0.0, stored - delivery.recorded.recorded_at.timestamp()))
            stream_to_fetch.observe(max(0.0, fetched_at - stored))

    @property
    def port(self) -> int | None:
        """The port `/metrics` is served on, once serving."""
        return None if self._exporter is None else self._exporter.port

    def serve(self, port: int, host: str) -> int:
        """Starts serving `/metrics` (port 0: a free one) in a daemon thread; returns the bound port."""
        if self._exporter is None:
            self._exporter = start_metrics_server(self.registry, host, port)
        return self._exporter.port

    def close(self) -> None:
        """Stops the HTTP server (if any) and waits for its thread."""
        exporter, self._exporter = self._exporter, None
        if exporter is not None:
            exporter.stop()
