"""Lets the batches of several partitions be applied at once, and a generation switch happen between batches.

A batch runs inside `batch()`; `exclusive()` (a cutover moving the projector to another database) waits until
no batch runs and holds new ones back until it is done, so no batch straddles two generations.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class BatchGate:
    def __init__(self) -> None:
        self._switch = asyncio.Lock()
        self._running = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @contextlib.asynccontextmanager
    async def batch(self) -> AsyncIterator[None]:
        async with self._switch:  # waits while a switch holds the gate
            self._running += 1
            self._idle.clear()
        try:
            yield
        finally:
            self._running -= 1
            if self._running == 0:
                self._idle.set()

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        async with self._switch:
            await self._idle.wait()
            yield
