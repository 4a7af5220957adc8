"""Applies what the partitions' workers fetched in merged batches, one at a time.

Each owned partition has its own consumer, so at a moderate rate each fetch brings only a few messages; applied one
by one, those small batches would each pay the pipeline's MongoDB round trips. The workers hand their batches to
this applier and wait; it takes everything ready (up to `max_messages`) and applies it as one batch, then lets the
workers fetch again. A partition's batches therefore stay in order, a fetched batch waits at most one apply (well
inside the ack wait), and one replica's cost per event does not grow with its number of partitions.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from nats.aio.msg import Msg

from projector.partitions import Fence


@dataclass(slots=True)
class Fetched:
    msgs: list[Msg]
    fence: Fence | None
    done: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class BatchApplier:
    def __init__(
        self,
        apply: Callable[[list[Msg]], Awaitable[None]],
        hand_back: Callable[[Sequence[Msg]], Awaitable[None]],
        max_messages: int,
    ) -> None:
        self._apply = apply
        self._hand_back = hand_back
        self._max_messages = max_messages
        self._ready: deque[Fetched] = deque()
        self._wake = asyncio.Event()

    async def submit(self, msgs: list[Msg], fence: Fence | None) -> None:
        """Returns once the batch is applied and settled (or handed back); raises what the apply raised."""
        fetched = Fetched(msgs, fence)
        self._ready.append(fetched)
        self._wake.set()
        await fetched.done

    async def run(self) -> None:
        """Applies until cancelled; an unexpected error fails the batches it held and is raised."""
        self._ready.clear()  # left by a run that failed: their workers are gone, JetStream redelivers them
        while True:
            while not self._ready:
                self._wake.clear()
                await self._wake.wait()
            taken = [self._ready.popleft()]
            count = len(taken[0].msgs)
            while self._ready and count + len(self._ready[0].msgs) <= self._max_messages:
                taken.append(self._ready.popleft())
                count += len(taken[-1].msgs)
            try:
                await self._apply_taken(taken)
            except BaseException as exc:
                for fetched in taken:
                    _finish(fetched, exc if isinstance(exc, Exception) else RuntimeError("stopped"))
                raise
            for fetched in taken:
                _finish(fetched)

    async def _apply_taken(self, taken: list[Fetched]) -> None:
        msgs: list[Msg] = []
        for fetched in taken:
            # Its lease may have expired while it waited: another replica may own the partition by now.
            if fetched.fence is not None and not fetched.fence.valid():
                await self._hand_back(fetched.msgs)
                _finish(fetched)
            else:
                msgs += fetched.msgs
        if msgs:
            await self._apply(msgs)


def _finish(fetched: Fetched, error: Exception | None = None) -> None:
    """Tells the worker its batch is done; a worker that stopped waiting (cancelled: its partition was handed over
    while the batch waited) has nobody to tell."""
    if fetched.done.done():
        return
    if error is None:
        fetched.done.set_result(None)
    else:
        fetched.done.set_exception(error)
