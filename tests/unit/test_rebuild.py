"""The pure parts of `cqrs rebuild`: ignored fields, document comparison, outcome problems, status rows, ETA, when
the catch-up before a switch stops."""

from __future__ import annotations

import io
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry

from core.generations import LEGACY_VERSIONS, database_name
from cqrsctl.main import build_parser
from cqrsctl.rebuild.build import only_conflicts, problems
from cqrsctl.rebuild.cli import config_from_args, render_json, render_status, render_text
from cqrsctl.rebuild.cutover import MAX_PASSES_BEFORE_THE_SWITCH, CutoverResult, _caught_up
from cqrsctl.rebuild.generations import status_rows
from cqrsctl.rebuild.model import RebuildResult, changed_components
from cqrsctl.rebuild.progress import RebuildMetrics, RebuildProgress, eta_text
from cqrsctl.rebuild.reader import Cursor
from cqrsctl.rebuild.shadow import DIFFERS, MISSING_IN_GENERATION, MISSING_IN_LIVE, IgnoredFields, compare_documents
from projector.parking import Park
from projector.planning import DecodedBatch
from projector.registry import registry_versions
from projector.settlement import BatchOutcome

IGNORE_NOTHING = IgnoredFields((), ("orders", "customers"))


def test_ignored_fields_apply_to_one_collection_or_to_every_one() -> None:
    ignored = IgnoredFields(
        ("updated_at", "orders.lines", "customers.order_stats.placed_orders"), ("orders", "customers")
    )
    assert ignored.ignores("orders", "updated_at") and ignored.ignores("customers", "updated_at")
    assert ignored.ignores("orders", "lines") and ignored.ignores("orders", "lines.0.quantity")
    assert not ignored.ignores("customers", "lines") and not ignored.ignores("orders", "lines_total")
    assert ignored.ignores("customers", "order_stats.placed_orders")
    assert not ignored.ignores("customers", "order_stats.draft_orders")
    # A first part that names no compared collection is a field path for every collection.
    assert IgnoredFields(("shipping_address.city",), ("orders",)).ignores("orders", "shipping_address.city")


def test_documents_compare_field_by_field_except_ignored_ones() -> None:
    live = {"_id": "o1", "version": 3, "status": "PLACED", "lines": [{"sku": "A", "quantity": 1}], "at": 1}
    same = dict(live)
    assert compare_documents("orders", "o1", live, same, IGNORE_NOTHING) is None

    changed = {**live, "lines": [{"sku": "A", "quantity": 2}], "extra": True}
    difference = compare_documents("orders", "o1", live, changed, IGNORE_NOTHING)
    assert difference is not None and difference.kind == DIFFERS
    assert [f.path for f in difference.fields] == ["extra", "lines.0.quantity"]
    assert not difference.versions_differ
    ignored = IgnoredFields(("orders.extra", "lines"), ("orders",))
    assert compare_documents("orders", "o1", live, changed, ignored) is None

    # True is not 1: a type change is a difference.
    assert compare_documents("orders", "o1", {"a": 1}, {"a": True}, IGNORE_NOTHING) is not None


def test_a_document_on_one_side_only_is_a_difference() -> None:
    doc = {"_id": "o1", "version": 2}
    missing = compare_documents("orders", "o1", doc, None, IGNORE_NOTHING)
    assert missing is not None and (missing.kind, missing.live_version, missing.generation_version) == (
        MISSING_IN_GENERATION, 2, None,
    )  # fmt: skip
    extra = compare_documents("orders", "o1", None, doc, IGNORE_NOTHING)
    assert extra is not None and extra.kind == MISSING_IN_LIVE and extra.versions_differ
    assert compare_documents("orders", "o1", None, None, IGNORE_NOTHING) is None


def test_an_outcome_with_parks_or_gaps_is_a_problem() -> None:
    assert problems(BatchOutcome(), DecodedBatch()) == []
    outcome = BatchOutcome(gaps=1, conflicts=1)
    outcome.parks["s1"] = Park("s1", "order", "gap", "waiting for version 1", 1)
    outcome.unsettled["s1"] = "waits behind a parked event"
    found = problems(outcome, DecodedBatch())
    assert len(found) == 4 and found[0].startswith("s1 parked at v1 (gap)")


def test_cursor_round_trips_through_its_document() -> None:
    cursor = Cursor(2**40 + 7, 12345)
    assert Cursor.from_document(cursor.to_document()) == cursor
    assert Cursor.from_document(None) == Cursor() < cursor
    assert Cursor(9, 100) < Cursor(10, 1)  # the transaction id first, as a number


def test_status_lists_generation_one_and_marks_the_active_one() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    docs = [
        {"_id": 2, "database": "cqrs_g2", "state": "compared", "position": 10, "events_applied": 10,
         "differences": 0, "updated_at": now},
        {"_id": "active", "generation": 1, "database": "cqrs"},
    ]  # fmt: skip
    rows = status_rows(docs, "cqrs")
    assert [(r["generation"], r["database"], r["state"], r["active"]) for r in rows] == [
        (1, "cqrs", "live", True), (2, "cqrs_g2", "compared", False),
    ]  # fmt: skip
    text = render_status(rows)
    assert "cqrs_g2" in text and "2026-01-01" in text
    assert database_name("cqrs", 1) == "cqrs" and database_name("cqrs", 3) == "cqrs_g3"


def test_eta_and_progress_line() -> None:
    assert eta_text(0, 100, 1.0) == "?"
    assert eta_text(50, 100, 10.0) == "0:10"
    assert eta_text(1, 7201, 1.0) == "2:00:00"
    assert eta_text(100, 100, 5.0) == "0:00"

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    stream = Tty()
    progress = RebuildProgress(True, stream)
    progress.start("rebuild g2", 1000)
    progress.advance(500)
    assert "rebuild g2" in stream.getvalue() and "events/s" in stream.getvalue() and "ETA" in stream.getvalue()
    assert not RebuildProgress(True, io.StringIO()).enabled  # not a terminal: nothing drawn


def test_the_cli_arguments_and_reports() -> None:
    args = build_parser().parse_args(
        ["rebuild", "--mongo-database", "db", "--ignore-field", "updated_at", "--ignore-field", "orders.x",
         "--sample", "5", "--generation", "3", "--batch-size", "100"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.mongo_database, config.ignore_fields, config.sample, config.generation, config.batch_size) == (
        "db", ("updated_at", "orders.x"), 5, 3, 100,
    )  # fmt: skip
    result = RebuildResult(2, "db_g2", "db", False, "compared", 100, 2.0, 100, 10)
    assert "every document is equal" in render_text(result)
    assert '"events_per_second": 50.0' in render_json(result, accepted=False)


def test_the_cutover_arguments_and_their_report() -> None:
    args = build_parser().parse_args(
        ["rebuild", "--if-needed", "--cutover", "--accept-differences", "--drop-retired-after", "24",
         "--writer-ttl", "9", "--switch-timeout", "30"]
    )  # fmt: skip
    config = config_from_args(args)
    assert (config.if_needed, config.cutover, config.accept_differences) == (True, True, True)
    assert (config.drop_retired_after_hours, config.writer_ttl_seconds, config.switch_timeout_seconds) == (24, 9, 30)
    result = RebuildResult(3, "db_g3", "db_g2", False, "active", 10, 1.0, 10, 5, skipped_collections=("orders",))
    result.cutover = CutoverResult(3, "db_g3", 2, "db_g2", writers=2, seconds=1.5, events_applied=7)
    result.dropped = [1]
    text = render_text(result)
    assert "not compared (changed projections): orders" in text
    assert "generation 3 (db_g3) is active; generation 2 (db_g2) is retired" in text
    assert "--activate 2" in text and "dropped retired generation(s) 1" in text
    report = render_json(result, accepted=False)
    assert '"previous_generation": 2' in report and '"dropped": [\n    1\n  ]' in report
    up_to_date = RebuildResult(2, "db_g2", "db_g2", False, up_to_date=True)
    assert "up to date" in render_text(up_to_date)


def test_changed_projections_are_those_whose_recorded_version_differs() -> None:
    built = {"orders": 1, "customers": 1, "customer_order_stats": 1}
    wanted = {"orders": 2, "customers": 1, "customer_order_stats": 1, "sales_report": 1}
    assert changed_components(built, wanted) == ["orders", "sales_report"]
    assert changed_components(wanted, wanted) == []
    # What a read model from before generations is recorded with: this release changes orders and adds views.
    assert "orders" in changed_components(LEGACY_VERSIONS, registry_versions())
    assert set(changed_components(LEGACY_VERSIONS, registry_versions())) - set(registry_versions()) == set()


def test_only_lost_write_races_are_retried_by_a_tailer() -> None:
    raced = BatchOutcome(conflicts=1, unsettled={"o1": "conflict"})
    assert only_conflicts(raced)
    assert not only_conflicts(BatchOutcome(conflicts=1, unsettled={"o1": "conflict", "o2": "gap"}))
    assert not only_conflicts(BatchOutcome())


def test_status_shows_the_states_of_a_switch() -> None:
    docs = [
        {"_id": 1, "database": "db", "state": "retired"},
        {"_id": 2, "database": "db_g2", "state": "active", "position": 9, "events_applied": 9},
        {"_id": 3, "database": "db_g3", "state": "dropped"},
        {"_id": "active", "generation": 2, "database": "db_g2"},
    ]
    rows = status_rows(docs, "db")
    assert [(r["generation"], r["state"], r["active"]) for r in rows] == [
        (1, "retired", False), (2, "active", True), (3, "dropped", False),
    ]  # fmt: skip
    assert "2*db_g2" in render_status(rows)
    assert "gave up" not in render_status(rows)


def test_status_says_how_out_of_a_switch_that_gave_up() -> None:
    docs = [
        {"_id": 1, "database": "db", "state": "active"},  # not retired: the switch away from it gave up
        {"_id": 2, "database": "db_g2", "state": "failed"},  # its tail failed after the switch
        {"_id": "active", "generation": 2, "database": "db_g2"},
    ]
    text = render_status(status_rows(docs, "db"))
    assert "2*db_g2" in text
    assert "gave up before it retired generation 1: `cqrs rebuild --activate 2` finishes it, `--activate 1`" in text


def test_progress_is_exported_as_metrics() -> None:
    metrics = RebuildMetrics(CollectorRegistry())
    progress = RebuildProgress(False, metrics=metrics)
    progress.start("rebuild g2", 1000)
    progress.advance(300)
    metrics.state(2, "building")
    sample = metrics.registry.get_sample_value
    assert sample("cqrs_rebuild_events_applied_total") == 300
    assert sample("cqrs_rebuild_events_remaining") == 700
    assert sample("cqrs_rebuild_generation") == 2
    assert sample("cqrs_rebuild_state", {"state": "building"}) == 1
    metrics.state(2, "active")
    assert sample("cqrs_rebuild_state", {"state": "building"}) == 0
    assert sample("cqrs_rebuild_state", {"state": "active"}) == 1


def test_a_difference_in_copied_fields_written_from_other_stream_states_is_in_flight() -> None:
    ignored = IgnoredFields((), ("customers",))
    live = {"_id": "c", "version": 1, "order_stats_version": 9, "order_stats": {"placed": 2}}
    behind = {"_id": "c", "version": 1, "order_stats_version": 7, "order_stats": {"placed": 1}}
    difference = compare_documents("customers", "c", live, behind, ignored)
    assert difference is not None and difference.versions_differ  # re-checked: one side is behind on the orders
    same_inputs = {**behind, "order_stats_version": 9}
    difference = compare_documents("customers", "c", live, same_inputs, ignored)
    assert difference is not None and not difference.versions_differ  # same inputs, different result: a real one


def test_only_differences_explained_by_the_live_side_lagging_are_live_behind() -> None:
    ignored = IgnoredFields((), ("customers",))
    generation = {"_id": "c", "version": 2, "order_stats_version": 9, "order_stats": {"placed": 2}}
    lagging = {"_id": "c", "version": 1, "order_stats_version": 7, "order_stats": {"placed": 1}}
    difference = compare_documents("customers", "c", lagging, generation, ignored)
    assert difference is not None and difference.live_behind
    ahead_on_one = {**lagging, "version": 3}  # the generation is behind on its own stream
    difference = compare_documents("customers", "c", ahead_on_one, generation, ignored)
    assert difference is not None and not difference.live_behind
    difference = compare_documents("customers", "c", None, generation, ignored)
    assert difference is not None and difference.live_behind
    difference = compare_documents("customers", "c", lagging, None, ignored)
    assert difference is not None and not difference.live_behind


class _PassesOf:
    """A tailer whose passes apply the given numbers of events, in order (the catch-up only counts them)."""

    def __init__(self, *passes: int) -> None:
        self.applied, self.passes, self._left = 0, 0, list(passes)

    async def drain(self) -> None:
        self.passes += 1
        self.applied += self._left.pop(0)


async def test_the_catch_up_before_a_switch_stops_at_a_pass_that_finds_nothing_or_does_not_halve_the_last() -> None:
    """Under a load close to what the generation can take, each pass is a little shorter than the one before: the
    switch would be held for minutes (a soak's rebuild timed out so). The rest is the tailer's during the switch."""
    for passes, expected in [
        ((2329, 6, 0), 3),  # caught up
        ((12000, 11000, 10000, 9000), 2),  # barely shrinking: one more pass proves it, then switch
        ((12000, 6000, 3100), 3),
        ((12000, 6000, 3000, 1500, 750, 300), MAX_PASSES_BEFORE_THE_SWITCH),
    ]:
        tailer = _PassesOf(*passes)
        await _caught_up(tailer)  # type: ignore[arg-type]
        assert tailer.passes == expected, passes
