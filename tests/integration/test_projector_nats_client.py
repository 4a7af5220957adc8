"""The projector's nats-py client (`projector/nats_client.py`) against a real nats-server: it receives exactly what
nats-py's own client receives, and takes an already-delivered message without waiting."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import nats
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription
from nats.errors import ConnectionClosedError, TimeoutError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, StreamConfig
from prometheus_client import CollectorRegistry

from core.dependency_metrics import dependency_metrics
from projector import consumer
from projector.config import ProjectorSettings
from projector.nats_client import ProjectorNatsClient, QueuedFirstSubscription
from tests.support import eventually

MESSAGES = 450  # more than two fetches of 200: the last one comes up short


async def _connected(client: Client, url: str) -> Client:
    await client.connect(url, connect_timeout=2)
    return client


async def _fetch_all(client: Client, stream: str, durable: str) -> tuple[list[tuple[Any, ...]], Subscription]:
    """Every message of `stream` through a durable pull consumer in fetches of up to 200, each acked, as
    (subject, data, headers, stream sequence, delivery count); and the consumer's subscription."""
    js = client.jetstream(timeout=5)
    psub = await js.pull_subscribe(
        f"{stream}.>",
        durable=durable,
        stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL),
    )
    received: list[tuple[Any, ...]] = []
    while len(received) < MESSAGES:
        for msg in await psub.fetch(min(200, MESSAGES - len(received)), timeout=5):
            meta = msg.metadata
            received.append((msg.subject, msg.data, msg.headers, meta.sequence.stream, meta.num_delivered))
            await msg.ack()
    return received, psub._sub


async def test_a_pull_consumer_receives_what_nats_py_receives(nats_url: str, unique_name: str) -> None:
    stream = unique_name
    publisher = await nats.connect(nats_url, connect_timeout=2)
    ours = await _connected(ProjectorNatsClient(), nats_url)
    plain = await _connected(Client(), nats_url)
    try:
        js = publisher.jetstream(timeout=5)
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"]))
        for n in range(MESSAGES):
            await js.publish(f"{stream}.order.{n % 7}", f"event {n}".encode(),
                             headers={"Nats-Msg-Id": f"id-{n}", "Cqrs-Version": str(n // 7 + 1)})  # fmt: skip
        theirs, plain_sub = await _fetch_all(plain, stream, "plain")
        mine, our_sub = await _fetch_all(ours, stream, "ours")
        assert type(our_sub) is QueuedFirstSubscription and type(plain_sub) is Subscription
        assert [m[3] for m in mine] == list(range(1, MESSAGES + 1))  # every message once, in stream order
        assert mine == theirs
        for sub in (our_sub, plain_sub):  # nothing left counted as pending once all was taken
            assert (sub.pending_msgs, sub.pending_bytes) == (0, 0)
        # Every ack reached the server. Acks are buffered publishes of each client, and the server applies them to
        # the consumer asynchronously: flush them out, then wait (bounded) for the consumer to count them.
        for client in (ours, plain):
            await client.flush(timeout=5)
        for durable in ("plain", "ours"):

            async def settled(durable: str = durable) -> bool:
                info = await js.consumer_info(stream, durable)
                return (info.num_ack_pending, info.num_pending) == (0, 0)

            await eventually(settled, what=f"consumer {durable!r} with no ack and no message pending", timeout=5)
        await js.delete_stream(stream)
    finally:
        for client in (publisher, ours, plain):
            await client.close()


async def test_a_delivered_message_is_taken_at_once_and_waiting_is_left_to_nats_py(
    nats_url: str, unique_name: str
) -> None:
    client = await _connected(ProjectorNatsClient(), nats_url)
    try:
        sub = await client.subscribe(f"{unique_name}.>")
        assert type(sub) is QueuedFirstSubscription
        for n in range(3):
            await client.publish(f"{unique_name}.m", f"m{n}".encode())
        await client.flush(timeout=2)

        async def all_delivered() -> bool:
            return sub.pending_msgs == 3

        await eventually(all_delivered, what="the three messages in the subscription's queue", timeout=5)
        # Queued: `next_msg` finishes on its first step, without suspending (nats-py's waits on a new task).
        step = sub.next_msg(timeout=1)
        with pytest.raises(StopIteration) as finished:
            step.send(None)
        assert finished.value.value.data == b"m0"
        assert (sub.pending_msgs, sub.pending_bytes) == (2, 4)
        assert [(await sub.next_msg(timeout=1)).data for _ in range(2)] == [b"m1", b"m2"]
        assert (sub.pending_msgs, sub.pending_bytes) == (0, 0)
        # Nothing queued: nats-py's own wait, with its timeout error.
        with pytest.raises(TimeoutError):
            await sub.next_msg(timeout=0.05)
        # A message published while `next_msg` waits is returned by that wait.
        waiting = asyncio.create_task(sub.next_msg(timeout=2))
        await asyncio.sleep(0.05)
        await client.publish(f"{unique_name}.m", b"late")
        assert (await waiting).data == b"late"
        # Queued but the connection closed: nats-py's error, not the queued message.
        await client.publish(f"{unique_name}.m", b"stranded")
        await client.flush(timeout=2)
        await eventually(lambda: asyncio.sleep(0, sub.pending_msgs == 1), what="the stranded message", timeout=5)
        await client.close()
        with pytest.raises(ConnectionClosedError):
            await sub.next_msg(timeout=1)
    finally:
        await client.close()


async def test_failed_fetches_while_nats_is_away_are_one_line_per_window(
    nats_url: str, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Every partition's source retries once a second while NATS is away; the log says so once per 10 s."""
    caplog.set_level(logging.WARNING, logger="projector.consumer")
    consumer._jetstream_failures.clear()
    client = await _connected(ProjectorNatsClient(), nats_url)
    js = client.jetstream(timeout=5)
    await js.add_stream(StreamConfig(name=unique_name, subjects=[f"{unique_name}.>"]))
    settings = ProjectorSettings(nats_url=nats_url, projector_fetch_timeout_seconds=0.2)
    deps = dependency_metrics(CollectorRegistry())
    sources = []
    for partition in (0, 1):
        durable = f"{unique_name}-p{partition}"
        sub = await js.pull_subscribe(f"{unique_name}.>", durable=durable, stream=unique_name)
        sources.append(consumer.PullSource(sub, durable, partition, settings, deps))
    await js.delete_stream(unique_name)
    await client.close()
    for _ in range(2):
        for source in sources:
            assert await source.fetch() == []
    lines = [r.getMessage() for r in caplog.records if r.name == "projector.consumer"]
    assert len(lines) == 1 and lines[0].startswith(f"fetch from JetStream ({unique_name}-p0) failed"), lines
