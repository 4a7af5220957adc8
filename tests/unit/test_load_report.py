"""`cqrs load` results: histogram merging across workers, the per-second timeline and the report's shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cqrsctl.load import histograms as hist
from cqrsctl.load.collect import Collector
from cqrsctl.load.config import LoadConfig
from cqrsctl.load.messages import Done, Failed, Ready, RpcResult, Tick, WorkerResult
from cqrsctl.load.report import build_report, render_summary, write_report

LATENCY_KEYS = {"p50", "p90", "p99", "p99_9", "max"}


def _encoded(*seconds: float, digits: int = hist.PRECISE_DIGITS) -> bytes:
    h = hist.new_histogram(digits)
    for s in seconds:
        hist.record_seconds(h, s)
    return hist.encode(h)


def _result(worker_id: int, elapsed: float, **rpcs: RpcResult) -> WorkerResult:
    return WorkerResult(
        worker_id=worker_id, elapsed_s=elapsed, dropped=worker_id, rpcs=dict(rpcs),
        ttq_histogram=_encoded(0.010, 0.020), ttq_timeouts=1, ttq_skipped=0, ttq_polls=5,
        fallbacks=0, evicted=0, pool_size=0,
    )  # fmt: skip


def test_merging_encoded_histograms_is_exact() -> None:
    a = [0.001 * i for i in range(1, 501)]  # 1..500 ms
    b = [0.5 + 0.001 * i for i in range(1, 501)]  # 501..1000 ms
    together = hist.merged([_encoded(*a), _encoded(*b)])
    direct = hist.decode(_encoded(*a, *b))
    assert hist.count(together) == 1000
    assert hist.summary_ms(together) == hist.summary_ms(direct)
    assert hist.percentile_ms(together, 50) == pytest.approx(500, rel=1e-3)
    assert hist.max_ms(together) == pytest.approx(1000, rel=1e-3)


def test_values_are_clamped_into_1us_60s_and_empty_merges_keep_the_minimum() -> None:
    h = hist.new_histogram()
    hist.record_seconds(h, 0.0)
    hist.record_seconds(h, 1000.0)
    assert hist.count(h) == 2
    assert hist.max_ms(h) == pytest.approx(60_000, rel=1e-3)
    hist.merge_into(h, hist.new_histogram())
    assert h.get_min_value() == 1
    assert hist.summary_ms(hist.new_histogram()) == dict.fromkeys(LATENCY_KEYS, 0.0)


def test_report_merges_workers_and_has_exactly_the_agreed_keys() -> None:
    results = [
        _result(
            0, 2.0,
            CreateOrder=RpcResult(10, {"ABORTED": 1}, _encoded(*[0.005] * 10)),
            GetOrder=RpcResult(4, {"NOT_FOUND": 2}, _encoded(*[0.001] * 4), not_yet_visible=1),
        ),
        _result(
            1, 2.5,
            CreateOrder=RpcResult(5, {"ABORTED": 2, "UNAVAILABLE": 1}, _encoded(*[0.050] * 5)),
            ListOrders=RpcResult(1, {}, _encoded(0.002)),
            GetOrder=RpcResult(3, {}, _encoded(*[0.001] * 3), not_yet_visible=2),
        ),
    ]  # fmt: skip
    config = LoadConfig(duration=2, workers=2)
    data = build_report(config.describe(), results).to_json()
    json.dumps(data)  # serialisable as is
    assert set(data) == {
        "config",
        "duration_s",
        "totals",
        "rpcs",
        "commands",
        "queries",
        "time_to_queryable_ms",
        "charts",
    }
    assert data["duration_s"] == 2.5
    assert data["totals"] == {"requests": 23, "errors": 6, "not_yet_visible": 3, "throughput_rps": 9.2, "dropped": 1}
    assert set(data["rpcs"]) == {"CreateOrder", "GetOrder", "ListOrders"}
    create = data["rpcs"]["CreateOrder"]
    assert set(create) == {"count", "errors_by_code", "not_yet_visible", "throughput_rps", "latency_ms"}
    assert create["count"] == 15 and create["throughput_rps"] == 6.0
    assert create["errors_by_code"] == {"ABORTED": 3, "UNAVAILABLE": 1}
    assert set(create["latency_ms"]) == LATENCY_KEYS
    assert create["latency_ms"]["p50"] == pytest.approx(5, rel=1e-2)
    assert create["latency_ms"]["max"] == pytest.approx(50, rel=1e-2)
    assert data["commands"]["count"] == 15 and data["commands"]["not_yet_visible"] == 0
    assert data["queries"]["count"] == 8 and data["queries"]["errors_by_code"] == {"NOT_FOUND": 2}
    assert data["rpcs"]["GetOrder"]["not_yet_visible"] == 3 and data["queries"]["not_yet_visible"] == 3
    assert set(data["queries"]) == set(create)
    ttq = data["time_to_queryable_ms"]
    assert set(ttq) == {"count", "timeouts", "skipped", "probe_calls"} | LATENCY_KEYS
    assert ttq["count"] == 4 and ttq["timeouts"] == 2 and ttq["probe_calls"] == 10
    assert ttq["p99"] == pytest.approx(20, rel=1e-2)
    assert data["charts"] == {"latency": None, "lag": None}


def test_collector_builds_the_timeline_once_every_worker_passed_a_second() -> None:
    collector = Collector(workers=2)
    for w in (0, 1):
        collector.handle(Ready(w))
    c = hist.COARSE_DIGITS
    collector.handle(Tick(0, 0, 10, 1, 0, _encoded(0.010, digits=c), _encoded(0.001, digits=c), not_yet_visible=3))
    assert collector.timeline == []  # worker 1 has not reported second 0 yet
    collector.handle(Tick(1, 0, 5, 0, 2, _encoded(0.030, digits=c), _encoded(digits=c)))
    collector.handle(Tick(0, 1, 3, 0, 0, _encoded(0.020, digits=c), _encoded(digits=c), final=True, pending_probes=4))
    assert [p.second for p in collector.timeline] == [0]
    assert collector.pending_probes == {0: 4} and not collector.sending_over
    first = collector.timeline[0]
    assert (first.requests, first.errors, first.dropped, first.not_yet_visible) == (15, 1, 2, 3)
    assert first.commands_p99 == pytest.approx(30, rel=0.01)
    assert first.queries_p50 == pytest.approx(1, rel=0.01)
    collector.handle(Done(_result(0, 1.5)))
    collector.handle(Failed(1, "boom"))  # a finished or failed worker no longer holds seconds back
    assert collector.sending_over
    assert [p.second for p in collector.timeline] == [0, 1]
    assert collector.timeline[1].queries_p50 is None
    assert collector.finished
    assert (collector.requests, collector.errors, collector.dropped, collector.not_yet_visible) == (18, 1, 2, 3)
    assert collector.live_p99_ms() == pytest.approx(30, rel=0.01)


def test_written_report_has_json_summary_and_charts(tmp_path: Path) -> None:
    collector = Collector(workers=1)
    c = hist.COARSE_DIGITS
    for s in range(3):  # errors and not-yet-visible reads in some seconds: the chart stacks them
        encoded = _encoded(0.004, 0.008, digits=c), _encoded(0.002, digits=c)
        collector.handle(Tick(0, s, 10, s % 2, 0, *encoded, not_yet_visible=s))
    result = _result(0, 3.0, PlaceOrder=RpcResult(7, {"FAILED_PRECONDITION": 1}, _encoded(0.004)))
    collector.handle(Done(result))
    report = build_report(LoadConfig(duration=3).describe(), [result], collector.timeline)
    write_report(report, tmp_path / "out")
    for name in ("report.json", "summary.md", "latency.png", "lag.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["charts"] == {"latency": "latency.png", "lag": "lag.png"}
    summary = render_summary(report)
    for section in ("## Totals", "## Latency by RPC (ms)", "## Errors by gRPC status code", "## Time to queryable"):
        assert section in summary
    assert "| PlaceOrder | FAILED_PRECONDITION | 1 |" in summary
    write_report(report, tmp_path / "bare", charts=False)
    assert not (tmp_path / "bare" / "latency.png").exists()
    assert json.loads((tmp_path / "bare" / "report.json").read_text())["charts"] == {"latency": None, "lag": None}


@pytest.mark.parametrize(
    ("mode", "advice"), [("eventual", "--read-consistency token"), ("token", "wait for it ran out")]
)
def test_summary_counts_not_yet_visible_reads_apart_from_errors(mode: str, advice: str) -> None:
    result = _result(
        0, 2.0,
        GetOrder=RpcResult(9, {"UNAVAILABLE": 1}, _encoded(*[0.001] * 9), not_yet_visible=4),
        CreateOrder=RpcResult(3, {}, _encoded(*[0.005] * 3)),
    )  # fmt: skip
    config = LoadConfig(duration=2, read_consistency=mode).describe()  # type: ignore[arg-type]
    report = build_report(config, [result])
    assert (report.errors, report.not_yet_visible) == (1, 4)
    summary = render_summary(report)
    assert "| duration (s) | requests | errors | not yet visible | throughput (req/s) | dropped arrivals |" in summary
    assert "| 2.00 | 12 | 1 | 4 | 6.0 | 0 |" in summary
    assert "| GetOrder | UNAVAILABLE | 1 |" in summary
    assert f"| read_consistency | `{mode}` |" in summary
    note = next(line for line in summary.splitlines() if "reads of orders this run wrote" in line)
    assert note.startswith("- 4 reads") and advice in note
    quiet = render_summary(build_report(config, [_result(0, 2.0, CreateOrder=RpcResult(3, {}, _encoded(0.005)))]))
    assert "reads of orders this run wrote" not in quiet
