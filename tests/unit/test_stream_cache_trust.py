"""When the command side's stream cache stops and starts answering (`StaleRatio`): pure arithmetic, no I/O."""

from __future__ import annotations

import pytest

from command_service.stream_cache import DISTRUST_ABOVE, PROBE_EVERY, TRUST_BELOW, StaleRatio


def run(trust: StaleRatio, decisions: int, stale_every: int | None) -> None:
    """`decisions` cached decisions, every `stale_every`-th of them stale (None: none)."""
    for n in range(1, decisions + 1):
        trust.decided()
        if stale_every is not None and n % stale_every == 0:
            trust.stale()


def test_a_cache_whose_decisions_go_stale_stops_being_trusted() -> None:
    trust = StaleRatio()
    run(trust, 200, stale_every=1)  # round robin over two replicas: every decision stale
    assert not trust.trusted and trust.ratio > DISTRUST_ABOVE


@pytest.mark.parametrize("stale_every", [None, 20, 10])
def test_a_few_stale_decisions_keep_it_trusted(stale_every: int | None) -> None:
    trust = StaleRatio()
    run(trust, 2000, stale_every)
    assert trust.trusted


def test_while_distrusted_only_every_probe_read_is_answered_from_the_cache() -> None:
    trust = StaleRatio()
    run(trust, 100, stale_every=1)
    answered = [trust.answers() for _ in range(10 * PROBE_EVERY)]
    assert sum(answered) == 10 and answered[PROBE_EVERY - 1]


def test_trust_returns_once_the_probes_find_the_cache_current_with_hysteresis_between() -> None:
    trust = StaleRatio()
    run(trust, 100, stale_every=1)
    assert not trust.trusted
    while trust.ratio >= DISTRUST_ABOVE:  # between the thresholds: still distrusted
        assert not trust.decided() and not trust.trusted
    while not trust.trusted:
        changed = trust.decided()
    assert changed and trust.ratio < TRUST_BELOW
    assert trust.stale() is False  # one stale decision does not take it away again
