"""`localservers.NatsCluster`: three nats-server nodes form one JetStream cluster, configured as written, and a
stream with 3 replicas keeps accepting and keeping messages while one node is SIGKILLed."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import nats
import nats.errors
import pytest
from nats.js import JetStreamContext
from nats.js.api import PubAck, StorageType, StreamConfig

from core.jetstream import nats_servers
from localservers import NatsCluster, NatsClusterNode

pytestmark = pytest.mark.slow

ELECTION_TIMEOUT = 30.0
TWO_MINUTES_NS = 120 * 10**9


async def _publish_until_acked(js: JetStreamContext, subject: str, data: bytes, msg_id: str) -> tuple[PubAck, float]:
    """Publishes (same `Nats-Msg-Id` each try) until JetStream acks, for at most ELECTION_TIMEOUT seconds."""
    started = time.monotonic()
    while True:
        try:
            ack = await js.publish(subject, data, timeout=1, headers={"Nats-Msg-Id": msg_id})
            return ack, time.monotonic() - started
        except nats.errors.Error as exc:  # no stream leader yet (timeout / no responders / 503)
            if time.monotonic() - started > ELECTION_TIMEOUT:
                raise AssertionError(f"no publish acked within {ELECTION_TIMEOUT:.0f}s: {exc!r}") from None
            await asyncio.sleep(0.1)


async def _wait_last_seq(node: NatsClusterNode, stream: str, last_seq: int) -> None:
    """Waits until `node`'s own copy of `stream` (its `/jsz`) reaches `last_seq`."""
    deadline = time.monotonic() + ELECTION_TIMEOUT
    have: object = "no copy"
    while True:
        jsz = await asyncio.to_thread(node.monitoring, "jsz?streams=true")
        for account in jsz.get("account_details") or []:
            for detail in account.get("stream_detail") or []:
                if detail["name"] == stream:
                    have = detail["state"]["last_seq"]
        if have == last_seq:
            return
        assert time.monotonic() < deadline, f"{node.name}'s copy of {stream} is at {have}, not {last_seq}"
        await asyncio.sleep(0.1)


async def test_a_three_replica_stream_survives_one_node_killed(tmp_path: Path, unique_name: str) -> None:
    cluster = NatsCluster(tmp_path / "cluster")
    await asyncio.to_thread(cluster.start)
    try:
        assert nats_servers(cluster.url) == cluster.urls and len(cluster.urls) == 3
        for node in cluster.nodes:
            assert node.health() == (True, '{"status":"ok"}')
            varz = node.monitoring("varz")
            assert varz["server_name"] == node.name and varz["cluster"]["name"] == "cqrs-local"
            assert varz["jetstream"]["config"]["sync_interval"] == TWO_MINUTES_NS, "sync_interval not as configured"
        nc = await nats.connect(cluster.urls, connect_timeout=2, reconnect_time_wait=0.2, max_reconnect_attempts=-1)
        try:
            js = nc.jetstream(timeout=5)
            subject = f"{unique_name}.x"
            await js.add_stream(
                StreamConfig(name=unique_name, subjects=[subject], storage=StorageType.FILE, num_replicas=3)
            )
            # The stream's replicas elect their leader after `add_stream` answers, which can take seconds on a busy
            # machine (a first publish once timed out here in CI): publish until acked, as after the kill below.
            for i in range(5):
                ack, _ = await _publish_until_acked(js, subject, b"%d" % i, f"m{i}")
                assert ack.seq == i + 1, f"message {i} acked as {ack}"
            info = await js.stream_info(unique_name)
            assert info.cluster is not None and info.cluster.leader
            leader = cluster.node(info.cluster.leader)

            await asyncio.to_thread(leader.kill)
            ack, seconds = await _publish_until_acked(js, subject, b"while down", "m5")
            assert ack.seq == 6 and not ack.duplicate, f"acked {ack} with {leader.name} dead"
            info = await js.stream_info(unique_name)
            assert info.cluster is not None and info.cluster.leader != leader.name
            print(f"{leader.name} (stream leader) killed: a publish was acked after {seconds:.1f}s")

            await asyncio.to_thread(leader.start)
            await _wait_last_seq(leader, unique_name, 6)  # the restarted node caught up from the others
            assert (await js.get_msg(unique_name, seq=6)).data == b"while down"
            assert (await js.stream_info(unique_name)).state.messages == 6
        finally:
            await nc.close()
    finally:
        await asyncio.to_thread(cluster.stop)
