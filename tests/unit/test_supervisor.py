"""Supervised background tasks: restart after a failure or an unexpected return, health while down, bounded stop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from core.supervisor import Supervisor, all_unless_one_fails, first_to_finish
from tests.support import eventually


async def test_a_failing_task_is_logged_with_its_traceback_and_restarted(caplog: pytest.LogCaptureFixture) -> None:
    runs: list[int] = []
    health: list[bool] = []

    async def flaky() -> None:
        runs.append(1)
        if len(runs) < 3:
            raise RuntimeError(f"boom {len(runs)}")
        await asyncio.Event().wait()  # the third run stays up

    async def on_health(healthy: bool) -> None:
        health.append(healthy)

    supervisor = Supervisor("test", on_health_change=on_health, base_backoff=0.01, max_backoff=0.02)
    with caplog.at_level(logging.ERROR, logger="core.supervisor"):
        supervisor.start("flaky", flaky)
        await eventually(lambda: _true(len(runs) == 3), what="the third run of the task")
    await eventually(lambda: _true(supervisor.healthy), what="the supervisor healthy again")
    assert supervisor.restarts("flaky") == 2
    failures = [r for r in caplog.records if "background task flaky failed" in r.getMessage()]
    assert len(failures) == 2 and all(r.exc_info is not None for r in failures)  # traceback included
    assert health[0] is True and False in health and health[-1] is True  # down while waiting to restart
    await supervisor.stop(timeout=1)


async def test_a_task_that_returns_while_running_is_restarted() -> None:
    runs: list[int] = []

    async def returns_at_once() -> None:
        runs.append(1)

    supervisor = Supervisor("test", base_backoff=0.01, max_backoff=0.01)
    supervisor.start("short", returns_at_once)
    await eventually(lambda: _true(len(runs) >= 3), what="three runs of a task that keeps returning")
    await supervisor.stop(timeout=1)
    count = len(runs)
    await asyncio.sleep(0.05)
    assert len(runs) == count  # nothing restarts after stop


async def test_non_essential_tasks_do_not_affect_health() -> None:
    async def fails() -> None:
        raise ValueError("metrics exporter broke")

    supervisor = Supervisor("test", base_backoff=0.5, max_backoff=0.5)
    supervisor.start("metrics", fails, essential=False)
    await eventually(lambda: _true(supervisor.restarts("metrics") >= 1), what="a restart")
    assert supervisor.healthy and supervisor.down_tasks() == []
    await supervisor.stop(timeout=1)


async def test_stop_drains_then_cancels_and_never_hangs() -> None:
    drained = asyncio.Event()
    stop_signal = asyncio.Event()

    async def drains() -> None:
        await stop_signal.wait()
        drained.set()

    release = asyncio.Event()

    async def ignores_cancellation() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(0.02)
            except asyncio.CancelledError:
                continue  # a badly behaved loop: stop() must still return

    supervisor = Supervisor("test")
    supervisor.start("relay", drains)
    supervisor.start("stubborn", ignores_cancellation)
    await asyncio.sleep(0)
    stop_signal.set()
    loop = asyncio.get_running_loop()
    started = loop.time()
    await supervisor.stop(timeout=0.2, drain=("relay",), drain_timeout=1.0)
    assert drained.is_set()
    assert loop.time() - started < 1.0
    release.set()  # let the stubborn loop end, so that it does not outlive the test
    await asyncio.sleep(0.1)


async def _forever(cancelled: asyncio.Event) -> None:
    """Runs until cancelled, then says so."""
    try:
        await asyncio.Event().wait()
    finally:
        cancelled.set()


async def _fails_soon(error: Exception) -> None:
    await asyncio.sleep(0.01)
    raise error


async def test_first_to_finish_cancels_the_rest_and_raises_the_first_error() -> None:
    cancelled = asyncio.Event()
    with pytest.raises(ConnectionError, match="lease gone"):
        await first_to_finish(_forever(cancelled), _fails_soon(ConnectionError("lease gone")))
    assert cancelled.is_set()


async def test_all_unless_one_fails_waits_for_every_one_and_a_failure_stops_the_others() -> None:
    finished: list[str] = []
    cancelled = asyncio.Event()

    async def after(seconds: float, name: str) -> None:
        await asyncio.sleep(seconds)
        finished.append(name)

    await all_unless_one_fails(after(0.02, "slow"), after(0.01, "fast"))
    assert finished == ["fast", "slow"]

    # A partition's other source, fetching, beside one whose loop hits a bug.
    with pytest.raises(RuntimeError, match="a bug"):
        await all_unless_one_fails(_forever(cancelled), _fails_soon(RuntimeError("a bug in one source's loop")))
    assert cancelled.is_set(), "the other source was left running"


async def _true(value: bool) -> bool:
    return value
