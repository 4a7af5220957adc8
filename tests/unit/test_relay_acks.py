"""How long the outbox relay waits for a pass's JetStream acks (`command_service.relay._acks`), with no server: the
acks are futures answered on a schedule."""

from __future__ import annotations

import asyncio

import pytest
from nats.js.api import PubAck

from command_service import relay
from command_service.relay import _acks


def _answered_at(delays: list[float | None]) -> list[asyncio.Future[PubAck]]:
    """A future per delay, answered that many seconds from now (None: never, a publish a step-down dropped)."""
    loop = asyncio.get_running_loop()
    futures: list[asyncio.Future[PubAck]] = []
    for seq, delay in enumerate(delays, start=1):
        fut: asyncio.Future[PubAck] = loop.create_future()
        if delay is not None:
            loop.call_later(delay, fut.set_result, PubAck(stream="S", seq=seq))
        futures.append(fut)
    return futures


async def _waited(futures: list[asyncio.Future[PubAck]], timeout: float) -> float:
    loop = asyncio.get_running_loop()
    started = loop.time()
    await _acks(futures, timeout)
    return loop.time() - started


@pytest.fixture(autouse=True)
def short_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay, "ACK_STALL_SECONDS", 0.2)


async def test_the_wait_ends_with_the_last_ack() -> None:
    futures = _answered_at([0.01, 0.05, 0.1])
    assert await _waited(futures, timeout=5.0) < 0.15
    assert all(f.done() for f in futures)


async def test_acks_that_stop_coming_end_the_wait_a_stall_after_the_last_one_not_at_the_timeout() -> None:
    futures = _answered_at([0.01, 0.1, None, None])
    waited = await _waited(futures, timeout=5.0)
    assert 0.29 <= waited < 1.0  # the last ack at 0.1 s, then 0.2 s without any
    assert [f.done() for f in futures] == [True, True, False, False]


async def test_no_ack_at_all_ends_the_wait_after_one_stall() -> None:
    waited = await _waited(_answered_at([None, None]), timeout=5.0)
    assert 0.19 <= waited < 1.0


async def test_acks_that_keep_coming_are_waited_for_up_to_the_timeout() -> None:
    futures = _answered_at([0.1 * n for n in range(1, 21)] + [None])  # one every 0.1 s for 2 s, one never
    waited = await _waited(futures, timeout=0.75)
    assert 0.74 <= waited < 1.2
    assert 6 <= sum(f.done() for f in futures) <= 9
