"""Which sampled event says the live read model is behind (`cqrsctl.rebuild.live_lag.oldest_unapplied`)."""

from __future__ import annotations

from cqrsctl.rebuild.live_lag import RecentEvent, oldest_unapplied
from projector.parking import Park, StreamState

EVENTS = [RecentEvent("a", 3, 12.0), RecentEvent("b", 1, 15.0), RecentEvent("c", 7, 11.0)]


def test_covered_events_say_nothing() -> None:
    states = {"a": StreamState(3, None), "b": StreamState(4, None), "c": StreamState(7, None)}
    assert oldest_unapplied(EVENTS, states) is None
    assert oldest_unapplied([], {}) is None


def test_the_oldest_event_above_its_checkpoint_is_the_one_reported() -> None:
    states = {"a": StreamState(2, None), "b": StreamState(1, None), "c": StreamState(6, None)}
    assert oldest_unapplied(EVENTS, states) == RecentEvent("a", 3, 12.0)


def test_a_stream_the_live_side_never_saw_is_behind() -> None:
    states = {"a": StreamState(3, None), "c": StreamState(7, None)}
    assert oldest_unapplied(EVENTS, states) == RecentEvent("b", 1, 15.0)


def test_a_parked_stream_waits_by_design_and_does_not_hold_the_rebuild() -> None:
    park = Park("b", "order", "poison", "cannot apply", 1)
    states = {"a": StreamState(3, None), "b": StreamState(0, park), "c": StreamState(6, None)}
    assert oldest_unapplied(EVENTS, states) == RecentEvent("c", 7, 11.0)
