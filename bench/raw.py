"""Physical limits of the three servers in use, measured with the same drivers our services use.

* PostgreSQL (asyncpg): single-row INSERT + COMMIT at 32 connections (`synchronous_commit` on, checked), and
  batched inserts (COPY, 1,000 rows per transaction). Rows are shaped like our `events` rows (uuid, stream id,
  version, type, jsonb payload, timestamp, `UNIQUE (stream_id, version)`) in a table of their own database.
* NATS JetStream (nats-py): `publish_async` with acks, up to 4,000 in flight (the client's default window), to a
  file-storage stream configured exactly like our event stream, with `Nats-Msg-Id` headers (dedupe on); and a
  durable pull consumer taking stored events as the projector does (its client class, batches of 200, one ack a
  message), doing nothing with them: what receiving an event costs before any work of ours.
* MongoDB (PyMongo's AsyncMongoClient): unordered bulk upserts of 200 order-shaped documents (the projector's
  batch size) with the projector's filters, on a collection with the `orders` indexes; and `find_one` by id as
  the query service reads an order (`_id` alone, without the change log), from 32 concurrent callers.

Each also records its CPU cost (`bench.cpu`): this process's as the client, and the server's (`servers`: name ->
PIDs of the server processes) over the timed part only.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

import asyncpg
import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pymongo import ASCENDING, AsyncMongoClient, IndexModel, UpdateOne

from bench import cpu
from core.envelope import EventMetadata, RecordedEvent
from core.jetstream import ensure_stream, event_stream_config
from core.projections.orders import INDEXES as ORDER_INDEXES
from core.subjects import event_subject
from projector.config import ProjectorSettings
from projector.nats_client import ProjectorNatsClient
from query_service.read_model import WITHOUT_HISTORY

Servers = Mapping[str, Sequence[int]]  # name -> PIDs of a server's processes, whose CPU a measurement records

RAW_TABLE = """
CREATE TABLE IF NOT EXISTS raw_events (
    position    bigserial PRIMARY KEY,
    event_id    uuid NOT NULL,
    stream_id   text NOT NULL,
    version     integer NOT NULL,
    event_type  text NOT NULL,
    payload     jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    UNIQUE (stream_id, version))
"""

# About the size of an OrderItemAdded payload.
PAYLOAD = json.dumps({"sku": "SKU-000123", "name": "A thing worth buying", "quantity": 2, "unit_price_minor": 1999})


async def create_database(admin_dsn: str, name: str) -> str:
    """Create database `name` (dropping an older one) on the server of `admin_dsn`; return its DSN."""
    conn = await asyncpg.connect(admin_dsn)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base, _, _ = admin_dsn.rpartition("/")
    return f"{base}/{name}"


async def postgres_version(dsn: str) -> str:
    conn = await asyncpg.connect(dsn)
    try:
        return str(await conn.fetchval("SHOW server_version"))
    finally:
        await conn.close()


async def pg_single_row_commits(
    dsn: str, connections: int, duration: float, servers: Servers | None = None
) -> dict[str, Any]:
    """Each connection INSERTs one row per implicit transaction (one durable commit per row) until the deadline."""
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    try:
        await pool.execute(RAW_TABLE)
        sync_commit = await pool.fetchval("SHOW synchronous_commit")
        counts = [0] * connections
        deadline = time.monotonic() + duration

        async def writer(i: int) -> None:
            async with pool.acquire() as conn:
                while time.monotonic() < deadline:
                    await conn.execute(
                        "INSERT INTO raw_events (event_id, stream_id, version, event_type, payload) "
                        "VALUES ($1, $2, 1, 'RawEvent', $3::jsonb)",
                        uuid.uuid4(),
                        str(uuid.uuid4()),
                        PAYLOAD,
                    )
                    counts[i] += 1

        with cpu.window(servers or {}) as spent:
            started = time.monotonic()
            await asyncio.gather(*(writer(i) for i in range(connections)))
            elapsed = time.monotonic() - started
    finally:
        await pool.close()
    return {"rate": sum(counts) / elapsed, "rows": sum(counts), "synchronous_commit": sync_commit,
            "cpu": spent.figures(sum(counts), "commits")}  # fmt: skip


async def pg_batched_inserts(dsn: str, connections: int, batch: int, duration: float) -> dict[str, Any]:
    """Each connection COPYs `batch` rows per transaction until the deadline; returns rows/s."""
    pool = await asyncpg.create_pool(dsn, min_size=connections, max_size=connections)
    try:
        await pool.execute(RAW_TABLE)
        counts = [0] * connections
        deadline = time.monotonic() + duration

        async def writer(i: int) -> None:
            async with pool.acquire() as conn:
                while time.monotonic() < deadline:
                    stream = str(uuid.uuid4())
                    records = [(uuid.uuid4(), stream, v + 1, "RawEvent", PAYLOAD) for v in range(batch)]
                    await conn.copy_records_to_table(
                        "raw_events",
                        records=records,
                        columns=["event_id", "stream_id", "version", "event_type", "payload"],
                    )
                    counts[i] += batch

        started = time.monotonic()
        await asyncio.gather(*(writer(i) for i in range(connections)))
        elapsed = time.monotonic() - started
    finally:
        await pool.close()
    return {"rate": sum(counts) / elapsed, "rows": sum(counts)}


async def jetstream_publish(url: str, duration: float, servers: Servers | None = None) -> dict[str, Any]:
    """Concurrent `publish_async` with acks to a stream configured like ours; acked messages/s."""
    nc = await nats.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream(publish_async_max_pending=4000)
        await ensure_stream(js, event_stream_config("BENCH_RAW", "bench.raw"))
        body = json.dumps({"event_type": "RawEvent", "payload": json.loads(PAYLOAD), "pad": "x" * 200}).encode()
        acked = 0
        failed = 0

        def done(fut: asyncio.Future[Any]) -> None:
            nonlocal acked, failed
            if fut.cancelled() or fut.exception() is not None:
                failed += 1
            else:
                acked += 1

        streams = [str(uuid.uuid4()) for _ in range(1000)]
        with cpu.window(servers or {}) as spent:
            started = time.monotonic()
            deadline = started + duration
            sent = 0
            while time.monotonic() < deadline:
                fut = await js.publish_async(
                    f"bench.raw.order.{streams[sent % len(streams)]}",
                    body,
                    headers={"Nats-Msg-Id": str(uuid.uuid4())},
                )
                fut.add_done_callback(done)
                sent += 1
            await asyncio.wait_for(js.publish_async_completed(), timeout=30)
            elapsed = time.monotonic() - started
        version = nc.connected_server_version
        server_version = f"{version.major}.{version.minor}.{version.patch}"
    finally:
        await nc.close()
    return {"rate": acked / elapsed, "acked": acked, "failed": failed, "server_version": str(server_version),
            "cpu": spent.figures(acked, "messages")}  # fmt: skip


# The projector's defaults (CQRS_PROJECTOR_BATCH_SIZE, CQRS_PROJECTOR_MAX_ACK_PENDING), read from its settings.
CONSUME_BATCH: int = ProjectorSettings.model_fields["projector_batch_size"].default
CONSUME_MAX_ACK_PENDING: int = ProjectorSettings.model_fields["projector_max_ack_pending"].default


def relayed_event(stream_id: str, version: int, position: int) -> RecordedEvent:
    """An OrderItemAdded as the relay publishes it: the same envelope body and headers."""
    return RecordedEvent(
        event_id=uuid.uuid4(),
        stream_type="order",
        stream_id=stream_id,
        version=version,
        event_type="OrderItemAdded",
        schema_version=1,
        payload=json.loads(PAYLOAD),
        metadata=EventMetadata(f"req-{uuid.uuid4().hex}", str(uuid.uuid4()), f"req-{uuid.uuid4().hex}"),
        position=position,
    )


async def jetstream_consume(url: str, messages: int, servers: Servers | None = None) -> dict[str, Any]:
    """Receives `messages` stored events through a durable pull consumer, as the projector does (its nats-py
    client class, `fetch` of up to 200, an explicit ack a message), and does nothing else with them; messages/s.

    The events (bodies and headers as the relay sends them, 100 interleaved streams) are published first, untimed.
    """
    prefix, stream = "bench.consume", "BENCH_RAW_CONSUME"
    nc = ProjectorNatsClient()
    await nc.connect(url, connect_timeout=5)
    try:
        js = nc.jetstream(publish_async_max_pending=4000)
        await ensure_stream(js, event_stream_config(stream, prefix))
        streams = [str(uuid.uuid4()) for _ in range(100)]
        for n in range(messages):
            event = relayed_event(streams[n % len(streams)], n // len(streams) + 1, n + 1)
            await js.publish_async(event_subject("order", event.stream_id, prefix), event.to_json(),
                                   headers=event.headers())  # fmt: skip
        await asyncio.wait_for(js.publish_async_completed(), timeout=60)
        sub = await js.pull_subscribe(
            f"{prefix}.>",
            durable="bench-raw-consume",
            stream=stream,
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, max_ack_pending=CONSUME_MAX_ACK_PENDING
            ),
        )
        received = 0
        with cpu.window(servers or {}) as spent:
            started = time.monotonic()
            while received < messages:
                batch = await sub.fetch(min(CONSUME_BATCH, messages - received), timeout=5)
                for msg in batch:
                    await msg.ack()
                received += len(batch)
            await nc.flush(timeout=10)  # the last acks reach the server inside the window
            elapsed = time.monotonic() - started
        await js.delete_stream(stream)
    finally:
        await nc.close()
    return {"rate": received / elapsed, "received": received, "cpu": spent.figures(received, "messages")}


def order_document(order_id: str, customer_id: str, version: int) -> dict[str, Any]:
    """A read-model `orders` document as the projector writes it (two lines, placed)."""
    now = datetime.now(UTC)
    lines = [
        {"sku": f"SKU-{i}", "name": "A thing worth buying", "quantity": 2, "unit_price_minor": 1999,
         "line_total_minor": 3998}
        for i in range(2)
    ]  # fmt: skip
    return {
        "order_id": order_id,
        "customer_id": customer_id,
        "status": "PLACED",
        "currency": "EUR",
        "lines": lines,
        "total_minor": 7996,
        "shipping_address": {"recipient": "Ada Lovelace", "line1": "12 Analytical St", "line2": "",
                             "city": "London", "postal_code": "N1 9GU", "country": "GB"},
        "cancel_reason": "",
        "created_at": now,
        "updated_at": now,
        "placed_at": now,
        "version": version,
        "position": random.randint(1, 10**9),
        "deleted": False,
    }  # fmt: skip


async def mongo_rates(
    url: str, duration: float, batch: int, find_callers: int, servers: Servers | None = None
) -> dict[str, Any]:
    """Bulk-upsert rate (ops/s: half creates, half version-guarded updates) and find_one rate (finds/s)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url, tz_aware=True, maxPoolSize=100)
    try:
        db = client["bench_raw"]
        await db.drop_collection("orders")
        orders = db["orders"]
        await orders.create_indexes(
            [IndexModel([(key, ASCENDING if order >= 0 else -1) for key, order in keys]) for keys in ORDER_INDEXES]
        )
        info = await client.server_info()
        customers = [str(uuid.uuid4()) for _ in range(50)]

        # Bulk upserts, one bulk_write in flight at a time like the projector: create a batch of new documents
        # (filter `version: {$exists: false}`, upsert), then move the same documents from v1 to v2 (filter
        # `version: 1`, upsert), and so on.
        ops_done = 0
        ids: list[str] = []
        with cpu.window(servers or {}) as upserts_cpu:
            started = time.monotonic()
            deadline = started + duration
            while time.monotonic() < deadline:
                new_ids = [str(uuid.uuid4()) for _ in range(batch)]
                creates = [
                    UpdateOne(
                        {"_id": i, "version": {"$exists": False}},
                        {"$set": order_document(i, random.choice(customers), 1)},
                        upsert=True,
                    )
                    for i in new_ids
                ]
                await orders.bulk_write(creates, ordered=False)
                ops_done += len(creates)
                updates = [
                    UpdateOne({"_id": i, "version": 1}, {"$set": order_document(i, random.choice(customers), 2)},
                              upsert=True)
                    for i in new_ids
                ]  # fmt: skip
                await orders.bulk_write(updates, ordered=False)
                ops_done += len(updates)
                ids += new_ids
            upsert_elapsed = time.monotonic() - started

        # find_one by id as the query service reads an order, from concurrent callers on one client.
        finds = [0] * find_callers
        deadline = time.monotonic() + duration

        async def finder(k: int) -> None:
            while time.monotonic() < deadline:
                doc = await orders.find_one({"_id": random.choice(ids)}, WITHOUT_HISTORY)
                if doc is None or doc.get("deleted") is True:
                    raise RuntimeError(f"the bench's order {doc} is missing or deleted")
                finds[k] += 1

        with cpu.window(servers or {}) as finds_cpu:
            started = time.monotonic()
            await asyncio.gather(*(finder(k) for k in range(find_callers)))
            find_elapsed = time.monotonic() - started
        await db.drop_collection("orders")
    finally:
        await client.close()
    return {
        "bulk_upsert_rate": ops_done / upsert_elapsed,
        "bulk_upserts": ops_done,
        "find_rate": sum(finds) / find_elapsed,
        "finds": sum(finds),
        "server_version": str(info.get("version", "?")),
        "cpu_upsert": upserts_cpu.figures(ops_done, "upserts"),
        "cpu_find": finds_cpu.figures(sum(finds), "finds"),
    }
