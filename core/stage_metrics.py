"""Where time-to-queryable goes: a histogram per process, labelled by stage, so the path from a command's commit
to its event being queryable can be taken apart (relay wake-up, publish, JetStream to the projector, the
projector's batch, the acks).

Stages (see `command_service.relay` and `projector.runner`):

* relay (`cqrs_relay_stage_seconds`): `commit_to_read` per event (recorded_at to the relay reading its outbox
  row: the NOTIFY wake-up and the batch before it), `publish` per batch (until JetStream acked every message),
  `delete` per batch (the outbox rows);
* projector (`cqrs_projector_stage_seconds`): `relay_to_stream` per event (recorded_at to JetStream storing it:
  the relay's share, measured on the stream's clock), `stream_to_fetch` per event (stored to fetched by the
  projector: the fetch wait and the batch ahead of it), `apply` per batch (MongoDB: load, documents, views,
  checkpoints), `settle` per batch (the acks).

* query service (`cqrs_query_stage_seconds`, `query_service.consistency`): `consistency_wait` per query that
  waited for its consistency tokens (its whole wait), `checkpoint_to_seen` per query the shared waiter answered
  (from its last checkpoint's write, or its arrival if later, to the poll that saw it: the waiter's tick).

`cqrs_projection_lag_seconds` (projector) is the path up to the read model, commit to applied; the query
service's `checkpoint_to_seen` is what its waiter adds after that.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram

# From half a millisecond (a stage that keeps up) to 30 s (an outage's backlog).
STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class StageMetrics:
    """One histogram of seconds by stage."""

    def __init__(self, name: str, documentation: str, registry: CollectorRegistry | None) -> None:
        self.registry = registry or CollectorRegistry()  # a private one when the process exports none
        self.seconds = Histogram(name, documentation, ["stage"], buckets=STAGE_BUCKETS, registry=self.registry)

    def observe(self, stage: str, seconds: float) -> None:
        # Clocks of two processes (or of JetStream) may disagree by a little: never a negative duration.
        self.seconds.labels(stage).observe(max(0.0, seconds))
