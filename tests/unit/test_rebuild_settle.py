"""How `cqrs rebuild` settles differences that lag could explain (`cqrsctl.rebuild._settle`): the documents each
re-check finds are scripted round by round; the rules decide when to poll, catch up, and stop."""

from __future__ import annotations

import time
from typing import Any

from cqrsctl.rebuild import _settle
from cqrsctl.rebuild.shadow import ComparisonResult, IgnoredFields, compare_documents

Doc = dict[str, Any]
IGNORED = IgnoredFields((), ["customers"])


class ScriptedComparer:
    """Answers each re-check with the next (live, generation) pair of the customer document."""

    def __init__(self, rounds: list[tuple[Doc, Doc]]) -> None:
        self.rounds = rounds
        self.checks = 0

    async def by_ids(self, collection: str, ids: list[str], out: ComparisonResult) -> None:
        live, generation = self.rounds[min(self.checks, len(self.rounds) - 1)]
        self.checks += 1
        difference = compare_documents(collection, ids[0], live, generation, IGNORED)
        if difference is not None:
            out.differences.append(difference)


class CatchUps:
    def __init__(self) -> None:
        self.count = 0

    async def __call__(self) -> None:
        self.count += 1


def stats(total: int, stamp: int) -> Doc:
    return {"_id": "c1", "version": 1, "order_stats_version": stamp, "placed_total_minor": total}


async def settle(rounds: list[tuple[Doc, Doc]], seconds: float = 5.0) -> tuple[list[Any], ScriptedComparer, int]:
    comparer, catch_ups = ScriptedComparer(rounds[1:]), CatchUps()
    first = compare_documents("customers", "c1", *rounds[0], IGNORED)
    assert first is not None
    left = await _settle(comparer, [first], catch_ups, seconds)  # type: ignore[arg-type]
    return left, comparer, catch_ups.count


async def test_statistics_whose_stamps_match_by_chance_are_rechecked_while_they_change_until_equal() -> None:
    # Equal stamps (sums of order versions) but different totals: the sides reflect different events.
    left, comparer, _ = await settle([
        (stats(84_000, 40), stats(87_000, 40)),
        (stats(85_000, 41), stats(87_000, 41)),  # still moving
        (stats(86_000, 42), stats(87_000, 43)),
        (stats(87_000, 43), stats(87_000, 43)),  # equal: settled
    ])  # fmt: skip
    assert left == [] and comparer.checks == 3


async def test_a_difference_that_stays_put_at_the_same_version_is_reported_after_one_recheck() -> None:
    started = time.monotonic()
    left, comparer, _ = await settle([(stats(84_000, 40), stats(87_000, 40))] * 2)
    assert len(left) == 1 and comparer.checks == 1
    assert time.monotonic() - started < 2.0  # not the whole settle time


async def test_a_live_side_behind_is_polled_briefly_and_the_generation_is_not_caught_up_meanwhile() -> None:
    behind = [(stats(80_000 + n, 40 + n), stats(87_000, 47)) for n in range(7)]
    started = time.monotonic()
    left, comparer, catch_ups = await settle([*behind, (stats(87_000, 47), stats(87_000, 47))])
    assert left == [] and comparer.checks == 7 and catch_ups == 0
    assert time.monotonic() - started < 1.5  # 50 ms polls, not half-second pauses


async def test_differences_that_never_settle_are_reported_when_the_settle_time_is_up() -> None:
    moving = [(stats(80_000 + n, 40 + n), stats(90_000 + n, 40 + n)) for n in range(1000)]
    started = time.monotonic()
    left, _, catch_ups = await settle(moving, seconds=1.2)
    assert len(left) == 1 and catch_ups >= 1
    assert 1.2 <= time.monotonic() - started < 3.0
