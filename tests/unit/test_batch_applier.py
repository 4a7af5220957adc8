"""The projector's batch applier: merged batches of the partitions' workers, and workers that stop waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from nats.aio.msg import Msg

from projector.applier import BatchApplier
from projector.leases import FREE
from projector.partitions import Fence


def _msg(subject: str) -> Msg:
    return Msg(_client=None, subject=subject)  # type: ignore[arg-type]


class Recorder:
    """Records what the applier applies and hands back; its first apply waits for `go` (a slow batch)."""

    def __init__(self) -> None:
        self.applied: list[list[str]] = []
        self.handed_back: list[list[str]] = []
        self.go = asyncio.Event()

    async def apply(self, msgs: list[Msg]) -> None:
        await self.go.wait()
        self.applied.append([m.subject for m in msgs])

    async def hand_back(self, msgs: Sequence[Msg]) -> None:
        self.handed_back.append([m.subject for m in msgs])


async def _submitted_then_cancelled(applier: BatchApplier, msgs: list[Msg], fence: Fence) -> None:
    """A worker that submits a batch and is cancelled while it waits (its partition handed over meanwhile)."""
    worker = asyncio.create_task(applier.submit(msgs, fence))
    await asyncio.sleep(0)  # submitted: queued in the applier
    worker.cancel()
    await asyncio.gather(worker, return_exceptions=True)


async def test_batches_of_workers_that_stopped_waiting_are_settled_and_the_applier_goes_on() -> None:
    """Fails if the applier dies (and the replica's consuming with it) on a batch whose worker was cancelled: one
    whose lease expired meanwhile is handed back, one still fenced is applied, and later batches still flow."""
    recorder = Recorder()
    applier = BatchApplier(recorder.apply, recorder.hand_back, max_messages=1)
    lost = Fence(timedelta(0), FREE)
    held = Fence(timedelta(0), datetime.now(UTC) + timedelta(minutes=5))
    running = asyncio.create_task(applier.run())
    try:
        first = asyncio.create_task(applier.submit([_msg("first")], held))
        await asyncio.sleep(0.01)  # being applied: the next batches wait behind it
        await _submitted_then_cancelled(applier, [_msg("lost")], lost)
        await _submitted_then_cancelled(applier, [_msg("held")], held)
        recorder.go.set()
        await asyncio.wait_for(first, timeout=5)
        await asyncio.sleep(0.01)  # the two waiting batches are taken
        assert not running.done(), f"the applier stopped: {running.exception()!r}"
        await asyncio.wait_for(applier.submit([_msg("later")], held), timeout=5)
        assert recorder.handed_back == [["lost"]]
        assert recorder.applied == [["first"], ["held"], ["later"]]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_ready_batches_are_merged_up_to_the_limit_in_the_order_they_came() -> None:
    recorder = Recorder()
    applier = BatchApplier(recorder.apply, recorder.hand_back, max_messages=3)
    held = Fence(timedelta(0), datetime.now(UTC) + timedelta(minutes=5))
    running = asyncio.create_task(applier.run())
    try:
        first = asyncio.create_task(applier.submit([_msg("first")], held))
        await asyncio.sleep(0.01)  # being applied: the next batches wait behind it
        workers = [asyncio.create_task(applier.submit([_msg(f"{k}"), _msg(f"{k}'")], held)) for k in range(2)]
        workers.append(asyncio.create_task(applier.submit([_msg("2")], held)))
        await asyncio.sleep(0.01)
        recorder.go.set()
        await asyncio.wait_for(asyncio.gather(first, *workers), timeout=5)
        # 2 + 2 messages exceed the limit of 3, 2 + 1 do not.
        assert recorder.applied == [["first"], ["0", "0'"], ["1", "1'", "2"]]
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
