"""`cqrs verify` against the real servers: commands go through the handlers into PostgreSQL, the relay publishes
them to JetStream and a real projector builds the read model; then verify must find it clean, find each kind of
corruption (through the CLI's `--json` and exit status), repair documents, and wait out a projector that lags.

Each test has its own database, stream, subjects, durable consumer and MongoDB database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.js import JetStreamContext
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from command_service.domain import commands as cmd
from command_service.domain.customer_commands import RenameCustomer
from command_service.event_store import EventStore
from command_service.handlers import customer_handler, order_handler
from command_service.relay import OutboxRelay
from core.envelope import EventMetadata, RecordedEvent
from core.subjects import event_subject
from cqrsctl.main import main
from cqrsctl.verify import FindingKind, VerifyConfig, VerifyResult, run_verify
from projector.config import ProjectorSettings
from projector.dead_letters import DeadLetter, DeadLetterWriter
from projector.runner import Projector
from tests.integration.test_relay import ADDRESS, ctx
from tests.integration.test_relay import settings as relay_settings
from tests.support import eventually, registered_customer

Doc = dict[str, Any]
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class System:
    """One test's event store, relay, projector and read model, with the ids of what the workload created."""

    pool: asyncpg.Pool
    store: EventStore
    config: VerifyConfig
    projector_settings: ProjectorSettings
    nc: NatsClient
    js: JetStreamContext
    db: AsyncDatabase[Doc]
    customers: list[str] = field(default_factory=list)
    orders: dict[str, str] = field(default_factory=dict)  # name -> order id
    projector: Projector | None = None
    relay: OutboxRelay | None = None
    relay_task: asyncio.Task[None] | None = None

    async def start_projector(self) -> None:
        self.projector = Projector(self.projector_settings)
        await self.projector.start()

    async def stop_projector(self) -> None:
        if self.projector is not None:
            await self.projector.stop()
            self.projector = None

    async def start_relay(self) -> None:
        cfg = self.config
        settings = replace(relay_settings("x"), stream_name=cfg.stream_name, subject_prefix=cfg.subject_prefix)
        self.relay = OutboxRelay(cfg.postgres_dsn, cfg.nats_url, settings)
        self.relay_task = asyncio.create_task(self.relay.run())

    async def stop_relay(self) -> None:
        if self.relay is not None and self.relay_task is not None:
            self.relay.stop()
            await asyncio.wait_for(self.relay_task, timeout=15)
            self.relay = self.relay_task = None

    async def quiescent(self) -> bool:
        """Outbox empty and every stream's checkpoint at its PostgreSQL version (views are written before it)."""
        if await self.pool.fetchval("SELECT count(*) FROM outbox"):
            return False
        versions = await self.pool.fetch("SELECT stream_id, max(version) AS v FROM events GROUP BY stream_id")
        checkpoints = {d["_id"]: d["version"] async for d in self.db["checkpoints"].find()}
        return all(checkpoints.get(r["stream_id"]) == r["v"] for r in versions)

    async def wait_quiescent(self) -> None:
        await eventually(self.quiescent, what="the relay and the projector to reflect every event", timeout=30)

    async def verify(self, **overrides: Any) -> VerifyResult:
        return await run_verify(replace(self.config, **overrides))

    async def dead_letters(self, *args: str) -> int:
        """Runs `cqrs dead-letters ...` against this system's stores (in a thread: it runs its own event loop)."""
        c = self.config
        argv = ["dead-letters", "--mongo-url", c.mongo_url, "--mongo-database", c.mongo_database]
        return await asyncio.to_thread(main, [*argv, "--dsn", c.postgres_dsn, *args])

    async def cli(self, *args: str) -> tuple[int, Doc]:
        """Runs `python -m cqrsctl.main verify --json` (as in the image) and returns its exit status and JSON."""
        c = self.config
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cqrsctl.main", "verify", "--json", "--postgres-dsn", c.postgres_dsn,
            "--nats-url", c.nats_url, "--mongo-url", c.mongo_url, "--mongo-database", c.mongo_database,
            "--stream-name", c.stream_name, "--subject-prefix", c.subject_prefix,
            "--settle-seconds", str(c.settle_seconds), *args,
            cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=120)
        assert process.returncode is not None
        assert stdout, f"no output; stderr: {stderr.decode()}"
        return process.returncode, json.loads(stdout)


async def run_workload(system: System) -> None:
    """Two customers (one renamed), five orders: placed, cancelled, draft with a changed quantity, deleted."""
    orders, customers = order_handler(system.store), customer_handler(system.store)
    ada = await registered_customer(system.store, "Ada Lovelace")
    bob = await registered_customer(system.store, "Bob")
    await customers.handle(RenameCustomer(bob, "Robert"), ctx())
    system.customers = [ada, bob]

    async def order(name: str, customer_id: str, currency: str, *steps: Callable[[str], Any]) -> None:
        order_id = str(uuid.uuid4())
        system.orders[name] = order_id
        await orders.handle(cmd.CreateOrder(order_id, customer_id, currency, ADDRESS), ctx())
        for step in steps:
            await orders.handle(step(order_id), ctx())

    await order(
        "placed", ada, "EUR",
        lambda o: cmd.AddOrderItem(o, "SKU-1", "Anvil", 2, 1250),
        lambda o: cmd.AddOrderItem(o, "SKU-2", "Rope", 1, 300),
        cmd.PlaceOrder,
    )  # fmt: skip
    await order(
        "cancelled", ada, "USD", lambda o: cmd.AddOrderItem(o, "SKU-3", "Bell", 1, 99),
        lambda o: cmd.CancelOrder(o, "changed my mind"),
    )  # fmt: skip
    await order(
        "draft", ada, "EUR", lambda o: cmd.AddOrderItem(o, "SKU-1", "Anvil", 1, 1250),
        lambda o: cmd.ChangeItemQuantity(o, "SKU-1", 3),
    )  # fmt: skip
    await order("bob", bob, "EUR", lambda o: cmd.AddOrderItem(o, "SKU-9", "Kite", 4, 500), cmd.PlaceOrder)
    await order("deleted", bob, "GBP", cmd.DeleteOrder)


@contextlib.asynccontextmanager
async def projected_system(
    event_store_dsn: str,
    pg_pool: asyncpg.Pool,
    nats_url: str,
    mongo_url: str,
    unique_name: str,
    workload: Callable[[System], Awaitable[None]],
    **config: Any,
) -> AsyncIterator[System]:
    """A store the `workload` filled, projected by the real relay and projector (both still running), at rest.

    `config`: VerifyConfig overrides. At the end the stream, the test's database and its generations
    (`<name>_g<N>`, made by `cqrs rebuild`) are dropped."""
    config = {"settle_seconds": 2.0, **config}
    verify_config = VerifyConfig(
        postgres_dsn=event_store_dsn, nats_url=nats_url, mongo_url=mongo_url, mongo_database=unique_name,
        stream_name=unique_name.upper(), subject_prefix=f"{unique_name}.events", **config,
    )  # fmt: skip
    projector_settings = ProjectorSettings(
        generation_poll_seconds=0.2,
        nats_url=nats_url, mongo_url=mongo_url, mongo_database=unique_name, stream_name=verify_config.stream_name,
        subject_prefix=verify_config.subject_prefix, projector_durable=f"{unique_name}-projector",
        projector_fetch_timeout_seconds=0.2, projector_max_backoff_seconds=0.5, mongo_timeout_ms=5000,
    )  # fmt: skip
    nc = await nats.connect(nats_url, connect_timeout=5)
    mongo: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000)
    sys_ = System(pg_pool, EventStore(pg_pool), verify_config, projector_settings, nc, nc.jetstream(timeout=5),
                  mongo[unique_name])  # fmt: skip
    try:
        await sys_.start_relay()
        await sys_.start_projector()
        await workload(sys_)
        await sys_.wait_quiescent()
        yield sys_
    finally:
        await sys_.stop_projector()
        await sys_.stop_relay()
        with contextlib.suppress(Exception):
            await sys_.js.delete_stream(verify_config.stream_name)
        for name in await mongo.list_database_names():
            if name == unique_name or name.startswith(f"{unique_name}_g"):
                await mongo.drop_database(name)
        await mongo.close()
        await nc.close()


@pytest.fixture
async def system(
    event_store_dsn: str, pg_pool: asyncpg.Pool, nats_url: str, mongo_url: str, unique_name: str
) -> AsyncIterator[System]:
    """A projected store at rest: the workload has gone through the relay and the projector, both still run."""
    async with projected_system(
        event_store_dsn, pg_pool, nats_url, mongo_url, unique_name, run_workload,
        outbox_age_seconds=60.0, batch_size=3,  # several batches even for this small store
    ) as sys_:  # fmt: skip
        yield sys_


async def test_a_projected_store_is_clean(system: System) -> None:
    result = await system.verify()
    assert result.clean, result.findings
    events = await system.pool.fetchval("SELECT count(*) FROM events")
    assert result.events_checked == events == result.messages_checked
    reports = await system.db["sales_daily"].count_documents({})  # the two EUR orders placed (one, unless at midnight)
    assert reports >= 1
    assert result.documents_checked == len(system.customers) + len(system.orders) + reports
    assert result.expired_events == 0

    code, report = await system.cli()
    assert (code, report["clean"], report["findings"]) == (0, True, [])
    assert report["events_checked"] == events


# ---- one corruption at a time: found, named in --json, exit status 1 ------------------------------------------


async def tamper_order_field(s: System) -> tuple[str, str]:
    await s.db["orders"].update_one({"_id": s.orders["placed"]}, {"$set": {"lines.1.quantity": 7}})
    return s.orders["placed"], "lines.1.quantity"


async def tamper_customer_name_on_order(s: System) -> tuple[str, str]:
    await s.db["orders"].update_one({"_id": s.orders["bob"]}, {"$set": {"customer_name": "Bob"}})  # renamed since
    return s.orders["bob"], "customer_name"


async def tamper_customer_stats(s: System) -> tuple[str, str]:
    ada = s.customers[0]
    await s.db["customers"].update_one({"_id": ada}, {"$inc": {"order_stats.placed_totals.0.total_minor": 1}})
    return ada, "order_stats.placed_totals.0.total_minor"


async def delete_document(s: System) -> tuple[str, str]:
    await s.db["orders"].delete_one({"_id": s.orders["cancelled"]})
    return s.orders["cancelled"], ""


async def add_document_without_events(s: System) -> tuple[str, str]:
    ghost = str(uuid.uuid4())
    doc = await s.db["orders"].find_one({"_id": s.orders["draft"]})
    assert doc is not None
    await s.db["orders"].insert_one({**doc, "_id": ghost, "order_id": ghost})
    return ghost, ""


async def delete_stream_message(s: System) -> tuple[str, str]:
    info = await s.js.stream_info(s.config.stream_name)
    seq = info.state.first_seq + 3  # not the first: an early gap is not mistaken for retention
    message = await s.js.get_msg(s.config.stream_name, seq)
    assert message.data is not None
    await s.js.delete_msg(s.config.stream_name, seq)
    return RecordedEvent.from_json(message.data).stream_id, ""


async def publish_stray_message(s: System) -> tuple[str, str]:
    stray_id = str(uuid.uuid4())
    recorded = RecordedEvent(
        event_id=uuid.uuid4(), stream_type="order", stream_id=stray_id, version=1, event_type="OrderDeleted",
        schema_version=1, payload={}, metadata=EventMetadata("r", "c", "c"), position=10**9,
        recorded_at=datetime.now(UTC),
    )  # fmt: skip
    subject = event_subject("order", stray_id, s.config.subject_prefix)
    await s.js.publish(subject, recorded.to_json(), headers=recorded.headers())
    return stray_id, ""


async def old_outbox_row(s: System) -> tuple[str, str]:
    row = await s.pool.fetchrow("SELECT position, stream_id FROM events ORDER BY position DESC LIMIT 1")
    assert row is not None
    await s.pool.execute(
        "INSERT INTO outbox (position, stream_id, enqueued_at) VALUES ($1, $2, now() - interval '1 hour')",
        row["position"], row["stream_id"],
    )  # fmt: skip
    return str(row["stream_id"]), ""


async def checkpoint_ahead(s: System) -> tuple[str, str]:
    await s.db["checkpoints"].update_one({"_id": s.orders["draft"]}, {"$inc": {"version": 1}})
    return s.orders["draft"], ""


async def dead_letter(s: System) -> tuple[str, str]:
    order_id = s.orders["placed"]
    subject = event_subject("order", order_id, s.config.subject_prefix)
    letter = DeadLetter(s.config.stream_name, 424242, subject, "cannot apply: test", b"{}", {}, 1)
    await DeadLetterWriter(s.db).write([letter])
    return order_id, ""


CORRUPTIONS: dict[str, tuple[Callable[[System], Awaitable[tuple[str, str]]], FindingKind]] = {
    "order field": (tamper_order_field, FindingKind.DOCUMENT_DIFFERS),
    "customer name on an order": (tamper_customer_name_on_order, FindingKind.DOCUMENT_DIFFERS),
    "customer order statistics": (tamper_customer_stats, FindingKind.DOCUMENT_DIFFERS),
    "deleted document": (delete_document, FindingKind.DOCUMENT_MISSING),
    "document without events": (add_document_without_events, FindingKind.ORPHAN_DOCUMENT),
    "deleted stream message": (delete_stream_message, FindingKind.MISSING_FROM_STREAM),
    "stray stream message": (publish_stray_message, FindingKind.STRAY_MESSAGE),
    "old outbox row": (old_outbox_row, FindingKind.OUTBOX_STALE),
    "checkpoint ahead": (checkpoint_ahead, FindingKind.CHECKPOINT_AHEAD),
    "dead letter": (dead_letter, FindingKind.DEAD_LETTER),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
async def test_each_corruption_is_found_and_named(system: System, corruption: str) -> None:
    await system.stop_projector()  # the read model stays as corrupted (and a stray message stays unapplied)
    await system.stop_relay()
    corrupt, kind = CORRUPTIONS[corruption]
    stream_id, path = await corrupt(system)

    code, report = await system.cli()

    assert code == 1 and report["clean"] is False
    assert set(report["counts"]) == {str(kind)}, report["findings"]
    found = [f for f in report["findings"] if f["kind"] == kind and f["stream_id"] == stream_id]
    assert found, report["findings"]
    if path:
        assert [d["path"] for d in found[0]["diffs"]] == [path]


async def test_repair_rewrites_the_differing_documents_and_a_second_verify_is_clean(system: System) -> None:
    await system.stop_projector()
    before = {d["_id"]: d async for d in system.db["orders"].find()}
    for corrupt in (tamper_order_field, tamper_customer_name_on_order, tamper_customer_stats, delete_document):
        await corrupt(system)
    ghost, _ = await add_document_without_events(system)

    result = await run_verify(system.config, repair=True)

    assert result.kinds() == {
        FindingKind.DOCUMENT_DIFFERS, FindingKind.DOCUMENT_MISSING, FindingKind.ORPHAN_DOCUMENT
    }  # fmt: skip
    actions = {(r.stream_id, r.action) for r in result.repairs}
    assert actions == {
        (system.orders["placed"], "replaced"), (system.orders["bob"], "replaced"),
        (system.customers[0], "replaced"), (system.orders["cancelled"], "inserted"), (ghost, "deleted"),
    }  # fmt: skip
    again = await system.verify()
    assert again.clean, again.findings
    after = {d["_id"]: d async for d in system.db["orders"].find()}
    assert after == before


async def test_repair_never_moves_a_document_back(system: System) -> None:
    """A document the projector moved past the computed version meanwhile is left alone."""
    await system.stop_projector()
    order_id, _ = await tamper_order_field(system)
    result = await system.verify()
    (finding,) = result.findings
    # The projector "moves on" after verify computed the document: the repair must not overwrite it.
    await system.db["orders"].update_one({"_id": order_id}, {"$inc": {"version": 1}})
    from cqrsctl.verify.repair import repair_documents

    (repair,) = await repair_documents(system.db, [finding])
    assert repair.action == "skipped"
    doc = await system.db["orders"].find_one({"_id": order_id})
    assert doc is not None and doc["lines"][1]["quantity"] == 7


async def test_a_document_that_catches_up_within_the_settle_time_is_not_reported(system: System) -> None:
    await system.stop_projector()
    draft = system.orders["draft"]
    await order_handler(system.store).handle(cmd.ChangeItemQuantity(draft, "SKU-1", 5), ctx())
    # Published, not projected: the document and its checkpoint stay behind while the projector is down.
    await eventually(lambda: _is_zero(system.pool.fetchval("SELECT count(*) FROM outbox")), what="the relay")

    lagging = await system.verify(settle_seconds=1.0)
    assert lagging.kinds() == {FindingKind.DOCUMENT_DIFFERS, FindingKind.CHECKPOINT_BEHIND}, lagging.findings
    assert {f.stream_id for f in lagging.findings} == {draft}
    assert all("still so after" in f.detail for f in lagging.findings)

    verifying = asyncio.create_task(system.verify(settle_seconds=30.0))
    await asyncio.sleep(1.0)  # verify has seen the lag and is re-checking
    assert not verifying.done()
    await system.start_projector()
    result = await verifying
    assert result.clean, result.findings
    assert result.settle_rounds >= 2


async def test_derived_documents_right_for_their_sources_as_stored_are_in_flight_while_those_lag(
    system: System,
) -> None:
    """Under a steady load a busy customer's statistics and the day's report depend on some order that is always
    behind, so they never settle while verify re-checks them. Each is reported only when it is wrong for the orders as
    stored (those are checked against PostgreSQL one by one): here the projector is stopped after an order was placed,
    and that order is what verify reports, not the statistics and the report that lack it. Fails if a derived document
    that is wrong for its stored sources passes, or if one that is right is reported."""
    await system.stop_projector()
    ada = system.customers[0]
    order_id = str(uuid.uuid4())
    orders = order_handler(system.store)
    await orders.handle(cmd.CreateOrder(order_id, ada, "EUR", ADDRESS), ctx())
    await orders.handle(cmd.AddOrderItem(order_id, "SKU-1", "Anvil", 1, 1250), ctx())
    await orders.handle(cmd.PlaceOrder(order_id), ctx())
    await eventually(lambda: _is_zero(system.pool.fetchval("SELECT count(*) FROM outbox")), what="the relay")

    lagging = await system.verify(settle_seconds=1.0)
    assert {f.stream_id for f in lagging.findings} == {order_id}, lagging.findings
    assert lagging.hot_keys_in_flight == 2  # ada's statistics, the day's EUR report

    report = await system.db["sales_daily"].find_one({"currency": "EUR"}, {"_id": 1})
    assert report is not None
    await system.db["customers"].update_one({"_id": ada}, {"$inc": {"order_stats.placed_orders": 1}})
    await system.db["sales_daily"].update_one({"_id": report["_id"]}, {"$inc": {"placed_revenue_minor": 1}})
    wrong = await system.verify(settle_seconds=1.0)
    assert {f.stream_id for f in wrong.findings} == {order_id, ada, report["_id"]}, wrong.findings
    assert wrong.hot_keys_in_flight == 0
    assert all("still so after" in f.detail for f in wrong.findings if f.stream_id in (ada, report["_id"]))


async def test_a_system_under_a_steady_load_verifies_clean(system: System) -> None:
    """The read model is checkable at any moment: verify against a system whose customers each receive orders as
    fast as one client can send them (their statistics and the day's report change with every batch, some order of
    theirs always in flight) must find nothing. Fails on any finding, e.g. a derived document that never settled
    reported as a difference."""
    stop = asyncio.Event()
    commands = 0

    async def busy_customer(customer_id: str) -> None:
        nonlocal commands
        orders = order_handler(system.store)
        n = 0
        while not stop.is_set():
            n += 1
            order_id = str(uuid.uuid4())
            await orders.handle(cmd.CreateOrder(order_id, customer_id, "EUR", ADDRESS), ctx())
            await orders.handle(cmd.AddOrderItem(order_id, f"SKU-{n % 3}", "Item", 1 + n % 2, 700), ctx())
            await orders.handle(cmd.PlaceOrder(order_id), ctx())
            if n % 3 == 0:
                await orders.handle(cmd.CancelOrder(order_id, "too slow"), ctx())
            commands += 3 + (n % 3 == 0)

    load = [asyncio.create_task(busy_customer(customer)) for customer in system.customers]
    try:
        await asyncio.sleep(1.0)  # the projector is busy with them
        result = await system.verify(settle_seconds=10.0)
        assert not any(task.done() for task in load), "the load stopped before verify ended"
    finally:
        stop.set()
        await asyncio.gather(*load)
    assert commands > 100, commands
    assert result.clean, result.findings


async def _is_zero(value: Awaitable[int]) -> bool:
    return await value == 0


@pytest.mark.parametrize("repair", ["verify --repair", "dead-letters retry"])
async def test_a_stream_whose_document_was_lost_under_its_checkpoint_resumes_after_repair(
    system: System, repair: str
) -> None:
    """What a MongoDB crash could leave before every projector write was journaled: a checkpoint at the stream's
    version and no document under it. The stream's next event then finds a gap (the read model is at version 0)
    and parks. Either repair an operator would reach for must heal it: `cqrs verify --repair` writes the document
    from PostgreSQL and the park then resumes by itself; `cqrs dead-letters retry` applies the stream's events from
    PostgreSQL onto the missing document and unparks it. The read model must end clean."""
    draft = system.orders["draft"]
    await system.stop_projector()
    await system.db["orders"].delete_one({"_id": draft})  # the checkpoint stays, at the stream's version
    await system.start_projector()
    await order_handler(system.store).handle(cmd.ChangeItemQuantity(draft, "SKU-1", 5), ctx())

    async def parked() -> Doc | None:
        doc = await system.db["checkpoints"].find_one({"_id": draft, "parked": {"$exists": True}})
        return None if doc is None else dict(doc["parked"])

    park = await eventually(parked, what="the stream's next event to park it at the gap", timeout=30)
    assert park["kind"] == "gap", park

    if repair == "verify --repair":
        result = await run_verify(system.config, repair=True)
        assert {(r.stream_id, r.action) for r in result.repairs} == {(draft, "inserted")}, result.repairs
    else:
        status = await system.dead_letters("retry", draft)
        assert status == 0, f"cqrs dead-letters retry {draft} exited {status}"

    async def resumed() -> bool:
        return await parked() is None

    await eventually(resumed, what="the park to resume once the document is back", timeout=30)
    await system.wait_quiescent()
    again = await system.verify()
    assert again.clean, again.findings
    doc = await system.db["orders"].find_one({"_id": draft})
    assert doc is not None and doc["lines"][0]["quantity"] == 5
