"""`cqrs rebuild`'s settle loop: differences that keep moving get more time (within a cap); a stuck one does not.

Pure loop logic: the comparer is a stand-in that answers each round from a script (no database)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import cast

import pytest

import cqrsctl.rebuild as rebuild
from cqrsctl.rebuild.shadow import DIFFERS, ComparisonResult, Difference, ShadowComparer
from cqrsctl.verify.model import FieldDiff

SETTLE = 0.2  # seconds without movement before giving up
PAUSE = 0.02  # between rounds


def stats_behind(live_count: int) -> Difference:
    """A customer whose live order statistics lag the generation's (the projector has not caught up yet)."""
    return Difference("customers", "c-1", DIFFERS, (FieldDiff("order_stats.placed", live_count, 10),), 1, 1, True, True)


class Scripted:
    """Answers round n with `script(n)` (None: no difference left)."""

    def __init__(self, script: Callable[[int], Difference | None]) -> None:
        self.script = script
        self.rounds = 0

    async def by_ids(self, collection: str, ids: list[str], out: ComparisonResult) -> None:
        self.rounds += 1
        difference = self.script(self.rounds)
        if difference is not None:
            out.differences.append(difference)


async def settle(comparer: Scripted) -> tuple[list[Difference], float]:
    async def catch_up() -> None:
        return None

    started = time.monotonic()
    left = await rebuild._settle(cast(ShadowComparer, comparer), [stats_behind(0)], catch_up, SETTLE)
    return left, time.monotonic() - started


@pytest.fixture(autouse=True)
def short_pause(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rebuild, "SETTLE_PAUSE_SECONDS", PAUSE)


async def test_a_live_side_that_keeps_catching_up_gets_more_than_one_window() -> None:
    rounds_to_converge = int(3 * SETTLE / PAUSE)  # far more rounds than fit in one window
    comparer = Scripted(lambda n: stats_behind(n) if n < rounds_to_converge else None)
    left, elapsed = await settle(comparer)
    assert left == [] and comparer.rounds == rounds_to_converge
    assert elapsed > SETTLE


async def test_a_difference_that_does_not_move_fails_after_one_window() -> None:
    comparer = Scripted(lambda n: stats_behind(3))  # stuck: the same difference every round
    left, elapsed = await settle(comparer)
    assert left == [stats_behind(3)]
    assert SETTLE <= elapsed < 2 * SETTLE + 0.5


async def test_a_difference_that_moves_forever_stops_at_the_cap() -> None:
    comparer = Scripted(lambda n: stats_behind(n))
    left, elapsed = await settle(comparer)
    assert len(left) == 1
    cap = SETTLE * rebuild.SETTLE_PROGRESS_ROUNDS
    assert cap <= elapsed < cap + 0.5
