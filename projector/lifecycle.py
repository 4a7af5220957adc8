"""`run_projector`: the projector process's life, from start (waiting for NATS as long as it takes) to a graceful
stop when the stop event is set (`python -m projector` runs it under `core.entrypoint`)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from typing import Any

from projector.config import ProjectorSettings
from projector.runner import Projector


async def run_projector(
    settings: ProjectorSettings,
    stop_event: asyncio.Event,
    on_started: Callable[[Projector], None] | None = None,
) -> None:
    """Runs a projector until `stop_event` is set, then stops it gracefully."""
    projector = Projector(settings)
    stop_waiter = asyncio.create_task(stop_event.wait())
    try:
        # Starting waits for NATS (forever, as a deployment wants); a stop request must still end it.
        if not await _first(projector.start(), stop_waiter):
            return
        if on_started is not None:
            on_started(projector)
        await _first(projector.wait(), stop_waiter)
    finally:
        stop_waiter.cancel()
        await projector.stop()


async def _first(work: Coroutine[Any, Any, None], stop_waiter: asyncio.Task[Any]) -> bool:
    """Runs `work` until it ends (True; its error is raised) or `stop_waiter` ends first (False; work cancelled)."""
    task = asyncio.create_task(work)
    await asyncio.wait({task, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        task.result()
        return True
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    return False
