"""`cqrs load` open-loop schedule, the split between workers and the order pool."""

from __future__ import annotations

import itertools
import random

import pytest

from cqrsctl.load.config import LoadConfig
from cqrsctl.load.pool import MAX_LINES, OrderPool, Status
from cqrsctl.load.runner import make_specs
from cqrsctl.load.schedule import ArrivalSchedule, split_evenly


def test_arrivals_are_at_fixed_intervals_from_the_start() -> None:
    schedule = ArrivalSchedule(start=100.0, rate=50.0)
    assert [schedule.intended(i) for i in range(3)] == pytest.approx([100.0, 100.02, 100.04])
    assert schedule.due(99.9) == 0
    assert schedule.due(100.0) == 1
    assert schedule.due(100.03) == 2
    assert schedule.count_within(2.0) == 100


def test_workers_interleave_into_one_even_schedule() -> None:
    rate, workers = 90.0, 3
    times = sorted(
        ArrivalSchedule(0.0, rate / workers, phase=w / workers).intended(i) for w in range(workers) for i in range(30)
    )
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps == pytest.approx([1 / rate] * len(gaps))
    assert sum(ArrivalSchedule(0.0, rate / workers, w / workers).count_within(1.0) for w in range(workers)) == 90


def test_split_evenly() -> None:
    assert split_evenly(10, 3) == [4, 3, 3]
    assert split_evenly(2, 4) == [1, 1, 0, 0]
    assert sum(split_evenly(1_000_003, 7)) == 1_000_003


def test_specs_share_rate_callers_and_requests() -> None:
    specs = make_specs(LoadConfig(mode="open", rate=100, max_requests=101, workers=2, seed=1), ("c1",))
    assert [s.rate for s in specs] == [50.0, 50.0]
    assert [s.phase for s in specs] == [0.0, 0.5]
    assert [s.max_requests for s in specs] == [51, 50]
    closed = make_specs(LoadConfig(concurrency=5, duration=1, workers=2, seed=1), ("c1",))
    assert [s.concurrency for s in closed] == [3, 2]
    assert [s.worker_id for s in closed] == [0, 1]
    assert len({s.seed for s in closed}) == 2


def test_pool_hands_out_orders_only_in_a_state_that_accepts_the_command() -> None:
    pool = OrderPool(capacity=10, rng=random.Random(7))
    assert pool.take("add") is None
    pool.add_new("o1", "c1", version=1, now=0.0)
    assert pool.take("place") is None  # no lines yet
    order = pool.take("add")
    assert order is not None and order.busy
    assert pool.take("add") is None  # busy orders are not handed out twice
    order.skus.append(order.next_sku())
    pool.release(order)
    placed = pool.take("place")
    assert placed is order
    placed.status = Status.PLACED
    pool.release(placed)
    assert pool.take("add") is None and pool.take("change") is None
    cancelled = pool.take("cancel")
    assert cancelled is order
    cancelled.status = Status.CANCELLED
    pool.release(cancelled)
    assert pool.take("cancel") is None
    assert pool.pick_for_read(now=5.0) == "o1"  # still readable


def test_full_drafts_take_no_more_lines() -> None:
    pool = OrderPool(capacity=10, rng=random.Random(1))
    pool.add_new("o1", "c1", version=1, now=0.0)
    order = pool.take("add")
    assert order is not None
    order.skus = [f"S{i}" for i in range(MAX_LINES)]
    pool.release(order)
    assert pool.take("add") is None
    assert pool.take("change") is order


def test_pool_is_capped_and_evicts_the_oldest() -> None:
    pool = OrderPool(capacity=3, rng=random.Random(1))
    for i in range(10):
        pool.add_new(f"o{i}", "c", version=1, now=float(i))
    assert len(pool) == 3 and pool.evicted == 7
    assert {pool.pick_for_read(now=100.0) for _ in range(50)} == {"o7", "o8", "o9"}


def test_an_order_evicted_or_rejected_while_busy_leaves_the_pool() -> None:
    pool = OrderPool(capacity=1, rng=random.Random(1))
    pool.add_new("o1", "c", version=1, now=0.0)
    busy = pool.take("cancel")
    assert busy is not None
    pool.add_new("o2", "c", version=1, now=0.0)  # evicts o1 while its command is in flight
    pool.release(busy)
    assert pool.pick_for_read(now=9.0) == "o2"
    other = pool.take("cancel")
    assert other is not None
    pool.release(other, keep=False)  # e.g. FAILED_PRECONDITION: our idea of it was wrong
    assert len(pool) == 0 and pool.pick_for_read(now=9.0) is None


def test_pool_fifo_does_not_grow_with_dropped_orders() -> None:
    pool = OrderPool(capacity=5, rng=random.Random(1))
    for i in range(1000):
        pool.add_new(f"o{i}", "c", version=1, now=0.0)
        order = pool.take("cancel")
        assert order is not None
        pool.release(order, keep=False)
    assert len(pool._fifo) <= 2 * pool.capacity + 1


def test_reads_prefer_aged_orders_else_the_oldest() -> None:
    pool = OrderPool(capacity=10, rng=random.Random(3))
    pool.add_new("old", "c", version=1, now=0.0)
    pool.add_new("young", "c", version=1, now=9.9)
    assert {pool.pick_for_read(now=10.0) for _ in range(20)} == {"old"}
    order = pool.take("cancel")
    assert order is not None
    pool.release(order, keep=False)
    assert pool.pick_for_read(now=10.0) == ("young" if order.order_id == "old" else "old")
