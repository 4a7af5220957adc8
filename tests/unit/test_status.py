"""`cqrs status`: quantiles from Prometheus histogram buckets, and one screen over one or several replicas (what
is added up, what is shown once)."""

from __future__ import annotations

import math

import pytest

from cqrsctl.status import Scrape, histogram_quantile, merged_buckets, parse, render, run_status
from localservers import free_port


def test_no_observations_gives_none() -> None:
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(0.01, 0), (math.inf, 0)]) is None


def test_quantiles_interpolate_within_the_bucket() -> None:
    buckets = [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.01 + 0.09 * 0.5)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.1 + 0.9 * 0.5)


def test_observations_beyond_the_last_finite_bucket_report_that_bound() -> None:
    assert histogram_quantile(0.99, [(0.01, 1.0), (math.inf, 10.0)]) == 0.01


PAGE = """\
# TYPE cqrs_projector_events_applied counter
cqrs_projector_events_applied_total 120.0
# TYPE cqrs_projector_parked_streams gauge
cqrs_projector_parked_streams{kind="poison"} 2.0
cqrs_projector_parked_streams{kind="needs_upgrade"} 0.0
# TYPE cqrs_projection_lag_seconds histogram
cqrs_projection_lag_seconds_bucket{le="0.1"} 3.0
cqrs_projection_lag_seconds_bucket{le="0.01"} 1.0
cqrs_projection_lag_seconds_bucket{le="+Inf"} 4.0
cqrs_projection_lag_seconds_count 4.0
cqrs_projection_lag_seconds_sum 0.2
"""


def projector(
    url: str, *, owned: float, pending: float, applied: float, partitions: float = 8, **extra: float
) -> Scrape:
    values = {
        "cqrs_projector_mongo_up": 1.0,
        "cqrs_projector_serving": 1.0,
        "cqrs_projector_stream_partitions": partitions,
        "cqrs_projector_partitions_owned": owned,
        "cqrs_projector_consumer_pending": pending,
        "cqrs_projector_consumer_ack_pending": 1.0,
        "cqrs_projector_events_applied_total": applied,
        **extra,
    }
    return Scrape(url, values=values, buckets=[(0.01, applied / 2), (0.1, applied), (math.inf, applied)])


def command(url: str, backlog: float) -> Scrape:
    values = {"cqrs_postgres_up": 1.0, "cqrs_outbox_backlog": backlog, "cqrs_outbox_oldest_age_seconds": 0.5}
    return Scrape(url, values=values)


def line(text: str, start: str) -> str:
    return next(row.strip() for row in text.splitlines() if row.strip().startswith(start))


def test_a_page_gives_its_unlabelled_values_lag_buckets_and_parked_streams_by_kind() -> None:
    page = parse("u", PAGE)
    assert page.values["cqrs_projector_events_applied_total"] == 120
    assert page.buckets == [(0.01, 1.0), (0.1, 3.0), (math.inf, 4.0)]
    assert page.parked == {"poison": 2.0, "needs_upgrade": 0.0}


def test_one_replica_each() -> None:
    text = render([command("c", 3)], [projector("p", owned=8, pending=5, applied=10)])
    assert line(text, "command_service") == "command_service  c"
    assert line(text, "event store") == "event store (PostgreSQL)  up"
    assert line(text, "outbox backlog") == "outbox backlog            3 events, oldest 0.5 s"
    assert line(text, "projector") == "projector        p"
    assert line(text, "read model") == "read model (MongoDB)      up"
    assert line(text, "partitions owned") == "partitions owned          8 of 8"
    assert line(text, "consumer pending") == "consumer pending          5 (ack pending 1)"
    assert line(text, "parked streams") == "parked streams            0"
    assert line(text, "lag commit").endswith("over 10 events")


def test_partitioned_replicas_add_up_what_each_counts_and_show_shared_figures_once() -> None:
    replicas = [
        projector("a", owned=3, pending=4, applied=10),
        projector("b", owned=3, pending=6, applied=30, cqrs_projector_mongo_up=0),
        projector("c", owned=2, pending=0, applied=60),
    ]
    for replica in replicas:  # every replica counts the same parked streams in MongoDB
        replica.parked = {"poison": 1.0, "needs_upgrade": 2.0}
    text = render([command("c1", 7), command("c2", 9)], replicas)
    assert line(text, "command_service") == "command_service  2 replicas"
    assert line(text, "c1") == "c1  PostgreSQL up"
    assert line(text, "outbox backlog").startswith("outbox backlog            9 events")  # one outbox, read twice
    assert line(text, "projector") == "projector        3 replicas"
    assert line(text, "a  ") == "a  MongoDB up, serving, 3 partitions"
    assert line(text, "b  ") == "b  MongoDB DOWN, serving, 3 partitions"
    assert line(text, "read model") == "read model (MongoDB)      DOWN on 1 of 3 replicas"
    assert line(text, "partitions owned") == "partitions owned          8 of 8"
    assert line(text, "consumer pending") == "consumer pending          10 (ack pending 3)"
    assert line(text, "events applied").startswith("events applied            100 ")
    assert line(text, "parked streams") == (
        "parked streams            3 (needs_upgrade 2, poison 1; `cqrs dead-letters list` shows them)"
    )
    assert line(text, "lag commit").endswith("over 100 events")


def test_replicas_of_the_shared_consumer_report_the_same_pending_messages() -> None:
    replicas = [projector(u, owned=0, pending=40, applied=5, partitions=0) for u in ("a", "b")]
    text = render([command("c", 0)], replicas)
    assert line(text, "consumer pending") == "consumer pending          40 (ack pending 1)"
    assert "partitions owned" not in text
    assert line(text, "a  ") == "a  MongoDB up, serving"


def test_an_unreachable_replica_is_named_and_the_others_still_count() -> None:
    replicas = [projector("a", owned=8, pending=1, applied=10), Scrape("b", error="Connection refused")]
    text = render([Scrape("c", error="timed out")], replicas)
    assert line(text, "command_service") == "command_service  c"
    assert line(text, "unreachable") == "unreachable: timed out"
    assert line(text, "b  ") == "b  unreachable: Connection refused"
    assert "event store" not in text
    assert line(text, "events applied").startswith("events applied            10 ")


def test_the_exit_status_is_1_when_a_page_cannot_be_read() -> None:
    closed = f"http://127.0.0.1:{free_port()}/metrics"
    assert run_status(closed, f"{closed},{closed}") == 1


def test_the_replicas_lag_histograms_are_added_up_bound_by_bound() -> None:
    a = Scrape("a", buckets=[(0.01, 1.0), (0.1, 1.0), (math.inf, 1.0)])
    b = Scrape("b", buckets=[(0.01, 0.0), (0.1, 3.0), (math.inf, 3.0)])
    merged = merged_buckets([a, b])
    assert merged == [(0.01, 1.0), (0.1, 4.0), (math.inf, 4.0)]
    assert histogram_quantile(0.5, merged) == pytest.approx(0.01 + 0.09 * (2 - 1) / 3)
