"""`cqrs dead-letters` against real servers: a poison event parks its stream (later events wait behind it, other
streams flow), and an operator lists it, retries it from PostgreSQL, or skips the poison event.

The events are written to a migrated PostgreSQL event store (as the command service would) and published to
JetStream (as the relay would); a corrupted JetStream copy or an event the projection rejects is the poison.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace

import asyncpg
import pytest

from core.envelope import HEADER_STREAM_ID, HEADER_VERSION, RecordedEvent
from core.events import Event
from core.order_events import OrderCreated, OrderItemAdded, OrderItemRemoved, OrderPlaced
from core.subjects import event_subject
from cqrsctl.main import main
from tests.integration import test_projector
from tests.integration.test_projector import ADDRESS, Doc, Harness, Stream, new_order_id
from tests.support import eventually

harness_factory = test_projector.harness_factory

INSERT = """
INSERT INTO events (event_id, stream_type, stream_id, version, event_type, schema_version, payload, metadata,
                    recorded_at)
VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9) RETURNING position
"""


class Store:
    """Appends a stream's events to PostgreSQL, then publishes them (or a corrupted copy) to JetStream."""

    def __init__(self, h: Harness, conn: asyncpg.Connection) -> None:
        self.h = h
        self.conn = conn

    async def append(self, stream: Stream, event: Event, *, corrupt_copy: bool = False) -> RecordedEvent:
        recorded = stream.record(event, len(stream.published) + 1, 1)
        position = await self.conn.fetchval(
            INSERT,
            recorded.event_id,
            recorded.stream_type,
            recorded.stream_id,
            recorded.version,
            recorded.event_type,
            recorded.schema_version,
            json.dumps(recorded.payload),
            json.dumps(recorded.metadata.to_dict()),
            recorded.recorded_at,
        )
        recorded = replace(recorded, position=position)
        stream.published.append(recorded)
        if corrupt_copy:  # the JetStream copy is damaged; PostgreSQL has the event intact
            subject = event_subject(recorded.stream_type, recorded.stream_id, self.h.settings.subject_prefix)
            headers = {HEADER_STREAM_ID: recorded.stream_id, HEADER_VERSION: str(recorded.version)}
            await self.h.js.publish(subject, b"\x00garbled in transit" + recorded.to_json()[:20], headers=headers)
        else:
            await self.h.publish(recorded)
        return recorded


async def cli(h: Harness, dsn: str, *args: str) -> int:
    """Runs `cqrs dead-letters ...` as an operator would (in a thread: it runs its own event loop)."""
    argv = [
        "dead-letters",
        "--mongo-url",
        h.settings.mongo_url,
        "--mongo-database",
        h.settings.mongo_database,
        "--dsn",
        dsn,
        *args,
    ]
    return await asyncio.to_thread(main, argv)


async def park_of(h: Harness, stream_id: str) -> Doc | None:
    doc = await h.db["checkpoints"].find_one({"_id": stream_id, "parked": {"$exists": True}})
    return None if doc is None else dict(doc["parked"])


async def checkpoint_version(h: Harness, stream_id: str) -> int:
    doc = await h.db["checkpoints"].find_one({"_id": stream_id})
    return 0 if doc is None else int(doc["version"])


async def test_a_parked_stream_is_listed_and_resumed_by_retry_from_postgres(
    harness_factory: Callable[..., Awaitable[Harness]], event_store_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    h = await harness_factory()
    projector = await h.start_projector()
    conn = await asyncpg.connect(event_store_dsn)
    try:
        store = Store(h, conn)
        damaged = Stream(new_order_id())
        await store.append(damaged, OrderCreated(damaged.order_id, "cust-d", "EUR", ADDRESS))
        await h.order_at(damaged.order_id, 1)
        await store.append(damaged, OrderItemAdded("SKU-A", "Anvil", 2, 150), corrupt_copy=True)
        await store.append(damaged, OrderPlaced())  # waits behind v2, never applied out of order

        park = await eventually(lambda: park_of(h, damaged.order_id), what="the damaged stream to park")
        assert (park["kind"], park["version"]) == ("poison", 2)
        healthy = Stream(new_order_id())
        await store.append(healthy, OrderCreated(healthy.order_id, "cust-h", "EUR", ADDRESS))
        await store.append(healthy, OrderItemAdded("SKU-B", "Bell", 1, 99))
        await h.order_at(healthy.order_id, 2)
        await h.settled("the parked stream holds no JetStream slot")
        doc = await h.order(damaged.order_id)
        assert doc is not None and (doc["version"], doc["status"]) == (1, "DRAFT")
        assert await checkpoint_version(h, damaged.order_id) == 1

        registry = projector.metrics.registry

        async def gauge(value: int) -> bool:
            return registry.get_sample_value("cqrs_projector_parked_streams", {"kind": "poison"}) == value

        await eventually(lambda: gauge(1), what="the parked-streams gauge at 1")

        capsys.readouterr()
        assert await cli(h, event_store_dsn, "list") == 0
        listing = capsys.readouterr().out
        assert damaged.order_id in listing and "poison" in listing and healthy.order_id not in listing
        assert await cli(h, event_store_dsn, "list", "--json") == 0
        [row] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert (row["stream_id"], row["version"], row["held"]) == (damaged.order_id, 2, 2)
        assert await cli(h, event_store_dsn, "show", damaged.order_id) == 0
        shown = json.loads(capsys.readouterr().out)
        assert [held["version"] for held in shown["held"]] == [2, 3]

        assert await cli(h, event_store_dsn, "retry", damaged.order_id) == 0
        assert "resumed at version 3" in capsys.readouterr().out
        doc = await h.order(damaged.order_id)
        assert doc is not None and (doc["version"], doc["status"], doc["total_minor"]) == (3, "PLACED", 300)
        assert await park_of(h, damaged.order_id) is None
        assert await checkpoint_version(h, damaged.order_id) == 3
        assert await h.db["parked_events"].count_documents({"stream_id": damaged.order_id}) == 0
        await eventually(lambda: gauge(0), what="the parked-streams gauge back at 0")
        assert await cli(h, event_store_dsn, "retry", damaged.order_id) == 2  # not parked any more
    finally:
        await conn.close()


async def test_skip_moves_past_the_poison_event_and_applies_the_rest(
    harness_factory: Callable[..., Awaitable[Harness]], event_store_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    h = await harness_factory()
    await h.start_projector()
    conn = await asyncpg.connect(event_store_dsn)
    try:
        store = Store(h, conn)
        order = Stream(new_order_id())
        await store.append(order, OrderCreated(order.order_id, "cust-k", "EUR", ADDRESS))
        await store.append(order, OrderItemRemoved("no-such-line"))  # the projection rejects it: no such line
        await store.append(order, OrderItemAdded("SKU-C", "Chain", 3, 40))
        park = await eventually(lambda: park_of(h, order.order_id), what="the stream to park at the rejected event")
        assert (park["kind"], park["version"]) == ("poison", 2) and "no line" in park["reason"]

        # Retrying while the cause persists leaves it parked (same event, same reason); nothing is skipped.
        assert await cli(h, event_store_dsn, "retry", order.order_id) == 1
        assert "still parked at version 1" in capsys.readouterr().out
        assert (await park_of(h, order.order_id) or {}).get("version") == 2

        other = Stream(new_order_id())
        await store.append(other, OrderCreated(other.order_id, "cust-k", "EUR", ADDRESS))
        await h.order_at(other.order_id, 1)  # other streams flow meanwhile

        assert await cli(h, event_store_dsn, "skip", order.order_id, "--version", "3") == 2  # wrong version
        assert await cli(h, event_store_dsn, "skip", order.order_id, "--version", "2", "--note", "bad data") == 0
        doc = await h.order(order.order_id)
        assert doc is not None and doc["version"] == 3
        assert [line["sku"] for line in doc["lines"]] == ["SKU-C"] and doc["total_minor"] == 120
        assert await park_of(h, order.order_id) is None
        assert await checkpoint_version(h, order.order_id) == 3
        [skipped] = await h.db["skipped_events"].find({"stream_id": order.order_id}).to_list()
        assert (skipped["version"], skipped["event_type"], skipped["note"]) == (2, "OrderItemRemoved", "bad data")

        await store.append(order, OrderPlaced())  # and the stream flows again
        doc = await h.order_at(order.order_id, 4)
        assert doc["status"] == "PLACED"
        await h.settled("everything applied after the skip")
    finally:
        await conn.close()
