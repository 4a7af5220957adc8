"""The time-to-queryable stages (core.stage_metrics) recorded by a real relay and projector for a real workload:
every event passes each per-event stage once, every batch each per-batch stage, and the stages add up to no more
than the projection lag they take apart."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tests.integration.test_verify import System, system

__all__ = ["system"]  # the fixture: a projected store at rest, the relay and the projector still running


def _sample(registry: CollectorRegistry, name: str, suffix: str, **labels: str) -> float:
    return registry.get_sample_value(f"{name}_{suffix}", labels) or 0.0


async def test_each_event_passes_every_stage_once(system: System) -> None:
    events = await system.pool.fetchval("SELECT count(*) FROM events")
    assert system.relay is not None and system.projector is not None
    relay = system.relay.stages.registry
    projector = system.projector.metrics.registry
    relay_stage, projector_stage = "cqrs_relay_stage_seconds", "cqrs_projector_stage_seconds"

    assert _sample(relay, relay_stage, "count", stage="commit_to_read") == events
    assert 1 <= _sample(relay, relay_stage, "count", stage="publish") <= events
    # A batch's delete rides on the next outbox read when one follows at once; only the others are timed apart. With
    # commits this close together every delete can ride on a read (the last one's too, when a commit's NOTIFY comes
    # after the read that took its rows), so there may be none here: `test_relay.py`'s delete test times one.
    assert _sample(relay, relay_stage, "count", stage="delete") <= _sample(relay, relay_stage, "count", stage="publish")
    first_deliveries = _sample(projector, projector_stage, "count", stage="relay_to_stream")
    assert 0 < first_deliveries <= events
    assert _sample(projector, projector_stage, "count", stage="stream_to_fetch") == first_deliveries
    assert _sample(projector, projector_stage, "count", stage="apply") >= 1
    assert _sample(projector, projector_stage, "count", stage="settle") >= 1
    # Commit to stored plus stored to fetched stays within commit to applied (the lag), event by event.
    parts = sum(_sample(projector, projector_stage, "sum", stage=s) for s in ("relay_to_stream", "stream_to_fetch"))
    lag = _sample(projector, "cqrs_projection_lag", "seconds_sum")
    assert 0 < parts <= lag
