"""`cqrs verify`'s reading of the stream against a real nats-server: every message once, in order, even when the
consumer it reads through disappears halfway (it lives in memory on one node: a restart of that node loses it).

Ending the scan at a consumer that stopped delivering would report every later event as missing from the stream:
a false finding, and an operator sent to repair what is not broken.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import nats
import pytest
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from core.subjects import stream_subjects
from cqrsctl.verify.stream_scanner import StreamMessage, StreamScanner

MESSAGES = 50
BATCH = 10


@pytest.fixture
async def js(nats_url: str, unique_name: str) -> AsyncIterator[JetStreamContext]:
    """A stream of `MESSAGES` messages (not event envelopes: the scanner reports those as unreadable, in order)."""
    nc = await nats.connect(nats_url, connect_timeout=5)
    js = nc.jetstream(timeout=5)
    prefix = f"{unique_name}.events"
    await js.add_stream(StreamConfig(name=unique_name.upper(), subjects=stream_subjects(prefix)))
    for n in range(MESSAGES):
        await js.publish(f"{prefix}.order.o{n % 7}", f"message {n}".encode())
    try:
        yield js
    finally:
        with contextlib.suppress(Exception):
            await js.delete_stream(unique_name.upper())
        await nc.close()


def scanner(js: JetStreamContext, unique_name: str, timeout: float = 2.0) -> StreamScanner:
    return StreamScanner(js, unique_name.upper(), f"{unique_name}.events", BATCH, timeout)


async def read_all(scan: StreamScanner, read: list[StreamMessage]) -> None:
    while batch := await scan.fetch():
        read.extend(batch)


async def verify_consumers(js: JetStreamContext, unique_name: str) -> list[str]:
    infos = await js.consumers_info(unique_name.upper())
    return [i.name for i in infos if i.config.description == "cqrs verify (ephemeral)"]


async def test_the_scan_reads_every_message_once_in_order_and_leaves_no_consumer(
    js: JetStreamContext, unique_name: str
) -> None:
    scan = scanner(js, unique_name)
    facts = await scan.open()
    assert facts is not None and (facts.messages, facts.first_seq, facts.last_seq) == (MESSAGES, 1, MESSAGES)
    read: list[StreamMessage] = []
    await read_all(scan, read)
    assert [m.seq for m in read] == list(range(1, MESSAGES + 1))
    assert all(m.event is None and m.error for m in read)  # not envelopes: named unreadable, still read
    await scan.close()
    assert await verify_consumers(js, unique_name) == []


@pytest.mark.parametrize("lost_after_batches", [1, 3])
async def test_a_consumer_lost_mid_scan_is_replaced_where_the_reading_stopped(
    js: JetStreamContext, unique_name: str, lost_after_batches: int
) -> None:
    scan = scanner(js, unique_name)
    assert await scan.open() is not None
    read: list[StreamMessage] = []
    for _ in range(lost_after_batches):
        read.extend(await scan.fetch())
    (lost,) = await verify_consumers(js, unique_name)
    await js.delete_consumer(unique_name.upper(), lost)  # as its node's restart would

    await read_all(scan, read)

    assert [m.seq for m in read] == list(range(1, MESSAGES + 1))
    (replacement,) = await verify_consumers(js, unique_name)
    assert replacement != lost
    await scan.close()
    assert await verify_consumers(js, unique_name) == []


async def test_messages_removed_while_the_consumer_was_lost_end_the_scan_where_the_stream_ends(
    js: JetStreamContext, unique_name: str
) -> None:
    """The replacement starts after the last message read; what the stream no longer holds is not waited for."""
    scan = scanner(js, unique_name)
    assert await scan.open() is not None
    read = await scan.fetch()
    (lost,) = await verify_consumers(js, unique_name)
    await js.delete_consumer(unique_name.upper(), lost)
    await js.purge_stream(unique_name.upper(), seq=31)  # removes #1..#30 (#11..#30 unread)

    await read_all(scan, read)

    assert [m.seq for m in read] == list(range(1, BATCH + 1)) + list(range(31, MESSAGES + 1))
    await scan.close()
