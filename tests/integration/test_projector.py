"""The projector against real servers: events published to JetStream (as the relay would) end up in MongoDB.

Each test has its own stream, subject prefix, durable consumer and Mongo database, so tests never see each
other's messages. Events are published directly with the relay's wire format to test the projector alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NamedTuple

import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from core import failpoints
from core.envelope import HEADER_MSG_ID, EventMetadata, RecordedEvent
from core.events import Event, decode_event
from core.order_events import (
    OrderCancelled,
    OrderCreated,
    OrderDeleted,
    OrderItemAdded,
    OrderItemQuantityChanged,
    OrderItemRemoved,
    OrderPlaced,
    OrderShippingAddressChanged,
)
from core.subjects import event_subject, parse_event_subject
from core.values import Address
from localservers import MongoServer, NatsServer, free_port
from projector.config import ProjectorSettings
from projector.consumer import group_consumers
from projector.planning import Decoder
from projector.runner import Projector
from tests.support import eventually

Doc = dict[str, Any]

ADDRESS = Address("Grace Hopper", "1 Compiler Way", "", "Arlington", "22201", "US")
NEW_ADDRESS = Address("Grace Hopper", "2 Bug Lane", "Suite 9", "Arlington", "22202", "US")
# MongoDB stores datetimes with millisecond precision; keep test times on whole milliseconds.
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)


def new_order_id() -> str:
    return str(uuid.uuid4())


class GroupCounts(NamedTuple):
    consumers: int
    num_pending: int
    num_ack_pending: int
    num_redelivered: int


@dataclass
class Stream:
    """Publishes one aggregate's events (an order's, unless told) with consecutive versions, remembering them."""

    order_id: str
    published: list[RecordedEvent] = field(default_factory=list)
    stream_type: str = "order"

    @property
    def stream_id(self) -> str:
        return self.order_id

    def record(self, event: Event, version: int, position: int) -> RecordedEvent:
        return RecordedEvent(
            event_id=uuid.uuid4(),
            stream_type=self.stream_type,
            stream_id=self.order_id,
            version=version,
            event_type=event.event_type,
            schema_version=event.schema_version,
            payload=event.to_payload(),
            metadata=EventMetadata("req-" + uuid.uuid4().hex[:8], "corr", "cause"),
            position=position,
            recorded_at=T0 + timedelta(seconds=position),
        )


class Harness:
    """One test's projector plus the clients the test uses to publish and to look at the read model."""

    def __init__(self, settings: ProjectorSettings, nc: NatsClient, mongo: AsyncMongoClient[Doc]) -> None:
        self.settings = settings
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.mongo = mongo
        self.db: AsyncDatabase[Doc] = mongo[settings.mongo_database]
        self.projectors: list[Projector] = []
        self.drop_database_at_end = True
        self._position = 0

    async def start_projector(self, decoder: Decoder = decode_event, **overrides: Any) -> Projector:
        """Starts a projector with these settings overrides (and this build's event decoder)."""
        projector = Projector(self.settings.model_copy(update=overrides), decoder=decoder)
        await projector.start()
        self.projectors.append(projector)
        return projector

    async def close(self) -> None:
        """Stops the projectors, deletes the test's stream (and database), closes the clients; idempotent."""
        for projector in self.projectors:
            await projector.stop()
        if self.nc.is_closed:
            return
        with contextlib.suppress(Exception):
            await self.js.delete_stream(self.settings.stream_name)
        if self.drop_database_at_end:
            await self.mongo.drop_database(self.settings.mongo_database)
        await self.mongo.close()
        with contextlib.suppress(Exception):  # nats-py raises from close() if the socket is already gone
            await self.nc.close()

    def next_position(self) -> int:
        self._position += 1
        return self._position

    async def publish(self, recorded: RecordedEvent, *, with_msg_id: bool = True) -> None:
        """Publishes like the relay; without the msg id a copy is not deduped by JetStream (an old re-publish)."""
        headers = recorded.headers()
        if not with_msg_id:
            del headers[HEADER_MSG_ID]
        subject = event_subject(recorded.stream_type, recorded.stream_id, self.settings.subject_prefix)
        await self.js.publish(subject, recorded.to_json(), headers=headers)

    async def emit(self, stream: Stream, event: Event, version: int | None = None) -> RecordedEvent:
        """Publishes `event` as the stream's next version (or the given one)."""
        version = version if version is not None else len(stream.published) + 1
        recorded = stream.record(event, version, self.next_position())
        stream.published.append(recorded)
        await self.publish(recorded)
        return recorded

    async def raw(self, subject_suffix: str, data: bytes) -> None:
        await self.js.publish(f"{self.settings.subject_prefix}.{subject_suffix}", data)

    async def order(self, order_id: str) -> Doc | None:
        return await self.db["orders"].find_one({"_id": order_id})

    async def order_at(self, order_id: str, version: int, timeout: float = 15.0) -> Doc:
        async def probe() -> Doc | None:
            doc = await self.order(order_id)
            return doc if doc is not None and doc["version"] == version else None

        return await eventually(probe, what=f"order {order_id} at version {version} in the read model", timeout=timeout)

    async def consumer(self) -> GroupCounts:
        """The projector group's consumers (one per partition), their counts summed."""
        infos = await group_consumers(self.js, self.settings.stream_name, self.settings.projector_durable)
        return GroupCounts(
            len(infos),
            sum(i.num_pending or 0 for i in infos),
            sum(i.num_ack_pending or 0 for i in infos),
            sum(i.num_redelivered or 0 for i in infos),
        )

    async def settled(self, what: str, timeout: float = 15.0) -> None:
        """Waits until the consumer has delivered everything and nothing is waiting for an ack."""

        async def probe() -> GroupCounts | None:
            info = await self.consumer()
            # One consumer per partition plus the strays' (created as the partitions are claimed), or the shared one.
            partitions = self.settings.stream_partitions
            every_consumer = info.consumers == (partitions + 1 if partitions else 1)
            return info if every_consumer and info.num_pending == 0 and info.num_ack_pending == 0 else None

        await eventually(probe, what=f"the consumer to settle every message ({what})", timeout=timeout)

    async def stats_reach(self, what: str, check: Callable[[Projector], bool], timeout: float = 15.0) -> None:
        async def probe() -> bool:
            return any(check(p) for p in self.projectors)

        await eventually(probe, what=what, timeout=timeout)


@pytest.fixture
async def harness_factory(
    nats_url: str, mongo_url: str, unique_name: str
) -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    settings = ProjectorSettings(
        nats_url=nats_url,
        mongo_url=mongo_url,
        mongo_database=unique_name,
        stream_name=unique_name.upper(),
        subject_prefix=f"{unique_name}.events",
        projector_durable=f"{unique_name}-projector",
        projector_fetch_timeout_seconds=0.5,
        projector_max_backoff_seconds=1.0,
        projector_resume_interval_seconds=0.3,
        mongo_timeout_ms=1000,
    )
    harnesses: list[Harness] = []

    async def make(**overrides: Any) -> Harness:
        s = settings.model_copy(update=overrides)
        nc = await nats.connect(s.nats_url, connect_timeout=5)
        mongo: AsyncMongoClient[Doc] = AsyncMongoClient(s.mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000)
        harness = Harness(s, nc, mongo)
        harnesses.append(harness)
        return harness

    yield make

    for harness in harnesses:
        await harness.close()


@pytest.fixture
async def harness(harness_factory: Callable[..., Awaitable[Harness]]) -> Harness:
    h = await harness_factory()
    await h.start_projector()
    return h


def without_bookkeeping(doc: Doc) -> Doc:
    return {k: v for k, v in doc.items() if k not in {"version", "position", "updated_at"}}


async def test_a_full_order_lifecycle_is_projected(harness: Harness) -> None:
    order = Stream(new_order_id())
    created = await harness.emit(order, OrderCreated(order.order_id, "cust-7", "EUR", ADDRESS))
    await harness.emit(order, OrderItemAdded("SKU-A", "Anvil", 2, 1999))
    await harness.emit(order, OrderItemAdded("SKU-B", "Bell", 1, 500))
    await harness.emit(order, OrderItemAdded("SKU-C", "Chain", 5, 100))
    await harness.emit(order, OrderItemQuantityChanged("SKU-B", 3))
    await harness.emit(order, OrderItemRemoved("SKU-C"))
    await harness.emit(order, OrderShippingAddressChanged(NEW_ADDRESS))
    placed = await harness.emit(order, OrderPlaced())

    doc = await harness.order_at(order.order_id, 8)
    # the change log, stored with the order: every event as it was recorded
    history = doc.pop("history")
    assert [(e["version"], e["event_type"]) for e in history] == [
        (1, "OrderCreated"),
        (2, "OrderItemAdded"),
        (3, "OrderItemAdded"),
        (4, "OrderItemAdded"),
        (5, "OrderItemQuantityChanged"),
        (6, "OrderItemRemoved"),
        (7, "OrderShippingAddressChanged"),
        (8, "OrderPlaced"),
    ]
    assert (history[0]["position"], history[0]["recorded_at"]) == (created.position, created.recorded_at)
    assert history[0]["payload"] == created.payload
    assert doc == {
        "_id": order.order_id,
        "order_id": order.order_id,
        "customer_id": "cust-7",
        "status": "PLACED",
        "currency": "EUR",
        "lines": [
            {"sku": "SKU-A", "name": "Anvil", "quantity": 2, "unit_price_minor": 1999, "line_total_minor": 3998},
            {"sku": "SKU-B", "name": "Bell", "quantity": 3, "unit_price_minor": 500, "line_total_minor": 1500},
        ],
        "total_minor": 5498,
        "shipping_address": NEW_ADDRESS.to_dict(),
        "cancel_reason": "",
        "created_at": created.recorded_at,
        "updated_at": placed.recorded_at,
        "placed_at": placed.recorded_at,
        "cancelled_at": None,
        "version": 8,
        "position": placed.position,
        "deleted": False,
        "customer_name": "",  # no such customer in the read model
        "customer_email": "",
        "customer_version": 0,
    }

    cancelled = await harness.emit(order, OrderCancelled("out of stock"))
    doc = await harness.order_at(order.order_id, 9)
    assert (doc["status"], doc["cancel_reason"], doc["placed_at"]) == ("CANCELLED", "out of stock", placed.recorded_at)
    assert (doc["updated_at"], doc["position"]) == (cancelled.recorded_at, cancelled.position)
    assert doc["cancelled_at"] == cancelled.recorded_at

    indexes = await harness.db["orders"].index_information()
    assert {tuple(k for k, _ in spec["key"]) for name, spec in indexes.items() if name != "_id_"} == {
        ("deleted", "created_at", "_id"),
        ("deleted", "customer_id", "created_at", "_id"),
        ("deleted", "status", "created_at", "_id"),
        ("deleted", "customer_id", "status", "created_at", "_id"),
        ("customer_id", "customer_version"),
    }
    await harness.stats_reach("9 applied events in the stats", lambda p: p.stats.applied == 9)
    projector = harness.projectors[0]
    assert projector.stats.last_lag is not None and projector.stats.last_lag > 0
    assert projector.stats.lag_percentile(0.5) > 0

    # Graceful stop: the acks of the last batch reach the server before the connection closes.
    await projector.stop()
    info = await harness.consumer()
    assert (info.num_pending, info.num_ack_pending, info.num_redelivered) == (0, 0, 0)


async def test_duplicates_and_stale_redeliveries_change_nothing(harness: Harness) -> None:
    order = Stream(new_order_id())
    v1 = await harness.emit(order, OrderCreated(order.order_id, "cust-1", "USD", ADDRESS))
    v2 = await harness.emit(order, OrderItemAdded("SKU-A", "Anvil", 1, 1000))
    await harness.emit(order, OrderPlaced())
    before = await harness.order_at(order.order_id, 3)

    # The same events again, as a relay re-publishes them after the JetStream duplicate window has passed.
    await harness.publish(v2, with_msg_id=False)
    await harness.publish(v2, with_msg_id=False)
    await harness.publish(v1, with_msg_id=False)
    await harness.stats_reach("3 duplicates to be recognised", lambda p: p.stats.duplicates >= 3)
    await harness.settled("duplicates acked")

    assert await harness.order(order.order_id) == before
    assert harness.projectors[0].stats.applied <= 3


async def test_a_missing_version_is_waited_for_never_skipped(harness: Harness) -> None:
    order = Stream(new_order_id())
    await harness.emit(order, OrderCreated(order.order_id, "cust-1", "EUR", ADDRESS))
    await harness.order_at(order.order_id, 1)
    v2 = order.record(OrderItemAdded("SKU-A", "Anvil", 2, 300), 2, harness.next_position())
    v3 = order.record(OrderPlaced(), 3, harness.next_position())
    await harness.publish(v3)

    # v3 has been offered (and naked) more than once, and the document still sits at v1.
    await harness.stats_reach("v3 to be deferred twice as a gap", lambda p: p.stats.gaps >= 2)
    doc = await harness.order(order.order_id)
    assert doc is not None and doc["version"] == 1 and doc["status"] == "DRAFT"
    # The second offer of v3 was a JetStream redelivery (num_delivered 2).
    registry = harness.projectors[0].metrics.registry
    assert (registry.get_sample_value("cqrs_projector_redeliveries_total") or 0) >= 1
    for dependency, operation in (("nats", "fetch"), ("mongodb", "find"), ("mongodb", "bulk_write")):
        labels = {"dependency": dependency, "operation": operation}
        assert (registry.get_sample_value("cqrs_dependency_call_seconds_count", labels) or 0) >= 1, labels

    await harness.publish(v2)
    doc = await harness.order_at(order.order_id, 3)
    assert doc["status"] == "PLACED"
    assert doc["total_minor"] == 600
    assert doc["position"] == v3.position
    await harness.settled("the gap healed")


async def test_poison_messages_park_their_streams_without_blocking_others(harness: Harness) -> None:
    victim = new_order_id()
    await harness.raw(f"order.{victim}", b"\xff\x00 definitely not json")
    await harness.raw("no-stream-here", b"not even a subject we know")
    unknown = Stream(new_order_id())
    teleported = unknown.record(OrderPlaced(), 1, harness.next_position())
    teleported = RecordedEvent(
        **{**{f: getattr(teleported, f) for f in RecordedEvent.__dataclass_fields__}, "event_type": "OrderTeleported"}
    )
    await harness.publish(teleported)
    bad_payload = Stream(new_order_id())
    malformed = bad_payload.record(OrderItemAdded("SKU", "x", 1, 1), 1, harness.next_position())
    malformed = RecordedEvent(
        **{
            **{f: getattr(malformed, f) for f in RecordedEvent.__dataclass_fields__},
            "event_type": "OrderCreated",  # the payload lacks order_id, customer_id, ...
        }
    )
    await harness.publish(malformed)
    behind = bad_payload.record(OrderPlaced(), 2, harness.next_position())  # waits behind the poison, in order
    await harness.publish(behind)

    healthy = Stream(new_order_id())
    await harness.emit(healthy, OrderCreated(healthy.order_id, "cust-2", "EUR", ADDRESS))
    await harness.emit(healthy, OrderItemAdded("SKU-B", "Bell", 4, 250))
    doc = await harness.order_at(healthy.order_id, 2)
    assert doc["total_minor"] == 1000

    async def parks() -> dict[str, Doc] | None:
        docs = await harness.db["checkpoints"].find({"parked": {"$exists": True}}).to_list()
        return {d["_id"]: d["parked"] for d in docs} if len(docs) == 3 else None

    parked = await eventually(parks, what="3 parked streams")
    assert parked[victim]["kind"] == "poison" and "malformed event envelope" in parked[victim]["reason"]
    assert parked[victim]["version"] is None
    assert parked[unknown.order_id]["kind"] == "needs_upgrade"
    assert "OrderTeleported" in parked[unknown.order_id]["reason"]
    assert (parked[bad_payload.order_id]["kind"], parked[bad_payload.order_id]["version"]) == ("poison", 1)
    assert "MalformedEvent" in parked[bad_payload.order_id]["reason"]
    assert all(isinstance(p["parked_at"], datetime) for p in parked.values())

    # Each parked stream's messages are kept in MongoDB (acknowledged, holding no JetStream slot), in order.
    await harness.settled("poison parked, held copies acknowledged")
    held = await harness.db["parked_events"].find().sort("_id", 1).to_list()
    assert sorted((h["stream_id"], h["version"]) for h in held if h["stream_id"] == bad_payload.order_id) == [
        (bad_payload.order_id, 1),
        (bad_payload.order_id, 2),
    ]
    garbage = next(h for h in held if h["stream_id"] == victim)
    assert garbage["data"] == b"\xff\x00 definitely not json"
    # Stored as the stream maps it: `<prefix>.<partition>.order.<id>`.
    parsed = parse_event_subject(garbage["subject"], harness.settings.subject_prefix)
    assert parsed is not None and (parsed.stream_type, parsed.stream_id) == ("order", victim)
    assert await harness.order(unknown.order_id) is None
    assert await harness.order(bad_payload.order_id) is None

    # A message naming no stream cannot park anything: it is a dead letter of its own, terminated.
    async def dead_letters() -> list[Doc] | None:
        letters = await harness.db["dead_letters"].find().to_list()
        return letters or None

    [letter] = await eventually(dead_letters, what="1 dead letter")
    assert letter["subject"] == f"{harness.settings.subject_prefix}.no-stream-here"
    assert letter["_id"] == letter["stream_seq"]
    assert isinstance(letter["received_at"], datetime)

    registry = harness.projectors[0].metrics.registry

    def parked_gauge(kind: str) -> float:
        return registry.get_sample_value("cqrs_projector_parked_streams", {"kind": kind}) or 0

    async def gauges() -> bool:
        return parked_gauge("poison") == 2 and parked_gauge("needs_upgrade") == 1

    await eventually(gauges, what="the parked-streams gauge to count 2 poison + 1 needs_upgrade")
    assert (registry.get_sample_value("cqrs_projector_dead_letters_total") or 0) == 4


async def test_order_deleted_leaves_a_tombstone_that_still_guards(harness: Harness) -> None:
    order = Stream(new_order_id())
    v1 = await harness.emit(order, OrderCreated(order.order_id, "cust-3", "EUR", ADDRESS))
    await harness.emit(order, OrderItemAdded("SKU-A", "Anvil", 1, 100))
    deleted = await harness.emit(order, OrderDeleted())
    doc = await harness.order_at(order.order_id, 3)
    assert doc["deleted"] is True
    assert doc["lines"] == [
        {"sku": "SKU-A", "name": "Anvil", "quantity": 1, "unit_price_minor": 100, "line_total_minor": 100}
    ]
    assert (doc["updated_at"], doc["position"]) == (deleted.recorded_at, deleted.position)

    await harness.publish(v1, with_msg_id=False)  # a late redelivery of the creation must not resurrect it
    await harness.stats_reach("the late OrderCreated to be a duplicate", lambda p: p.stats.duplicates >= 1)
    assert await harness.order(order.order_id) == doc


async def test_two_replicas_on_one_durable_converge_in_version_order(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(projector_batch_size=7)  # small batches: the replicas interleave more
    await h.start_projector()
    await h.start_projector()
    orders = [Stream(new_order_id()) for _ in range(20)]
    for order in orders:
        await h.emit(order, OrderCreated(order.order_id, "cust-r", "EUR", ADDRESS))
    for round_ in range(4):
        for order in orders:
            await h.emit(order, OrderItemAdded(f"SKU-{round_}", f"Item {round_}", round_ + 1, 100))
    for order in orders:
        await h.emit(order, OrderPlaced())

    async def all_placed() -> list[Doc] | None:
        docs = await h.db["orders"].find({"version": 6}).to_list()
        return docs if len(docs) == len(orders) else None

    docs = await eventually(all_placed, what="all 20 orders at version 6", timeout=60)
    for doc in docs:
        assert doc["status"] == "PLACED"
        assert [line["sku"] for line in doc["lines"]] == ["SKU-0", "SKU-1", "SKU-2", "SKU-3"]
        assert doc["total_minor"] == (1 + 2 + 3 + 4) * 100
    # Documents are visible before the batch's derived views, checkpoints and acks: wait for those.
    await h.settled("both replicas done", timeout=30)
    assert sum(p.stats.applied for p in h.projectors) == 6 * len(orders)
    # Both replicas wrote the one customer's statistics, by increment and recompute, racing: none is lost.
    customer = await h.db["customers"].find_one({"_id": "cust-r"})
    assert customer is not None
    assert customer["order_stats"] == {
        "draft_orders": 0,
        "placed_orders": len(orders),
        "cancelled_orders": 0,
        "placed_totals": [{"currency": "EUR", "total_minor": len(orders) * (1 + 2 + 3 + 4) * 100}],
    }
    assert len(orders) * 2 <= customer["order_stats_version"] <= len(orders) * 6


@pytest.mark.slow
async def test_projector_survives_a_mongodb_outage(
    harness_factory: Callable[..., Awaitable[Harness]], tmp_path: Path
) -> None:
    server = MongoServer(tmp_path / "mongo", free_port())
    try:
        h = await harness_factory(mongo_url=server.url, mongo_timeout_ms=300)
        projector = await h.start_projector()  # MongoDB is not running yet
        order = Stream(new_order_id())
        await h.emit(order, OrderCreated(order.order_id, "cust-9", "EUR", ADDRESS))
        await h.emit(order, OrderItemAdded("SKU-A", "Anvil", 1, 700))
        await h.stats_reach("the projector to notice MongoDB is down", lambda p: p.stats.mongo_failures >= 2)
        assert projector.running

        await asyncio.to_thread(server.start, 90)
        await h.order_at(order.order_id, 2, timeout=30)

        # Down again while events keep coming, then back on the same storage.
        await asyncio.to_thread(server.stop)
        failures = projector.stats.mongo_failures
        await h.emit(order, OrderPlaced())
        await h.stats_reach("a failure while MongoDB is down", lambda p: p.stats.mongo_failures > failures)
        assert projector.running
        await asyncio.to_thread(server.start, 90)
        doc = await h.order_at(order.order_id, 3, timeout=30)
        assert doc["status"] == "PLACED"
        assert doc["total_minor"] == 700
        await h.settled("everything applied after the outage")
        await h.close()  # while the server is still up
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.slow
async def test_projector_survives_a_nats_restart(
    harness_factory: Callable[..., Awaitable[Harness]], tmp_path: Path
) -> None:
    server = NatsServer(tmp_path / "nats", free_port())
    await asyncio.to_thread(server.start, 60)
    try:
        h = await harness_factory(nats_url=server.url)
        projector = await h.start_projector()
        order = Stream(new_order_id())
        await h.emit(order, OrderCreated(order.order_id, "cust-5", "EUR", ADDRESS))
        await h.order_at(order.order_id, 1)
        # The ack follows the write: wait for it, or the restart may lose it (redelivered only after ack_wait).
        await h.settled("v1 acknowledged before the restart")

        await asyncio.to_thread(server.stop)  # file storage: the stream and the durable survive the restart
        await asyncio.to_thread(server.start, 60)

        async def reconnected() -> bool:
            return bool(h.nc.is_connected)

        await eventually(reconnected, what="the test's publisher to reconnect to NATS", timeout=30)
        await h.emit(order, OrderItemAdded("SKU-A", "Anvil", 3, 250))
        doc = await h.order_at(order.order_id, 2, timeout=30)
        assert doc["total_minor"] == 750
        assert projector.running
        await h.settled("everything applied after the restart")
        await h.close()  # while the server is still up
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_loop_that_dies_is_restarted_and_reported_not_serving_meanwhile(
    harness_factory: Callable[..., Awaitable[Harness]], caplog: pytest.LogCaptureFixture
) -> None:
    h = await harness_factory()
    projector = await h.start_projector()
    assert projector.health.status == "SERVING"
    order = Stream(new_order_id())
    await h.emit(order, OrderCreated(order.order_id, "cust-s", "EUR", ADDRESS))
    await h.order_at(order.order_id, 1)
    registry = projector.metrics.registry
    assert registry.get_sample_value("cqrs_projector_serving") == 1
    assert projector.supervisor is not None

    statuses: list[str] = []
    failpoints.configure("projector.loop=raise")  # an unexpected exception in the consume loop, every pass
    try:

        async def restarted_and_seen_down() -> bool:
            statuses.append(projector.health.status)
            assert projector.supervisor is not None
            return projector.supervisor.restarts("consume") >= 2 and "NOT_SERVING" in statuses

        await eventually(restarted_and_seen_down, what="the consume loop to fail, be restarted, and health to drop")
        await h.emit(order, OrderItemAdded("SKU-A", "Anvil", 1, 100))  # nothing applies while it keeps failing
    finally:
        failpoints.configure("")
    doc = await h.order_at(order.order_id, 2)
    assert doc["total_minor"] == 100

    async def serving() -> bool:
        return projector.health.status == "SERVING" and registry.get_sample_value("cqrs_projector_serving") == 1

    await eventually(serving, what="health back to SERVING after the restart")
    assert (registry.get_sample_value("cqrs_projector_loop_restarts_total", {"loop": "consume"}) or 0) >= 1
    failures = [r for r in caplog.records if "background task consume failed" in r.getMessage()]
    assert failures and failures[0].exc_info is not None  # logged with the traceback
    assert projector.running


async def test_a_batch_that_fails_after_its_writes_is_redelivered_and_completed_after_the_restart(
    harness: Harness,
) -> None:
    projector = harness.projectors[0]
    order = Stream(new_order_id())
    failpoints.configure("projector.after_write_before_ack=raise")
    try:
        await harness.emit(order, OrderCreated(order.order_id, "cust-f", "EUR", ADDRESS))
        await harness.order_at(order.order_id, 1)  # written, then the batch blew up before its acks

        async def restarted() -> bool:
            assert projector.supervisor is not None
            return projector.supervisor.restarts("consume") >= 1

        await eventually(restarted, what="the consume loop to be restarted after the failure")
    finally:
        failpoints.configure("")
    await harness.emit(order, OrderPlaced())
    doc = await harness.order_at(order.order_id, 2)
    assert doc["status"] == "PLACED"
    await harness.settled("the failed batch redelivered and acknowledged")
    checkpoint = await harness.db["checkpoints"].find_one({"_id": order.order_id})
    assert checkpoint is not None and checkpoint["version"] == 2


async def test_a_running_projector_sweeps_the_sales_reports_tags_of_the_database_it_writes(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    """The sweep loop runs on the projector's own database and reports what it finds (the forgetting itself, which
    waits 120 s, is `tests/integration/test_sales_tags.py`'s)."""
    harness = await harness_factory()
    projector = await harness.start_projector(projector_sales_tag_sweep_seconds=0.2)
    order = Stream(new_order_id())
    await harness.emit(order, OrderCreated(order.order_id, "cust-7", "EUR", ADDRESS))
    await harness.emit(order, OrderItemAdded("SKU-A", "Anvil", 2, 1999))
    await harness.emit(order, OrderPlaced())
    await harness.order_at(order.order_id, 3)
    registry = projector.metrics.registry

    async def held() -> bool:
        return registry.get_sample_value("cqrs_projector_sales_tags_held") == 1

    await eventually(held, what="a sweep to find the placement's tag")
    assert (registry.get_sample_value("cqrs_projector_sales_tags_forgotten_total") or 0) == 0  # within its grace


async def test_of_several_replicas_only_the_owner_of_partition_0_sweeps_the_sales_tags(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    """Each sweep reads every shard and looks new tags up: with N replicas sweeping, the server would do it N times.
    Fails if a replica that does not own partition 0 sweeps."""
    harness = await harness_factory()
    fast: dict[str, Any] = {"projector_sales_tag_sweep_seconds": 0.1, "projector_lease_seconds": 3.0}
    replicas = [await harness.start_projector(**fast), await harness.start_projector(**fast)]

    def owned(replica: Projector) -> list[int]:
        return [] if replica.owner is None else replica.owner.owned

    async def shared() -> bool:
        # Disjoint too: while a partition changes hands, the replica losing it lists it until its next renewal.
        partitions = [set(owned(r)) for r in replicas]
        return sorted(map(len, partitions)) == [4, 4] and set.union(*partitions) == set(range(8))

    await eventually(shared, timeout=30, what="the two replicas to own four distinct partitions each")
    [sweeper] = [r for r in replicas if 0 in owned(r)]
    [other] = [r for r in replicas if r is not sweeper]

    def sweeps(replica: Projector) -> float:
        labels = {"dependency": "mongodb", "operation": "sales_tags_sweep"}
        return replica.metrics.registry.get_sample_value("cqrs_dependency_call_seconds_count", labels) or 0

    other_before, sweeper_before = sweeps(other), sweeps(sweeper)
    order = Stream(new_order_id())
    await harness.emit(order, OrderCreated(order.order_id, "cust-7", "EUR", ADDRESS))
    await harness.emit(order, OrderItemAdded("SKU-A", "Anvil", 2, 1999))
    await harness.emit(order, OrderPlaced())
    await harness.order_at(order.order_id, 3)

    async def swept() -> bool:
        held = sweeper.metrics.registry.get_sample_value("cqrs_projector_sales_tags_held")
        return held == 1 and sweeps(sweeper) >= sweeper_before + 3

    await eventually(swept, what="the owner of partition 0 to sweep three times and find the placement's tag")
    assert 0 in owned(sweeper), "partition 0 moved during the test"
    assert sweeps(other) == other_before, "a replica without partition 0 swept"
    assert other.metrics.registry.get_sample_value("cqrs_projector_sales_tags_held") == 0
