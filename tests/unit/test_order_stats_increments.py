"""Order statistics by increment (`projector.order_stats.incremented_stats`) against a recompute from scratch,
and which keys a batch may increment (`projector.view_planning.view_steps`). Pure: no servers."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from core.mongo_ids import IDS_PER_QUERY
from core.projections import Document, Projection
from core.projections.orders import ORDERS
from projector.mongo_writer import Change
from projector.order_stats import (
    ORDERS_PER_AGGREGATION,
    counted_orders,
    incremented_stats,
    order_stats_from_groups,
    stats_chunks,
    version_step,
)
from projector.planning import FoldResult, ProjectionBatch
from projector.registry import CUSTOMER_ORDER_STATS
from projector.view_planning import ViewPlan, view_steps

STATUSES = ("DRAFT", "PLACED", "CANCELLED")


def order(version: int, status: str, currency: str = "EUR", total: int = 0, deleted: bool = False) -> Document:
    return {"version": version, "status": status, "currency": currency, "total_minor": total, "deleted": deleted}


def recomputed(orders: dict[str, Document]) -> dict[str, Any]:
    """What the recompute stores for these orders: `$group` rows as the aggregation returns them."""
    groups: dict[tuple[str, str, bool], list[int]] = {}
    for doc in orders.values():
        key = (str(doc["status"]), str(doc["currency"]), bool(doc["deleted"]))
        group = groups.setdefault(key, [0, 0, 0])
        group[0] += 1
        group[1] += int(doc["total_minor"])
        group[2] += int(doc["version"])
    rows = [
        {
            "_id": {"customer_id": "c", "status": s, "currency": c, "deleted": d},
            "orders": n,
            "total_minor": total,
            "versions": versions,
        }
        for (s, c, d), (n, total, versions) in groups.items()
    ]
    return order_stats_from_groups(["c"], rows)["c"].stats


order_states = st.builds(
    order,
    version=st.integers(1, 50),
    status=st.sampled_from(STATUSES),
    currency=st.sampled_from(("EUR", "USD")),
    total=st.integers(0, 5) | st.integers(0, 10_000),
    deleted=st.booleans(),
)


@given(
    start=st.dictionaries(st.sampled_from("abcdef"), order_states, max_size=6),
    batches=st.lists(st.dictionaries(st.sampled_from("abcdefgh"), order_states, min_size=1, max_size=3), max_size=6),
)
def test_increments_equal_a_recompute_or_decline(
    start: dict[str, Document], batches: list[dict[str, Document]]
) -> None:
    """Any sequence of batches (orders created, changed, deleted): each increment either equals the recompute of
    the orders as they now are, or declines (None) because a currency it touched ends at a total of zero or less,
    where only a recompute can tell whether placed orders remain."""
    orders = dict(start)
    stats = recomputed(orders)
    for batch in batches:
        steps = [(orders.get(oid), doc) for oid, doc in batch.items()]
        orders.update(batch)
        expected = recomputed(orders)
        result = incremented_stats(stats, steps)
        touched = {
            str(doc["currency"])
            for pair in steps
            for doc in pair
            if doc is not None and doc["status"] == "PLACED" and not doc["deleted"]
        }
        totals = {t["currency"]: t["total_minor"] for t in expected["placed_totals"]}
        if result is None:
            assert any(totals.get(currency, 0) <= 0 for currency in touched)
            stats = expected  # the writer recomputes
        else:
            assert result == expected
            stats = result


def test_a_placement_moves_one_draft_to_placed_and_adds_its_total() -> None:
    stats = {"draft_orders": 2, "placed_orders": 0, "cancelled_orders": 0, "placed_totals": []}
    steps = [(order(3, "DRAFT", total=700), order(4, "PLACED", total=700)), (None, order(1, "DRAFT"))]
    assert incremented_stats(stats, steps) == {
        "draft_orders": 2,
        "placed_orders": 1,
        "cancelled_orders": 0,
        "placed_totals": [{"currency": "EUR", "total_minor": 700}],
    }
    assert version_step(steps) == 1 + 1


def test_a_cancellation_that_empties_a_currency_declines() -> None:
    stats = {
        "draft_orders": 0,
        "placed_orders": 1,
        "cancelled_orders": 0,
        "placed_totals": [{"currency": "EUR", "total_minor": 700}],
    }
    assert incremented_stats(stats, [(order(4, "PLACED", total=700), order(5, "CANCELLED", total=700))]) is None


def test_counts_that_would_go_below_zero_decline() -> None:
    empty = {"draft_orders": 0, "placed_orders": 0, "cancelled_orders": 0, "placed_totals": []}
    assert incremented_stats(empty, [(order(1, "DRAFT"), order(2, "DRAFT", deleted=True))]) is None


# ---- which keys a batch may increment ------------------------------------------------------------------------


def batch_of(projection: Projection, loaded: dict[str, Document], written: dict[str, Document]) -> ProjectionBatch:
    result = FoldResult()
    for sid, doc in written.items():
        before = loaded.get(sid)
        result.changes.append(Change(sid, None if before is None else int(before["version"]), doc))
        result.applied[sid] = []
    return ProjectionBatch(projection, {}, dict(loaded), result)


def test_view_steps_only_for_keys_whose_every_stream_was_written_from_its_checkpoint() -> None:
    stats = CUSTOMER_ORDER_STATS.name
    loaded = {"o1": order(3, "DRAFT"), "o2": order(2, "DRAFT"), "o3": order(5, "DRAFT"), "o5": order(2, "DRAFT")}
    written = {sid: order(int(doc["version"]) + 1, "PLACED") for sid, doc in loaded.items()}
    written["o4"] = order(1, "DRAFT")
    batch = batch_of(ORDERS, loaded, written)
    batch.outcome.conflicts.add("o5")  # another writer got there first: its step is not ours to count
    plan = ViewPlan()
    for sid, key in {"o1": "c1", "o4": "c1", "o2": "c2", "o3": "c3", "o5": "c5", "o6": "c6"}.items():
        plan.needs(sid, stats, key)
    plan.needs("o1", "other_view", "c9")
    checkpoints = {"o1": 3, "o2": 1, "o3": 5, "o5": 2}  # o2 is ahead of its checkpoint: its views are owed
    steps = view_steps(plan, stats, [batch], checkpoints, resuming={"o3"}, behind={"o2"})
    assert steps == {"c1": [(loaded["o1"], written["o1"]), (None, written["o4"])]}
    # Ahead of its checkpoint only by events the statistics ignore (not behind on them): stepped from the document.
    steps = view_steps(plan, stats, [batch], checkpoints, resuming={"o3"}, behind=set())
    assert steps == {
        "c1": [(loaded["o1"], written["o1"]), (None, written["o4"])],
        "c2": [(loaded["o2"], written["o2"])],
    }


def test_a_recompute_reads_a_bounded_number_of_orders_per_aggregation() -> None:
    big, small = ORDERS_PER_AGGREGATION, ORDERS_PER_AGGREGATION // 4
    sizes = {"a": small, "b": small, "c": big, "d": 3 * big, "e": small}
    # Packed in order while they fit; a customer bigger than the bound is read on its own (never split).
    assert stats_chunks(["e", "d", "c", "b", "a", "a"], sizes) == [["a", "b"], ["c"], ["d"], ["e"]]
    # Customers of unknown size (no statistics yet) count for nothing, up to IDS_PER_QUERY ids a call.
    many = [f"n{i:03}" for i in range(IDS_PER_QUERY + 1)]
    assert [len(chunk) for chunk in stats_chunks(many, {})] == [IDS_PER_QUERY, 1]
    assert stats_chunks([], sizes) == []
    stats = {"draft_orders": 2, "placed_orders": 5, "cancelled_orders": 1, "placed_totals": []}
    assert (counted_orders(stats), counted_orders(None)) == (8, 0)
