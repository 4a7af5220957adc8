"""Supervised background tasks: an unexpected end is logged with its traceback and the task restarts with backoff.

A background loop (the outbox relay, a health probe, the consistency waiter, a projector loop) that dies silently
is the worst failure a service can have: every RPC still answers, health still says SERVING, and the work it did
simply stops. So no service starts a long-lived task with a bare `asyncio.create_task`; it asks a `Supervisor`:

* the task's coroutine is made afresh by a factory on every (re)start;
* an exception, or a return while the supervisor is not stopping, is logged (with the traceback) and the task is
  restarted after a jittered exponential backoff (reset once a run has lasted `stable_after` seconds);
* while an *essential* task is down (between its failure and its restart), `healthy` is False and the
  `on_health_change` callback is told, so the process reports NOT_SERVING;
* `stop()` cancels everything and waits a bounded time: shutdown never hangs on a stuck loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from core.backoff import full_jitter

log = logging.getLogger(__name__)

TaskFactory = Callable[[], Awaitable[None]]
HealthCallback = Callable[[bool], Awaitable[None]]


@dataclass(slots=True)
class _Supervised:
    name: str
    factory: TaskFactory
    essential: bool
    task: asyncio.Task[None] | None = None
    up: bool = True
    restarts: int = 0
    last_error: str | None = None
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    """Owns a process's background tasks (see the module docstring)."""

    def __init__(
        self,
        component: str,
        *,
        on_health_change: HealthCallback | None = None,
        base_backoff: float = 0.2,
        max_backoff: float = 10.0,
        stable_after: float = 30.0,
    ) -> None:
        self._component = component
        self._on_health_change = on_health_change
        self._base_backoff = base_backoff
        self._max_backoff = max_backoff
        self._stable_after = stable_after
        self._tasks: dict[str, _Supervised] = {}
        self._stopping = asyncio.Event()
        self._reported_healthy: bool | None = None

    @property
    def healthy(self) -> bool:
        """True while every essential task is running (not waiting to be restarted)."""
        return all(s.up for s in self._tasks.values() if s.essential)

    def restarts(self, name: str) -> int:
        """How many times the named task was restarted after an unexpected end."""
        return self._tasks[name].restarts

    def is_up(self, name: str) -> bool:
        return self._tasks[name].up

    def down_tasks(self) -> list[str]:
        """Names of the essential tasks that are down right now (for health messages and logs)."""
        return [s.name for s in self._tasks.values() if s.essential and not s.up]

    def start(self, name: str, factory: TaskFactory, *, essential: bool = True) -> None:
        """Runs `factory()` under supervision until `stop()`; names are unique within a supervisor."""
        if name in self._tasks:
            raise ValueError(f"a task named {name!r} is already supervised")
        supervised = _Supervised(name, factory, essential)
        self._tasks[name] = supervised
        supervised.task = asyncio.create_task(self._keep_running(supervised), name=f"supervise-{name}")

    async def stop(self, timeout: float = 10.0, *, drain: Sequence[str] = (), drain_timeout: float = 0.0) -> None:
        """Stops restarting; lets the `drain` tasks end by themselves for up to `drain_timeout` seconds (they
        watch their own stop signal, e.g. the relay finishing its pass), then cancels every task and waits at most
        `timeout` seconds for them. Idempotent; never hangs."""
        self._stopping.set()
        draining = [s.task for name, s in self._tasks.items() if name in drain and s.task is not None]
        if draining and drain_timeout > 0:
            _, late = await asyncio.wait(draining, timeout=drain_timeout)
            for task in late:
                log.warning(
                    "%s: %s did not finish within %.1fs; cancelling it", self._component, task.get_name(), drain_timeout
                )
        tasks = [s.task for s in self._tasks.values() if s.task is not None and not s.task.done()]
        for task in tasks:
            task.cancel()
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.error("%s: background task %s did not stop within %.0fs", self._component, task.get_name(), timeout)

    async def _keep_running(self, supervised: _Supervised) -> None:
        failures = 0
        while not self._stopping.is_set():
            supervised.started_at = time.monotonic()
            await self._set_up(supervised, True)
            try:
                await supervised.factory()
            except asyncio.CancelledError:
                if self._stopping.is_set():
                    return
                # Cancelled by something other than stop(): that is an unexpected end too. Swallowing the
                # cancellation is safe here because our own task is only ever cancelled by stop().
                supervised.last_error = "cancelled"
                log.error("%s: background task %s was cancelled; restarting it", self._component, supervised.name)
            except Exception as exc:
                supervised.last_error = repr(exc)
                log.exception("%s: background task %s failed; restarting it", self._component, supervised.name)
            else:
                if self._stopping.is_set():
                    return
                supervised.last_error = "returned"
                log.error("%s: background task %s ended unexpectedly; restarting it", self._component, supervised.name)
            if time.monotonic() - supervised.started_at >= self._stable_after:
                failures = 0
            failures += 1
            supervised.restarts += 1
            await self._set_up(supervised, False)
            with contextlib.suppress(TimeoutError):
                delay = full_jitter(failures, self._base_backoff, self._max_backoff)
                await asyncio.wait_for(self._stopping.wait(), timeout=max(delay, self._base_backoff / 2))

    async def _set_up(self, supervised: _Supervised, up: bool) -> None:
        supervised.up = up
        healthy = self.healthy
        if healthy == self._reported_healthy:
            return
        self._reported_healthy = healthy
        if self._on_health_change is None:
            return
        try:
            await self._on_health_change(healthy)
        except Exception:  # a failing callback must not kill the supervision loop
            log.exception("%s: health callback failed", self._component)


async def first_to_finish(*coros: Coroutine[Any, Any, None]) -> None:
    """Runs the coroutines together until the first one returns or raises; cancels (and awaits) the others.

    Its exception, if any, propagates: e.g. a worker loop paired with a lease heartbeat stops when either does.
    """
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    for task in done:
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]


async def all_unless_one_fails(*coros: Coroutine[Any, Any, None]) -> None:
    """Runs the coroutines together until every one returns; the first to raise cancels (and awaits) the others and
    its exception propagates (`asyncio.gather` alone leaves them running, with nobody left to stop them)."""
    tasks = [asyncio.ensure_future(coro) for coro in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
