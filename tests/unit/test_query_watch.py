"""WatchOrder subscriptions: bounded queues that coalesce and never block the dispatcher (asyncio only)."""

from __future__ import annotations

import asyncio

import pytest

from core.errors import Unavailable
from query_service.watch import REMOVED, Subscription


async def test_a_subscription_delivers_in_order() -> None:
    sub = Subscription("o-1", capacity=4)
    for version in (1, 2, 3):
        sub.offer({"_id": "o-1", "version": version})

    assert [(await sub.next())["version"] for _ in range(3)] == [1, 2, 3]  # type: ignore[index]


async def test_a_full_queue_keeps_only_the_latest_document() -> None:
    sub = Subscription("o-1", capacity=3)
    for version in range(1, 8):  # never blocks, however slow the reader
        sub.offer({"_id": "o-1", "version": version})

    first = await sub.next()
    assert isinstance(first, dict)
    versions = [first["version"]]
    while versions[-1] != 7:
        item = await asyncio.wait_for(sub.next(), timeout=1)
        assert isinstance(item, dict)
        versions.append(item["version"])

    assert versions == sorted(versions) and versions[-1] == 7
    assert len(versions) <= 3
    assert sub.coalesced > 0


async def test_ending_wakes_a_waiting_reader_with_the_error() -> None:
    sub = Subscription("o-1", capacity=2)
    reader = asyncio.create_task(sub.next())
    await asyncio.sleep(0)

    sub.end(Unavailable("shutting down"))

    with pytest.raises(Unavailable):
        await asyncio.wait_for(reader, timeout=1)
    sub.offer({"version": 9})  # ignored after the end
    with pytest.raises(Unavailable):
        await sub.next()


async def test_an_ended_subscription_is_not_ready_but_failed() -> None:
    sub = Subscription("o-1", capacity=2)
    sub.end(Unavailable("down"))

    with pytest.raises(Unavailable):
        await sub.wait_ready()


async def test_removal_is_delivered_like_a_document() -> None:
    sub = Subscription("o-1", capacity=2)
    sub.offer(REMOVED)

    assert await sub.next() is REMOVED
