"""The relay recovers by itself: PostgreSQL killed and restarted (repeatedly), long NATS outages, and it leaves an
operator's stream settings alone. Real servers; the PostgreSQL one is this module's own, since it gets killed."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import StreamConfig

from command_service.domain import commands as cmd
from command_service.event_store import EventStore
from command_service.handlers import order_handler
from command_service.migrate import migrate
from core.errors import Unavailable
from core.jetstream import event_stream_config
from localservers import NatsHandle, PostgresServer, free_port
from tests.integration.test_relay import (
    ADDRESS,
    ctx,
    outbox_size,
    running_relay,
    settings,
    stream_events,
)
from tests.support import eventually, registered_customer, with_database

pytestmark = pytest.mark.slow

KILLS = 3


@pytest.fixture(scope="module")
def own_postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server that this module may SIGKILL (the shared one stays untouched)."""
    base = Path(tempfile.mkdtemp(prefix="cqrs-relay-pg-"))
    server = PostgresServer(base / "pg", free_port())
    server.start(timeout=90)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def crash_dsn(own_postgres: PostgresServer) -> AsyncIterator[str]:
    if not own_postgres.running:
        own_postgres.start(timeout=90)
    name = f"t{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(own_postgres.dsn, timeout=10)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    dsn = with_database(own_postgres.dsn, name)
    await migrate(dsn)
    yield dsn


async def _is_zero(count: int) -> bool:
    return count == 0


async def test_relay_resumes_after_postgres_is_killed_and_restarted_again_and_again(
    own_postgres: PostgresServer, crash_dsn: str, nats_url: str, unique_name: str
) -> None:
    relay_settings = settings(unique_name)
    pool = await asyncpg.create_pool(crash_dsn, min_size=0, max_size=8, timeout=3, command_timeout=3)
    store = EventStore(pool, command_timeout=3)
    handler = order_handler(store)
    acknowledged: list[str] = []  # order ids whose CreateOrder got a reply
    other_errors: list[BaseException] = []
    stop = asyncio.Event()
    customer_id = await registered_customer(store)

    async def load() -> None:
        while not stop.is_set():
            order_id = str(uuid.uuid4())
            try:
                await handler.handle(cmd.CreateOrder(order_id, customer_id, "EUR", ADDRESS), ctx())
                acknowledged.append(order_id)
            except Unavailable:
                await asyncio.sleep(0.05)  # the outage, reported as it must be
            except Exception as exc:
                other_errors.append(exc)
            await asyncio.sleep(0.01)

    try:
        async with running_relay(crash_dsn, nats_url, relay_settings) as relay:
            workers = [asyncio.create_task(load()) for _ in range(4)]
            try:
                for round_ in range(KILLS):

                    async def twenty_more(wanted: int = len(acknowledged) + 20) -> bool:
                        return len(acknowledged) >= wanted

                    await eventually(
                        twenty_more,
                        what=f"commands before crash {round_ + 1}",
                    )
                    own_postgres.kill()
                    await asyncio.sleep(2.0)  # down for a while, as an operator would see it
                    await asyncio.to_thread(own_postgres.start, 90)

                    async def publishing(before: int = relay.published_total) -> bool:
                        return relay.published_total > before

                    await eventually(
                        publishing,
                        what=f"the relay publishing again after restart {round_ + 1}",
                        timeout=20,
                    )
            finally:
                stop.set()
                await asyncio.gather(*workers)
            await eventually(lambda: _outbox_drained(pool), what="the outbox to drain", timeout=30)
        published = {event.stream_id for _, event in await stream_events(nats_url, relay_settings.stream_name)}
    finally:
        await store.close()
        await pool.close()
    assert not other_errors, f"commands failed with something other than UNAVAILABLE: {other_errors[:5]!r}"
    missing = [order_id for order_id in acknowledged if order_id not in published]
    assert not missing, f"{len(missing)} acknowledged orders never reached JetStream"
    assert len(acknowledged) >= KILLS * 20


async def _outbox_drained(pool: asyncpg.Pool) -> bool:
    try:
        return await outbox_size(pool) == 0
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False


async def test_relay_resumes_after_a_long_nats_outage_that_exhausted_its_publish_permits(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_server: NatsHandle, unique_name: str
) -> None:
    # Tiny client bounds, so that an outage fails many more publishes than the client has permits for: a relay
    # that kept its JetStream context would stay stuck after NATS returns.
    relay_settings = dataclasses.replace(
        settings(unique_name), batch_size=50, publish_max_pending=5, nats_pending_bytes=2048, publish_timeout=0.5
    )
    handler = order_handler(EventStore(pg_pool))
    customer_id = await registered_customer(handler.store)
    async with running_relay(event_store_dsn, nats_server.url, relay_settings) as relay:
        await eventually(lambda: _outbox_drained(pg_pool), what="the first event published")
        with nats_server.outage():
            for _ in range(60):
                await handler.handle(cmd.CreateOrder(str(uuid.uuid4()), customer_id, "EUR", ADDRESS), ctx())
            await asyncio.sleep(6.0)  # many failed passes
        await eventually(lambda: _outbox_drained(pg_pool), what="the backlog to drain once NATS is back", timeout=20)
        assert relay.published_total == 61
    events = await stream_events(nats_server.url, relay_settings.stream_name)
    assert len({event.event_id for _, event in events}) == 61


async def test_restarting_keeps_the_operators_stream_settings(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, unique_name: str
) -> None:
    relay_settings = settings(unique_name)
    tuned = dataclasses.replace(
        event_stream_config(relay_settings.stream_name, relay_settings.subject_prefix),
        max_age=30 * 24 * 3600.0,
        duplicate_window=600.0,
    )
    nc = await nats.connect(nats_url, connect_timeout=2)
    try:
        js = nc.jetstream(timeout=2)
        await js.add_stream(tuned)
        handler = order_handler(EventStore(pg_pool))
        await registered_customer(handler.store)
        async with running_relay(event_store_dsn, nats_url, relay_settings):
            await eventually(lambda: _outbox_drained(pg_pool), what="the outbox to drain")
        config: StreamConfig = (await js.stream_info(relay_settings.stream_name)).config
    finally:
        await nc.close()
    assert config.max_age == pytest.approx(30 * 24 * 3600.0)
    assert config.duplicate_window == pytest.approx(600.0)
