"""Rolling upgrades against real servers: an event newer than the projector parks its stream (never a dead letter,
never a global stall) and is applied, in order, once an upgraded projector runs next to the old one.

"Newer" is an `OrderItemAdded` at schema version 2 (it carries a `gift_wrap` flag): this build knows version 1
only, so `decode_event` says it needs an upgrade. The upgraded build is the same projector with a decoder that
also knows version 2, as a release with the new schema and its upcaster would have.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import replace

from core.envelope import RecordedEvent
from core.events import Event, Payload, decode_event
from core.order_events import OrderCreated, OrderItemAdded, OrderItemQuantityChanged
from projector.parking import Park
from projector.planning import decode_recorded
from tests.integration import test_projector
from tests.integration.test_projector import ADDRESS, Doc, Harness, Stream, new_order_id
from tests.support import eventually

harness_factory = test_projector.harness_factory


def upgraded_decoder(event_type: str, schema_version: int, payload: Payload) -> Event:
    """What the next release decodes: `OrderItemAdded` v2 is v1 plus a flag this read model ignores."""
    if event_type == "OrderItemAdded" and schema_version == 2:
        payload = {k: v for k, v in payload.items() if k != "gift_wrap"}
        schema_version = 1
    return decode_event(event_type, schema_version, payload)


def gift_wrapped(recorded: RecordedEvent) -> RecordedEvent:
    return replace(recorded, schema_version=2, payload={**recorded.payload, "gift_wrap": True})


async def parked(h: Harness, stream_id: str) -> Doc | None:
    doc = await h.db["checkpoints"].find_one({"_id": stream_id, "parked": {"$exists": True}})
    return None if doc is None else dict(doc["parked"])


async def test_an_event_too_new_for_the_projector_waits_for_an_upgraded_replica_without_stalling_others(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(projector_max_ack_pending=20, projector_batch_size=10)
    old = await h.start_projector()

    stuck = Stream(new_order_id())
    await h.emit(stuck, OrderCreated(stuck.order_id, "cust-u", "EUR", ADDRESS))
    await h.order_at(stuck.order_id, 1)
    newer = gift_wrapped(stuck.record(OrderItemAdded("SKU-0", "Gift", 1, 500), 2, h.next_position()))
    stuck.published.append(newer)
    await h.publish(newer)
    behind = 60  # three times max_ack_pending: all of them wait behind the one the old build cannot read
    for n in range(behind):
        event: Event = OrderItemQuantityChanged("SKU-0", n + 2)
        await h.emit(stuck, event)

    others = [Stream(new_order_id()) for _ in range(15)]
    for order in others:
        await h.emit(order, OrderCreated(order.order_id, "cust-o", "EUR", ADDRESS))
        await h.emit(order, OrderItemAdded("SKU-A", "Anvil", 2, 100))
        await h.emit(order, OrderItemQuantityChanged("SKU-A", 3))

    async def others_applied() -> list[Doc] | None:
        docs = await h.db["orders"].find({"_id": {"$in": [o.order_id for o in others]}, "version": 3}).to_list()
        return docs if len(docs) == len(others) else None

    await eventually(others_applied, what="every other stream applied while one stream is stuck", timeout=30)
    park = await eventually(lambda: parked(h, stuck.order_id), what="the stuck stream to be parked")
    assert (park["kind"], park["version"], park["event_type"], park["schema_version"]) == (
        "needs_upgrade",
        2,
        "OrderItemAdded",
        2,
    )
    # Not a dead letter, and holding no JetStream slot: the consumer has nothing pending or unacknowledged.
    await h.settled("all messages settled; the stuck stream's are held in MongoDB")
    assert await h.db["dead_letters"].count_documents({}) == 0
    assert await h.db["parked_events"].count_documents({"stream_id": stuck.order_id}) == behind + 1
    doc = await h.order(stuck.order_id)
    assert doc is not None and doc["version"] == 1
    checkpoint = await h.db["checkpoints"].find_one({"_id": stuck.order_id})
    assert checkpoint is not None and checkpoint["version"] == 1
    assert old.stats.applied == 1 + 3 * len(others)

    # The rolling upgrade: a new replica joins the old one; it resumes the stream from the held copies.
    new = await h.start_projector(decoder=upgraded_decoder)
    final = 2 + behind
    doc = await h.order_at(stuck.order_id, final, timeout=30)
    quantity = behind + 1  # the last OrderItemQuantityChanged
    assert doc["lines"] == [
        {
            "sku": "SKU-0",
            "name": "Gift",
            "quantity": quantity,
            "unit_price_minor": 500,
            "line_total_minor": 500 * quantity,
        }
    ]

    async def unparked() -> bool:  # the park goes right after the resumption's writes, not with them
        return await parked(h, stuck.order_id) is None

    await eventually(unparked, what="the stream to be unparked once its held events applied")
    checkpoint = await h.db["checkpoints"].find_one({"_id": stuck.order_id})
    assert checkpoint is not None and checkpoint["version"] == final

    async def copies_dropped() -> bool:
        return await h.db["parked_events"].count_documents({"stream_id": stuck.order_id}) == 0

    await eventually(copies_dropped, what="the held copies to be deleted once applied")
    assert new.stats.resumed == 1

    # And the stream flows again for both replicas.
    await h.emit(stuck, OrderItemQuantityChanged("SKU-0", 1))
    doc = await h.order_at(stuck.order_id, final + 1)
    assert doc["total_minor"] == 500
    await h.settled("everything applied after the upgrade")


async def test_a_gap_that_lasts_parks_its_stream_and_resumes_when_the_missing_event_arrives(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(projector_max_ack_pending=20, projector_park_after_deliveries=3)
    await h.start_projector()
    order = Stream(new_order_id())
    await h.emit(order, OrderCreated(order.order_id, "cust-g", "EUR", ADDRESS))
    await h.order_at(order.order_id, 1)
    missing = order.record(OrderItemAdded("SKU-A", "Anvil", 1, 100), 2, h.next_position())
    order.published.append(missing)
    for n in range(30):
        await h.emit(order, OrderItemQuantityChanged("SKU-A", n + 2))
    park = await eventually(lambda: parked(h, order.order_id), what="the gap to park its stream", timeout=30)
    assert (park["kind"], park["version"]) == ("gap", 2)

    other = Stream(new_order_id())
    await h.emit(other, OrderCreated(other.order_id, "cust-g", "EUR", ADDRESS))
    await h.order_at(other.order_id, 1)
    await h.settled("the gapped stream's messages held, not pending")

    await h.publish(missing)  # late, as after a relay outage
    doc = await h.order_at(order.order_id, 32, timeout=30)
    assert doc["total_minor"] == 31 * 100

    async def unparked() -> bool:  # the park record goes right after the held events are applied
        return await parked(h, order.order_id) is None

    await eventually(unparked, what="the stream to be unparked once its held events applied")


async def test_a_gap_filled_by_a_replica_that_never_saw_the_park_still_resumes(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    """The race two replicas can run: one parks a stream at its gap while the other, having read the stream's
    state just before, applies the missing event directly. No copy of it is ever held, so the park must notice
    the read model has reached its version and apply the held later events (a fault run once left such a stream
    one version behind for good)."""
    h = await harness_factory(projector_max_ack_pending=20, projector_park_after_deliveries=3)
    projector = await h.start_projector()
    order = Stream(new_order_id())
    await h.emit(order, OrderCreated(order.order_id, "cust-r", "EUR", ADDRESS))
    await h.order_at(order.order_id, 1)
    missing = order.record(OrderItemAdded("SKU-A", "Anvil", 1, 100), 2, h.next_position())
    order.published.append(missing)
    for n in range(3):
        await h.emit(order, OrderItemQuantityChanged("SKU-A", n + 2))
    park = await eventually(lambda: parked(h, order.order_id), what="the gap to park its stream", timeout=30)
    assert (park["kind"], park["version"]) == ("gap", 2)
    await h.settled("the gapped stream's messages held, not pending")

    # The other replica's batch: it read "not parked" before the park was written, so it applies v2 as usual.
    pipeline = projector.pipeline
    unaware = Park.from_checkpoint(await h.db["checkpoints"].find_one({"_id": order.order_id}) or {})
    out = await pipeline.apply(decode_recorded([missing], pipeline.projections), resuming={order.order_id: unaware})
    assert out.versions.get(order.order_id) == 2, out
    assert await h.db["parked_events"].count_documents({"stream_id": order.order_id, "version": 2}) == 0

    doc = await h.order_at(order.order_id, 5, timeout=30)  # v3..v5: the held copies
    assert doc["lines"][0]["quantity"] == 4

    async def unparked() -> bool:
        return await parked(h, order.order_id) is None

    await eventually(unparked, what="the stream to be unparked once its held events applied")
