"""A failure every request repeats is logged once per window per kind, with how many were left out."""

from __future__ import annotations

import logging

import pytest

from core import log_throttle
from core.log_throttle import LogThrottle

log = logging.getLogger("tests.log_throttle")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == log.name]


def test_the_first_line_of_a_kind_goes_out_at_once_and_its_repeats_once_a_window_with_their_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=log.name)
    clock = Clock()
    throttle = LogThrottle(window_seconds=10.0, clock=clock)

    for n in range(5):
        throttle.log(log, logging.WARNING, ("GetOrder", "MongoDB"), "GetOrder: MongoDB is unavailable: try %d", n)
        clock.now += 1.0
    assert lines(caplog) == ["GetOrder: MongoDB is unavailable: try 0"]

    clock.now = 110.0  # a window after the first line
    throttle.log(log, logging.WARNING, ("GetOrder", "MongoDB"), "GetOrder: MongoDB is unavailable: try %d", 5)
    assert lines(caplog)[-1] == "GetOrder: MongoDB is unavailable: try 5 (and 4 more like it since the last one logged)"

    clock.now = 119.9  # still within the window of that line
    throttle.log(log, logging.WARNING, ("GetOrder", "MongoDB"), "GetOrder: MongoDB is unavailable: try %d", 6)
    assert len(lines(caplog)) == 2
    clock.now = 200.0
    throttle.log(log, logging.WARNING, ("GetOrder", "MongoDB"), "GetOrder: MongoDB is unavailable: try %d", 7)
    assert lines(caplog)[-1] == "GetOrder: MongoDB is unavailable: try 7 (and 1 more like it since the last one logged)"
    assert [r.levelno for r in caplog.records if r.name == log.name] == [logging.WARNING] * 3


def test_kinds_are_limited_apart_and_a_disabled_level_counts_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=log.name)
    clock = Clock()
    throttle = LogThrottle(window_seconds=10.0, clock=clock)

    throttle.log(log, logging.WARNING, ("GetOrder", "MongoDB"), "get down")
    throttle.log(log, logging.WARNING, ("ListOrders", "MongoDB"), "list down")
    throttle.log(log, logging.INFO, ("GetOrder", "behind"), "get behind")  # INFO is off: neither logged nor counted
    throttle.log(log, logging.WARNING, ("GetOrder", "MongoDB"), "get down")
    assert lines(caplog) == ["get down", "list down"]

    caplog.set_level(logging.INFO, logger=log.name)
    throttle.log(log, logging.INFO, ("GetOrder", "behind"), "get behind")
    assert lines(caplog)[-1] == "get behind"  # no count: the disabled calls were not left out, they were off


def test_clear_forgets_every_kind_and_the_kinds_kept_are_bounded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger=log.name)
    throttle = LogThrottle(window_seconds=10.0, clock=Clock())
    throttle.log(log, logging.WARNING, "a", "a")
    throttle.log(log, logging.WARNING, "a", "a")
    throttle.clear()
    throttle.log(log, logging.WARNING, "a", "a")
    assert lines(caplog) == ["a", "a"]

    for n in range(log_throttle.MAX_KINDS + 1):
        throttle.log(log, logging.WARNING, n, "kind %d", n)
    assert len(throttle._kinds) <= log_throttle.MAX_KINDS
