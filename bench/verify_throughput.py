"""`python -m bench.verify_throughput`: how fast `cqrs verify` audits a store of 100,000 events.

Builds the store through the real write path: events appended with the event store's batch append (events,
outbox rows and request log in one statement per batch), published by the outbox relay into JetStream and
projected into MongoDB by the projector (`python -m projector`, a separate process, stopped before the
measurement so nothing competes with verify). Then times `run_verify` (twice: cold and warm caches) and prints
events/s; the store must verify clean.

Servers come from CQRS_POSTGRES_DSN, CQRS_NATS_URL and CQRS_MONGO_URL when set; otherwise PostgreSQL, NATS and
the MongoDB-wire server are started on free loopback ports (as `bench/stack.py` does) in a temporary folder.
Everything this script creates (database, stream, Mongo database) has its own name and is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pymongo import AsyncMongoClient

from command_service.event_store import AppendRequest, RequestRecord, append_batch
from command_service.migrate import migrate
from command_service.relay import OutboxRelay, RelaySettings
from core.customer_events import CUSTOMER_STREAM_TYPE, CustomerRegistered
from core.envelope import EventMetadata
from core.events import Event
from core.order_events import (
    ORDER_STREAM_TYPE,
    OrderCreated,
    OrderItemAdded,
    OrderItemQuantityChanged,
    OrderPlaced,
)
from core.values import Address
from cqrsctl.verify import VerifyConfig, VerifyResult, run_verify
from localservers import MongoServer, NatsServer, PostgresServer, ServerProcess, ServiceProcess, free_port, stop_all

ORDERS_PER_CUSTOMER = 50
APPENDS_PER_STATEMENT = 500
PROJECTION_TIMEOUT_SECONDS = 1800.0
ADDRESS = Address("Ada Lovelace", "1 Analytical Way", "", "London", "N1", "GB")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Servers:
    postgres_dsn: str
    nats_url: str
    mongo_url: str


@contextlib.contextmanager
def servers() -> Iterator[Servers]:
    """The servers from the environment, or local ones started (and stopped) here."""
    env = os.environ
    started: list[ServerProcess] = []
    with tempfile.TemporaryDirectory(prefix="cqrs-verify-bench-") as tmp:
        workdir = Path(tmp)
        try:
            dsn = env.get("CQRS_POSTGRES_DSN")
            if not dsn:
                pg = PostgresServer(workdir / "postgres", free_port())
                started.append(pg)
                pg.start(timeout=90)
                dsn = pg.dsn
            nats_url = env.get("CQRS_NATS_URL")
            if not nats_url:
                ns = NatsServer(workdir / "nats", free_port())
                started.append(ns)
                ns.start(timeout=90)
                nats_url = ns.url
            mongo_url = env.get("CQRS_MONGO_URL")
            if not mongo_url:
                ms = MongoServer(workdir / "mongo", free_port())
                started.append(ms)
                ms.start(timeout=90)
                mongo_url = ms.url
            yield Servers(dsn, nats_url, mongo_url)
        finally:
            stop_all(list(reversed(started)))


def with_database(dsn: str, database: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit((parts.scheme, parts.netloc, f"/{database}", parts.query, parts.fragment))


def workload(events: int) -> Iterator[AppendRequest]:
    """Customers (1 event) each with `ORDERS_PER_CUSTOMER` placed orders (5 events), up to `events` events."""
    meta = EventMetadata("bench", "bench", "bench")
    written = 0
    while written < events:
        customer_id = str(uuid.uuid4())
        registered = CustomerRegistered(customer_id, "Customer", f"{customer_id}@example.com")
        yield _append(CUSTOMER_STREAM_TYPE, customer_id, [registered], meta)
        written += 1
        for _ in range(ORDERS_PER_CUSTOMER):
            if written >= events:
                return
            order_id = str(uuid.uuid4())
            order: list[Event] = [
                OrderCreated(order_id, customer_id, "EUR", ADDRESS),
                OrderItemAdded("SKU-1", "Anvil", 2, 1250),
                OrderItemAdded("SKU-2", "Rope", 1, 300),
                OrderItemQuantityChanged("SKU-1", 3),
                OrderPlaced(),
            ][: events - written]
            yield _append(ORDER_STREAM_TYPE, order_id, order, meta)
            written += len(order)


def _append(stream_type: str, stream_id: str, events: list[Event], meta: EventMetadata) -> AppendRequest:
    request_id = str(uuid.uuid4())
    return AppendRequest(
        stream_type, stream_id, 0, tuple(events), meta, RequestRecord(request_id, "Bench", request_id), 0
    )


async def fill_event_store(dsn: str, events: int) -> int:
    """Appends the workload in batches through the event store's batch append; returns the events written."""
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        batch: list[AppendRequest] = []
        for append in workload(events):
            batch.append(append)
            if len(batch) >= APPENDS_PER_STATEMENT:
                await append_batch(conn, batch, timeout=120)
                batch = []
        if batch:
            await append_batch(conn, batch, timeout=120)
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


async def relay_everything(dsn: str, nats_url: str, stream: str, prefix: str) -> None:
    relay = OutboxRelay(dsn, nats_url, RelaySettings(stream, prefix, batch_size=2000, poll_interval=0.2))
    task = asyncio.create_task(relay.run())
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        while await conn.fetchval("SELECT count(*) FROM outbox", timeout=10):
            if task.done():
                task.result()
                raise RuntimeError("the relay stopped")
            await asyncio.sleep(0.5)
    finally:
        await conn.close()
        relay.stop()
        await asyncio.wait_for(task, timeout=30)


async def project_everything(servers: Servers, database: str, stream: str, prefix: str, streams: int) -> float:
    """Runs `python -m projector` until every stream has its checkpoint; returns the seconds it took."""
    env = dict(os.environ)
    env.update(
        {
            "CQRS_NATS_URL": servers.nats_url, "CQRS_MONGO_URL": servers.mongo_url, "CQRS_MONGO_DATABASE": database,
            "CQRS_STREAM_NAME": stream, "CQRS_SUBJECT_PREFIX": prefix, "CQRS_PROJECTOR_DURABLE": f"{database}-proj",
            "CQRS_PROJECTOR_BATCH_SIZE": "500", "CQRS_LOG_LEVEL": "WARNING",
        }
    )  # fmt: skip
    env.pop("CQRS_PROJECTOR_METRICS_PORT", None)
    started = time.monotonic()
    projector = ServiceProcess("projector")
    projector.start(env)
    mongo: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(servers.mongo_url, serverSelectionTimeoutMS=5000)
    try:
        checkpoints = mongo[database]["checkpoints"]
        while (done := await checkpoints.count_documents({}, maxTimeMS=30_000)) < streams:
            if projector.returncode is not None:
                raise RuntimeError(f"the projector exited with {projector.returncode}")
            if time.monotonic() - started > PROJECTION_TIMEOUT_SECONDS:
                raise TimeoutError(f"projection not done after {PROJECTION_TIMEOUT_SECONDS:.0f}s ({done}/{streams})")
            say(f"  projected {done:,}/{streams:,} streams")
            await asyncio.sleep(5)
        # The last checkpoints are written after the documents and views: let the final batches finish.
        await asyncio.sleep(2)
        return time.monotonic() - started
    finally:
        await mongo.close()
        await projector.async_stop(timeout=30)


async def raw_reads(config: VerifyConfig) -> dict[str, float]:
    """Seconds to merely read each source once, no checking (the floor verify is compared with): every event
    row from PostgreSQL, every message from JetStream, every document and checkpoint from MongoDB (sorted)."""
    out: dict[str, float] = {}
    t = time.monotonic()
    conn = await asyncpg.connect(config.postgres_dsn, timeout=10)
    try:
        after = 0
        while rows := await conn.fetch(
            "SELECT position, payload::text, metadata::text FROM events WHERE position > $1 ORDER BY position "
            "LIMIT 5000", after, timeout=60,
        ):  # fmt: skip
            after = int(rows[-1]["position"])
    finally:
        await conn.close()
    out["postgres"] = time.monotonic() - t
    t = time.monotonic()
    nc = await nats.connect(config.nats_url, connect_timeout=5)
    try:
        js = nc.jetstream(timeout=30)
        sub = await js.pull_subscribe(
            f"{config.subject_prefix}.>", stream=config.stream_name,
            config=ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL, mem_storage=True),
        )  # fmt: skip
        while True:
            try:
                msgs = await sub.fetch(config.batch_size, timeout=2)
            except (nats.errors.TimeoutError, TimeoutError):
                break
            if not msgs or msgs[-1].metadata.num_pending == 0:
                break
        await sub.unsubscribe()
    finally:
        await nc.close()
    out["jetstream"] = time.monotonic() - t
    t = time.monotonic()
    mongo: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(config.mongo_url, serverSelectionTimeoutMS=5000)
    try:
        for collection in ("orders", "customers", "checkpoints"):
            cursor = mongo[config.mongo_database][collection].find({}).sort("_id", 1).batch_size(config.batch_size)
            async for _ in cursor:
                pass
    finally:
        await mongo.close()
    out["mongodb"] = time.monotonic() - t
    return out


async def run(events: int, settle_seconds: float, batch_size: int) -> int:
    name = f"vb{uuid.uuid4().hex[:10]}"
    stream, prefix = name.upper(), f"{name}.events"
    with servers() as s:
        admin = await asyncpg.connect(s.postgres_dsn, timeout=10)
        try:
            await admin.execute(f'CREATE DATABASE "{name}"')
        finally:
            await admin.close()
        dsn = with_database(s.postgres_dsn, name)
        try:
            await migrate(dsn)
            t = time.monotonic()
            written = await fill_event_store(dsn, events)
            say(f"appended {written:,} events in {time.monotonic() - t:.1f}s")
            t = time.monotonic()
            await relay_everything(dsn, s.nats_url, stream, prefix)
            say(f"relayed them to JetStream in {time.monotonic() - t:.1f}s")
            conn = await asyncpg.connect(dsn, timeout=10)
            try:
                streams = int(await conn.fetchval("SELECT count(*) FROM events WHERE version = 1"))
            finally:
                await conn.close()
            seconds = await project_everything(s, name, stream, prefix, streams)
            say(f"projected {streams:,} streams in {seconds:.1f}s; projector stopped")
            config = VerifyConfig(
                postgres_dsn=dsn, nats_url=s.nats_url, mongo_url=s.mongo_url, mongo_database=name,
                stream_name=stream, subject_prefix=prefix, settle_seconds=settle_seconds, batch_size=batch_size,
                timeout_seconds=60.0,
            )  # fmt: skip
            results: list[VerifyResult] = []
            for attempt in ("cold", "warm"):
                result = await run_verify(config, progress=True)
                results.append(result)
                say(
                    f"verify ({attempt}): {result.events_checked:,} events, {result.documents_checked:,} documents, "
                    f"{result.messages_checked:,} messages in {result.elapsed_seconds:.1f}s = "
                    f"{result.events_per_second:,.0f} events/s; clean={result.clean} ({result.counts()}); "
                    f"phases {result.phase_seconds}"
                )
            peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            best = max(results, key=lambda r: r.events_per_second)
            raw = await raw_reads(config)
            floor = raw["jetstream"] + raw["postgres"] + raw["mongodb"]
            say(
                "reading the sources alone: " + ", ".join(f"{k} {v:.1f}s" for k, v in raw.items())
                + f" = {floor:.1f}s in a row ({best.events_checked / floor:,.0f} events/s)"
            )  # fmt: skip
            print(
                f"verify throughput: {best.events_per_second:,.0f} events/s "
                f"({best.events_checked:,} events, {best.documents_checked:,} documents, "
                f"{best.messages_checked:,} stream messages in {best.elapsed_seconds:.1f}s; batch size {batch_size}; "
                f"peak RSS of this process {peak_mb:.0f} MB); {best.elapsed_seconds / floor:.2f}x the time it takes "
                f"to merely read PostgreSQL, JetStream and MongoDB one after the other ({floor:.1f}s)"
            )
            return 0 if all(r.clean for r in results) else 1
        finally:
            with contextlib.suppress(Exception):
                nc = await nats.connect(s.nats_url, connect_timeout=5)
                await nc.jetstream().delete_stream(stream)
                await nc.close()
            mongo: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(s.mongo_url, serverSelectionTimeoutMS=5000)
            with contextlib.suppress(Exception):
                await mongo.drop_database(name)
            await mongo.close()
            with contextlib.suppress(Exception):
                admin = await asyncpg.connect(s.postgres_dsn, timeout=10)
                await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
                await admin.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=100_000, help="events in the store (default 100000)")
    parser.add_argument("--batch-size", type=int, default=500, help="verify's batch size (default 500)")
    parser.add_argument("--settle-seconds", type=float, default=30.0)
    args = parser.parse_args(argv)
    return asyncio.run(run(args.events, args.settle_seconds, args.batch_size))


if __name__ == "__main__":
    sys.exit(main())
