"""Outbox relay against real PostgreSQL and nats-server: ordering, late commits, outages, single active relay."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import asyncpg
import nats
import pytest
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry

from command_service.domain import commands as cmd
from command_service.event_store import AppendRequest, EventStore, RequestRecord, append_in_transaction
from command_service.handlers import CommandContext, CommandHandler, order_handler
from command_service.relay import OutboxRelay, RelaySettings
from core.envelope import HEADER_MSG_ID, EventMetadata, RecordedEvent
from core.order_events import OrderItemAdded
from core.subjects import parse_event_subject
from core.values import Address
from localservers import NatsHandle
from tests.support import eventually, registered_customer

ADDRESS = Address("Ada", "1 Main St", "", "London", "N1", "GB")


def settings(name: str) -> RelaySettings:
    return RelaySettings(
        stream_name=name.upper(),
        subject_prefix=f"{name}.events",
        poll_interval=0.2,
        publish_timeout=1.0,
        max_backoff=0.5,
    )


@contextlib.asynccontextmanager
async def running_relay(
    dsn: str, nats_url: str, relay_settings: RelaySettings, registry: CollectorRegistry | None = None
) -> AsyncIterator[OutboxRelay]:
    relay = OutboxRelay(dsn, nats_url, relay_settings, registry=registry)
    task = asyncio.create_task(relay.run())
    try:
        yield relay
    finally:
        relay.stop()
        await asyncio.wait_for(task, timeout=15)


async def stream_messages(nats_url: str, stream: str) -> list[tuple[str, str, RecordedEvent]]:
    """Every message in the stream as (Nats-Msg-Id, subject, decoded event), in stream order."""
    nc = await nats.connect(nats_url, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=2)
        try:
            info = await js.stream_info(stream)
        except NotFoundError:
            return []
        out: list[tuple[str, str, RecordedEvent]] = []
        if info.state.messages == 0:
            return out
        for seq in range(info.state.first_seq, info.state.last_seq + 1):
            msg = await js.get_msg(stream, seq)
            assert msg.headers is not None and msg.data is not None and msg.subject is not None
            out.append((msg.headers[HEADER_MSG_ID], msg.subject, RecordedEvent.from_json(msg.data)))
        return out
    finally:
        await nc.close()


async def stream_events(nats_url: str, stream: str) -> list[tuple[str, RecordedEvent]]:
    return [(msg_id, event) for msg_id, _, event in await stream_messages(nats_url, stream)]


async def outbox_size(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM outbox"))


def one_event_append(stream_id: str, meta: EventMetadata) -> AppendRequest:
    return AppendRequest(
        stream_type="order",
        stream_id=stream_id,
        expected_version=0,
        events=(OrderItemAdded("A", "a", 1, 1),),
        metadata=meta,
        request=RequestRecord(str(uuid.uuid4()), "Test", "h"),
        last_position=0,
    )


def ctx() -> CommandContext:
    rid = str(uuid.uuid4())
    return CommandContext(request_id=rid, request_hash=rid)


async def run_commands(handler: CommandHandler[Any, cmd.OrderCommand], orders: int, items: int) -> list[str]:
    """Registers one customer (1 event), then writes `orders` orders of 1 + `items` events each."""
    customer_id = await registered_customer(handler.store)
    order_ids = []
    for _ in range(orders):
        order_id = str(uuid.uuid4())
        await handler.handle(cmd.CreateOrder(order_id, customer_id, "EUR", ADDRESS), ctx())
        for i in range(items):
            await handler.handle(cmd.AddOrderItem(order_id, f"SKU-{i}", "x", 1, 100), ctx())
        order_ids.append(order_id)
    return order_ids


async def test_relay_publishes_every_event_once_in_per_stream_order_then_empties_outbox(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, unique_name: str
) -> None:
    # No publish may fail here, so the publish timeout is a production-like 5 s: the tests' 1 s (short for the
    # outage tests) can run out on a loaded machine with nothing wrong, and would count a `publish_batch` error.
    relay_settings = dataclasses.replace(settings(unique_name), publish_timeout=5.0)
    registry = CollectorRegistry()
    handler = order_handler(EventStore(pg_pool, registry=registry))
    async with running_relay(event_store_dsn, nats_url, relay_settings, registry):
        order_ids = await run_commands(handler, orders=5, items=4)
        await eventually(lambda: _is_zero(outbox_size(pg_pool)), what="the outbox to drain")
        assert registry.get_sample_value("cqrs_relay_active") == 1  # it holds the lease (alerting counts these)
    assert registry.get_sample_value("cqrs_relay_active") == 0  # stopped: it no longer relays
    # Not `outbox_delete`: with commits this close together every batch's delete can ride on the next read (the
    # last one's too, when a commit's NOTIFY arrives after the read that already took its rows), so the relay may
    # never delete on its own here; the test of the delete below times that one.
    for dependency, operation in (
        ("postgres", "append"),
        ("postgres", "outbox_fetch"),
        ("nats", "publish_batch"),
    ):
        labels = {"dependency": dependency, "operation": operation}
        assert (registry.get_sample_value("cqrs_dependency_call_seconds_count", labels) or 0) >= 1, labels
    nats_errors = {"dependency": "nats", "operation": "publish_batch"}
    assert not registry.get_sample_value("cqrs_dependency_call_errors_total", nats_errors)
    published = await stream_messages(nats_url, relay_settings.stream_name)
    assert len(published) == 26
    assert len({msg_id for msg_id, _, _ in published}) == 26
    for order_id in order_ids:
        versions = [e.version for _, _, e in published if e.stream_id == order_id]
        assert versions == [1, 2, 3, 4, 5]
    partitions: dict[str, set[int | None]] = {}
    for msg_id, subject, event in published:
        assert msg_id == str(event.event_id)
        # Published on `<prefix>.<type>.<id>`, stored by the stream's mapping as `<prefix>.<partition>.<type>.<id>`.
        parsed = parse_event_subject(subject, relay_settings.subject_prefix)
        assert parsed is not None and (parsed.stream_type, parsed.stream_id) == (event.stream_type, event.stream_id)
        partitions.setdefault(event.stream_id, set()).add(parsed.partition)
    # Every event of an aggregate lands in one partition of the 8.
    assert all(len(found) == 1 and next(iter(found)) in range(8) for found in partitions.values()), partitions


async def test_transaction_committing_after_a_higher_position_is_still_published(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, unique_name: str
) -> None:
    relay_settings = settings(unique_name)
    meta = EventMetadata("r", "r", "r")
    slow = await asyncpg.connect(event_store_dsn)
    fast = await asyncpg.connect(event_store_dsn)
    try:
        async with running_relay(event_store_dsn, nats_url, relay_settings):
            slow_tx = slow.transaction()
            await slow_tx.start()
            low = await append_in_transaction(slow, one_event_append("stream-slow", meta), timeout=5)
            async with fast.transaction():
                high = await append_in_transaction(fast, one_event_append("stream-fast", meta), timeout=5)
            assert low.position < high.position
            await eventually(
                lambda: _positions(nats_url, relay_settings.stream_name, {high.position}),
                what="the later-position, earlier-committed event to be published",
            )
            await slow_tx.commit()
            await eventually(
                lambda: _positions(nats_url, relay_settings.stream_name, {low.position, high.position}),
                what="the lower-position event that committed last to be published too",
            )
            await eventually(lambda: _is_zero(outbox_size(pg_pool)), what="the outbox to drain")
    finally:
        await slow.close()
        await fast.close()


async def test_an_idle_relay_reads_the_outbox_once_per_commit_woken_by_its_notify_alone(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, unique_name: str
) -> None:
    """With polling out of the way, every commit is published promptly, a late commit of a lower position too,
    and each costs one outbox read: after a partial batch the relay waits for the next NOTIFY instead of reading
    the outbox again to find it empty."""
    relay_settings = dataclasses.replace(settings(unique_name), poll_interval=60.0)
    registry = CollectorRegistry()
    fetches = {"dependency": "postgres", "operation": "outbox_fetch"}
    meta = EventMetadata("r", "r", "r")
    slow = await asyncpg.connect(event_store_dsn)
    try:
        async with running_relay(event_store_dsn, nats_url, relay_settings, registry):
            before = await eventually(lambda: _count(registry, fetches), what="the relay's first (empty) outbox read")
            commits = 6
            for n in range(commits):
                async with pg_pool.acquire() as conn, conn.transaction():
                    await append_in_transaction(conn, one_event_append(f"stream-{n}", meta), timeout=5)
                await eventually(lambda: _is_zero(outbox_size(pg_pool)), what=f"commit {n} to be published", timeout=5)
            read = await _count(registry, fetches)
            assert read - before == commits, f"{read - before} outbox reads for {commits} commits"

            slow_tx = slow.transaction()
            await slow_tx.start()
            low = await append_in_transaction(slow, one_event_append("stream-slow", meta), timeout=5)
            async with pg_pool.acquire() as conn, conn.transaction():
                high = await append_in_transaction(conn, one_event_append("stream-fast", meta), timeout=5)
            await eventually(
                lambda: _published(nats_url, relay_settings.stream_name, {high.position}),
                what="the higher position committed first to be published",
                timeout=5,
            )
            await slow_tx.commit()
            await eventually(
                lambda: _published(nats_url, relay_settings.stream_name, {low.position, high.position}),
                what="the lower position that committed last to be published, woken by its NOTIFY",
                timeout=5,
            )
    finally:
        await slow.close()


async def test_a_published_batch_is_deleted_by_the_next_outbox_read_or_on_its_own_once_the_relay_is_idle(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, unique_name: str
) -> None:
    """A published batch's rows are deleted by the statement that reads the next batch when that read comes within
    the linger (one round trip per batch), by a delete of their own once it passes, and before the relay stops."""
    relay_settings = dataclasses.replace(settings(unique_name), poll_interval=60.0, delete_linger=3.0)
    registry = CollectorRegistry()
    deletes = {"dependency": "postgres", "operation": "outbox_delete"}
    fetches = {"dependency": "postgres", "operation": "outbox_fetch"}
    meta = EventMetadata("r", "r", "r")

    async def commit(stream_id: str) -> int:
        async with pg_pool.acquire() as conn, conn.transaction():
            return (await append_in_transaction(conn, one_event_append(stream_id, meta), timeout=5)).position

    async def outbox() -> list[int]:
        return [row["position"] for row in await pg_pool.fetch("SELECT position FROM outbox ORDER BY position")]

    async with running_relay(event_store_dsn, nats_url, relay_settings, registry) as relay:
        before = await eventually(lambda: _count(registry, fetches), what="the relay's first (empty) outbox read")
        first = await commit("stream-1")
        await eventually(lambda: _published(nats_url, relay_settings.stream_name, {first}), what="the first commit")
        assert await outbox() == [first], "published, its delete waits for the next read"
        second = await commit("stream-2")
        await eventually(lambda: _published(nats_url, relay_settings.stream_name, {second}), what="the second commit")
        assert await outbox() == [second], "the read of the second commit deleted the first"
        assert await _count(registry, fetches) - before == 2
        assert await _count(registry, deletes) == 0
        assert relay.published_total == 1

        await eventually(lambda: _is_zero(outbox_size(pg_pool)), what="the idle relay's own delete", timeout=10)
        assert await _count(registry, deletes) == 1
        # ... and timed as the relay's `delete` stage (the stages of time-to-queryable, `core.stage_metrics`).
        stage = relay.stages.registry.get_sample_value("cqrs_relay_stage_seconds_count", {"stage": "delete"})
        assert stage == 1
        assert await _count(registry, fetches) - before == 2, "no outbox read while idle"
        assert relay.published_total == 2

        third = await commit("stream-3")
        await eventually(lambda: _published(nats_url, relay_settings.stream_name, {third}), what="the third commit")
        assert await outbox() == [third]
    assert await outbox() == [], "a stopping relay deletes what it published"
    assert relay.published_total == 3


async def test_while_commits_keep_coming_the_relay_reads_once_per_fetch_interval_and_at_once_when_idle(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, unique_name: str
) -> None:
    """The fetch interval: commits that follow a read within the interval wait for it to pass and are read and
    published together; an idle relay reads a commit at once, and a full batch is followed at once by the next."""
    interval = 2.0
    relay_settings = dataclasses.replace(
        settings(unique_name), poll_interval=60.0, delete_linger=3.0, fetch_interval=interval, batch_size=3
    )
    registry = CollectorRegistry()
    fetches = {"dependency": "postgres", "operation": "outbox_fetch"}
    meta = EventMetadata("r", "r", "r")
    stream = relay_settings.stream_name

    async def commit(*stream_ids: str) -> set[int]:
        async with pg_pool.acquire() as conn, conn.transaction():
            return {
                (await append_in_transaction(conn, one_event_append(s, meta), timeout=5)).position for s in stream_ids
            }

    def publish_batches(relay: OutboxRelay) -> float:
        return relay.stages.registry.get_sample_value("cqrs_relay_stage_seconds_count", {"stage": "publish"}) or 0.0

    async with running_relay(event_store_dsn, nats_url, relay_settings, registry) as relay:
        before = await eventually(lambda: _count(registry, fetches), what="the relay's first (empty) outbox read")
        started = asyncio.get_running_loop().time()
        first = await commit("stream-0")
        await eventually(lambda: _published(nats_url, stream, first), what="the first commit", timeout=5)
        assert asyncio.get_running_loop().time() - started < interval, "an idle relay reads a commit at once"

        following: set[int] = set()
        for n in range(1, 3):  # one event each, inside the interval (fewer than a batch)
            following |= await commit(f"stream-{n}")
        read_by = asyncio.get_running_loop().time()
        await eventually(lambda: _published(nats_url, stream, following), what="the following commits", timeout=10)
        assert await _count(registry, fetches) - before == 2, "both commits of the interval came in one read"
        assert publish_batches(relay) == 2, "... and in one publish"
        assert asyncio.get_running_loop().time() - read_by > interval / 4, "they waited for the interval"

        await eventually(lambda: _is_zero(outbox_size(pg_pool)), what="the idle relay's own delete", timeout=10)
        reads = await _count(registry, fetches)
        started = asyncio.get_running_loop().time()
        backlog = await commit(*(f"backlog-{n}" for n in range(7)))  # one transaction, one NOTIFY: 3 + 3 + 1 rows
        await eventually(lambda: _published(nats_url, stream, backlog), what="a backlog of full batches", timeout=5)
        assert asyncio.get_running_loop().time() - started < interval, "a full batch is followed by a read at once"
        assert await _count(registry, fetches) - reads == 3


def assert_outage_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    """nats-py retries every second while NATS is down; the relay says so once (per 10 s), without tracebacks."""
    unavailable = [r for r in caplog.records if "NATS (JetStream) unavailable" in r.getMessage()]
    assert len(unavailable) == 1, [r.getMessage() for r in unavailable]
    assert unavailable[0].name == "command_service.relay" and unavailable[0].levelno == logging.WARNING
    with_traceback = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.exc_info]
    assert not with_traceback, with_traceback


async def test_commands_succeed_while_nats_is_down_and_the_backlog_drains_when_it_returns(
    event_store_dsn: str,
    pg_pool: asyncpg.Pool,
    nats_server: NatsHandle,
    unique_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    relay_settings = settings(unique_name)
    handler = order_handler(EventStore(pg_pool))
    async with running_relay(event_store_dsn, nats_server.url, relay_settings):
        await run_commands(handler, orders=1, items=1)
        await eventually(lambda: _is_zero(outbox_size(pg_pool)), what="the first events to be published")
        with nats_server.outage():
            await run_commands(handler, orders=3, items=3)
            await asyncio.sleep(3.5)  # let the relay try (and fail) to publish and reconnect while NATS is down
            assert await outbox_size(pg_pool) == 13, "events must stay in the outbox until JetStream acks them"
        await eventually(
            lambda: _is_zero(outbox_size(pg_pool)), what="the backlog to drain after NATS returned", timeout=30
        )
    assert_outage_logged_once(caplog)
    published = await stream_events(nats_server.url, relay_settings.stream_name)
    stored = await pg_pool.fetch("SELECT event_id FROM events")
    assert sorted(m for m, _ in published) == sorted(str(r["event_id"]) for r in stored), (
        "every stored event is in the stream exactly once"
    )


async def test_relay_starts_while_nats_is_down_and_connects_when_it_comes_up(
    event_store_dsn: str,
    pg_pool: asyncpg.Pool,
    nats_server: NatsHandle,
    unique_name: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    relay_settings = settings(unique_name)
    handler = order_handler(EventStore(pg_pool))
    with nats_server.outage():
        relay = OutboxRelay(event_store_dsn, nats_server.url, relay_settings)
        task = asyncio.create_task(relay.run())
        await run_commands(handler, orders=1, items=2)
        await asyncio.sleep(3.5)  # several connection attempts (one a second) fail
    try:
        await eventually(lambda: _is_zero(outbox_size(pg_pool)), what="the relay to connect and drain", timeout=30)
        assert len(await stream_events(nats_server.url, relay_settings.stream_name)) == 4
        assert_outage_logged_once(caplog)
    finally:
        relay.stop()
        await asyncio.wait_for(task, timeout=15)


async def test_only_one_relay_is_active_and_a_standby_takes_over(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, unique_name: str
) -> None:
    relay_settings = settings(unique_name)
    handler = order_handler(EventStore(pg_pool))
    async with running_relay(event_store_dsn, nats_url, relay_settings) as first:
        await eventually(lambda: _true(first.is_leader), what="the first relay to take the lock")
        async with running_relay(event_store_dsn, nats_url, relay_settings) as second:
            await run_commands(handler, orders=2, items=1)
            await eventually(lambda: _is_zero(outbox_size(pg_pool)), what="the outbox to drain")
            assert first.is_leader and not second.is_leader
            assert second.published_total == 0
            first.stop()
            await eventually(lambda: _true(second.is_leader), what="the standby relay to take over")
            await run_commands(handler, orders=1, items=1)
            await eventually(lambda: _is_zero(outbox_size(pg_pool)), what="the standby to publish new events")
            assert second.published_total == 3
    assert len(await stream_events(nats_url, relay_settings.stream_name)) == 8


async def _is_zero(value: Awaitable[int]) -> bool:
    return await value == 0


async def _true(value: bool) -> bool:
    return value


async def _published(nats_url: str, stream: str, positions: set[int]) -> bool:
    return positions <= {e.position for _, e in await stream_events(nats_url, stream)}


async def _count(registry: CollectorRegistry, labels: dict[str, str]) -> float:
    return registry.get_sample_value("cqrs_dependency_call_seconds_count", labels) or 0.0


async def _positions(nats_url: str, stream: str, expected: set[int]) -> bool:
    return {e.position for _, e in await stream_events(nats_url, stream)} == expected


pytestmark = pytest.mark.timeout(120)
