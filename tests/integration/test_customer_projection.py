"""Customers in the read model against real servers: the customer documents, the customer fields copied onto
orders (fan-out), the customers' order statistics, the checkpoints read-your-writes waits on, and `/metrics`.

Uses the harness of `test_projector` (own stream, subjects, durable and database per test).
"""

from __future__ import annotations

import asyncio
import urllib.request
import uuid
from collections.abc import Awaitable, Callable

from core.customer_events import CustomerDeactivated, CustomerEmailChanged, CustomerRegistered, CustomerRenamed
from core.order_events import (
    OrderCancelled,
    OrderCreated,
    OrderDeleted,
    OrderItemAdded,
    OrderPlaced,
)
from tests.integration import test_projector
from tests.integration.test_projector import ADDRESS, Doc, Harness, Stream, new_order_id
from tests.support import eventually

# The same fixtures as the projector's tests.
harness_factory = test_projector.harness_factory
harness = test_projector.harness


def customer_stream() -> Stream:
    return Stream(str(uuid.uuid4()), stream_type="customer")


async def register(h: Harness, name: str = "Ada Lovelace", email: str = "ada@example.org") -> Stream:
    customer = customer_stream()
    await h.emit(customer, CustomerRegistered(customer.stream_id, name, email))
    return customer


async def create_orders(h: Harness, customer_id: str, count: int, currency: str = "EUR") -> list[Stream]:
    orders = [Stream(new_order_id()) for _ in range(count)]
    for order in orders:
        await h.emit(order, OrderCreated(order.order_id, customer_id, currency, ADDRESS))
    return orders


async def customer_doc(h: Harness, customer_id: str) -> Doc | None:
    return await h.db["customers"].find_one({"_id": customer_id})


async def customer_at(h: Harness, customer_id: str, version: int) -> Doc:
    async def probe() -> Doc | None:
        doc = await customer_doc(h, customer_id)
        return doc if doc is not None and doc.get("version") == version else None

    return await eventually(probe, what=f"customer {customer_id} at version {version}")


async def orders_of(h: Harness, customer_id: str) -> list[Doc]:
    return await h.db["orders"].find({"customer_id": customer_id}).sort("_id", 1).to_list()


async def checkpoint(h: Harness, stream_id: str) -> Doc | None:
    return await h.db["checkpoints"].find_one({"_id": stream_id})


async def checkpoint_at(h: Harness, stream_id: str, version: int) -> Doc:
    async def probe() -> Doc | None:
        doc = await checkpoint(h, stream_id)
        return doc if doc is not None and doc["version"] >= version else None

    return await eventually(probe, what=f"the checkpoint of {stream_id} at version {version}")


class MonotonicWatch:
    """Polls a customer's orders, failing if any order's customer fields ever go back to an older version."""

    def __init__(self, h: Harness, customer_id: str) -> None:
        self.h = h
        self.customer_id = customer_id
        self.seen: dict[str, tuple[int, str]] = {}
        self.polls = 0

    async def poll(self) -> list[Doc]:
        docs = await orders_of(self.h, self.customer_id)
        self.polls += 1
        for doc in docs:
            now = (doc["customer_version"], doc["customer_name"])
            before = self.seen.get(doc["_id"], (0, ""))
            assert now[0] >= before[0], f"order {doc['_id']} went from customer v{before[0]} back to v{now[0]}"
            self.seen[doc["_id"]] = now
        return docs


async def test_a_rename_fans_out_to_every_order_despite_reordering_and_redelivery(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(projector_batch_size=16)  # several batches: the fan-out is not one lucky write
    await h.start_projector()
    customer = await register(h, "Name v1", "v1@example.org")
    orders = await create_orders(h, customer.stream_id, 30)
    watch = MonotonicWatch(h, customer.stream_id)

    async def all_at(version: int, name: str) -> list[Doc] | None:
        docs = await watch.poll()
        ok = len(docs) == len(orders) and all(
            (d["customer_version"], d["customer_name"]) == (version, name) for d in docs
        )
        return docs if ok else None

    await eventually(lambda: all_at(1, "Name v1"), what="30 orders showing customer v1")

    v2 = customer.record(CustomerRenamed("Name v2"), 2, h.next_position())
    v3 = customer.record(CustomerRenamed("Name v3"), 3, h.next_position())
    await h.publish(v3)  # a gap: waits for v2
    await h.stats_reach("v3 to be deferred as a gap", lambda p: p.stats.gaps >= 1)
    await h.publish(v2)
    for stale in (v2, v3, v2, customer.published[0]):  # re-published after the duplicate window
        await h.publish(stale, with_msg_id=False)
    docs = await eventually(lambda: all_at(3, "Name v3"), what="30 orders showing customer v3")
    assert {d["customer_email"] for d in docs} == {"v1@example.org"}

    await h.emit(customer, CustomerEmailChanged("v4@example.org"), version=4)
    docs = await eventually(lambda: all_at(4, "Name v3"), what="30 orders showing customer v4", timeout=15)
    assert {d["customer_email"] for d in docs} == {"v4@example.org"}
    await h.settled("renames, duplicates and the e-mail change")
    assert (await checkpoint(h, customer.stream_id) or {}).get("version") == 4
    doc = await customer_doc(h, customer.stream_id)
    assert doc is not None
    assert (doc["name"], doc["email"], doc["status"], doc["version"]) == ("Name v3", "v4@example.org", "ACTIVE", 4)
    assert watch.polls > 2


async def test_orders_created_before_their_customer_get_its_fields_and_stats_survive(harness: Harness) -> None:
    customer = customer_stream()
    orders = await create_orders(harness, customer.stream_id, 3)
    await harness.emit(orders[0], OrderItemAdded("SKU-A", "Anvil", 2, 500))
    await harness.emit(orders[0], OrderPlaced())
    await harness.order_at(orders[0].order_id, 3)

    async def stats_only() -> Doc | None:
        doc = await customer_doc(harness, customer.stream_id)
        # The three orders may sit in different partitions, applied in any order: wait for all of them.
        stats = doc["order_stats"] if doc is not None else {}
        return doc if stats.get("placed_orders") == 1 and stats.get("draft_orders") == 2 else None

    doc = await eventually(stats_only, what="order statistics before the customer is known")
    assert "version" not in doc and "name" not in doc
    assert all(
        o["customer_version"] == 0 and o["customer_name"] == "" for o in await orders_of(harness, customer.stream_id)
    )

    await harness.emit(customer, CustomerRegistered(customer.stream_id, "Late Larry", "larry@example.org"))
    registered = await customer_at(harness, customer.stream_id, 1)
    assert registered["order_stats"] == {
        "draft_orders": 2,
        "placed_orders": 1,
        "cancelled_orders": 0,
        "placed_totals": [{"currency": "EUR", "total_minor": 1000}],
    }
    assert (registered["name"], registered["status"], registered["customer_id"]) == (
        "Late Larry",
        "ACTIVE",
        customer.stream_id,
    )
    await checkpoint_at(harness, customer.stream_id, 1)
    docs = await orders_of(harness, customer.stream_id)
    assert [(d["customer_name"], d["customer_email"], d["customer_version"]) for d in docs] == [
        ("Late Larry", "larry@example.org", 1)
    ] * 3

    # A new order of a known customer gets the fields straight away.
    [late] = await create_orders(harness, customer.stream_id, 1)
    await checkpoint_at(harness, late.order_id, 1)
    late_doc = await harness.order(late.order_id)
    assert late_doc is not None and (late_doc["customer_name"], late_doc["customer_version"]) == ("Late Larry", 1)
    await harness.emit(customer, CustomerDeactivated())
    deactivated = await customer_at(harness, customer.stream_id, 2)
    assert deactivated["status"] == "DEACTIVATED"
    assert deactivated["order_stats"]["draft_orders"] == 3


async def test_line_edits_of_draft_orders_do_not_write_statistics(harness: Harness) -> None:
    """Only creates, places, cancels and deletes can change statistics, so only they cost a statistics write; a
    placement of an order whose views are complete is an increment: the stamp moves by the order's version step
    (4 -> 5), where a recompute would have stamped the order's version (5)."""
    customer = await register(harness)
    cid = customer.stream_id
    [order] = await create_orders(harness, cid, 1)
    await checkpoint_at(harness, order.order_id, 1)
    before = await customer_doc(harness, cid)
    assert before is not None and before["order_stats"]["draft_orders"] == 1
    for i in range(3):
        last = await harness.emit(order, OrderItemAdded(f"SKU-{i}", "Thing", 1, 100))
    await checkpoint_at(harness, order.order_id, last.version)
    after_lines = await customer_doc(harness, cid)
    assert after_lines is not None
    stats_fields = ("order_stats", "order_stats_version", "order_stats_seq")
    assert [after_lines[f] for f in stats_fields] == [before[f] for f in stats_fields]
    placed = await harness.emit(order, OrderPlaced())
    await checkpoint_at(harness, order.order_id, placed.version)
    after_place = await customer_doc(harness, cid)
    assert after_place is not None
    assert after_place["order_stats_version"] == before["order_stats_version"] + 1
    assert after_place["order_stats_seq"] == before["order_stats_seq"] + 1
    assert after_place["order_stats"]["placed_totals"] == [{"currency": "EUR", "total_minor": 300}]


def stats_writes(harness: Harness) -> dict[str, float]:
    """`cqrs_projector_customer_stats_writes_total` by `how`, summed over the harness's projectors."""
    return {
        how: sum(
            p.metrics.registry.get_sample_value("cqrs_projector_customer_stats_writes_total", {"how": how}) or 0
            for p in harness.projectors
        )
        for how in ("increment", "redone", "recompute")
    }


async def test_customer_order_statistics_follow_creates_places_cancels_and_deletes(harness: Harness) -> None:
    customer = await register(harness)
    cid = customer.stream_id
    eur_placed, eur_cancelled, eur_draft, eur_deleted = await create_orders(harness, cid, 4, "EUR")
    usd_placed, usd_placed_deleted = await create_orders(harness, cid, 2, "USD")
    other = await register(harness, "Other", "other@example.org")
    [others_order] = await create_orders(harness, other.stream_id, 1, "EUR")

    for order, price in ((eur_placed, 1000), (eur_cancelled, 300), (eur_draft, 50), (eur_deleted, 70)):
        await harness.emit(order, OrderItemAdded("SKU-E", "Euro thing", 2, price))
    for order, price in ((usd_placed, 250), (usd_placed_deleted, 999)):
        await harness.emit(order, OrderItemAdded("SKU-U", "Dollar thing", 1, price))
    await harness.emit(others_order, OrderItemAdded("SKU-O", "Other thing", 1, 12345))
    for order in (eur_placed, eur_cancelled, usd_placed, usd_placed_deleted, others_order):
        await harness.emit(order, OrderPlaced())
    await harness.emit(eur_cancelled, OrderCancelled("changed my mind"))
    await harness.emit(eur_deleted, OrderDeleted())
    last = await harness.emit(usd_placed_deleted, OrderDeleted())

    expected = {
        "draft_orders": 1,
        "placed_orders": 2,
        "cancelled_orders": 1,
        "placed_totals": [{"currency": "EUR", "total_minor": 2000}, {"currency": "USD", "total_minor": 250}],
    }

    async def stats() -> Doc | None:
        doc = await customer_doc(harness, cid)
        return doc if doc is not None and doc["order_stats"] == expected else None

    await eventually(stats, what=f"customer statistics {expected}")
    await checkpoint_at(harness, usd_placed_deleted.order_id, last.version)
    await harness.settled("all order events")
    other_doc = await customer_doc(harness, other.stream_id)
    assert other_doc is not None and other_doc["order_stats"]["placed_totals"] == [
        {"currency": "EUR", "total_minor": 12345}
    ]

    # A new order on its own, with the customer's statistics stored and every order at its checkpoint: the batch
    # adds its change to the statistics it read, an increment, and the metric counts it.
    before = stats_writes(harness)
    await create_orders(harness, other.stream_id, 1, "EUR")
    await harness.settled("the other customer's new order")
    writes = stats_writes(harness)
    assert writes == {**before, "increment": before["increment"] + 1}, (before, writes)
    other_doc = await customer_doc(harness, other.stream_id)
    assert other_doc is not None and other_doc["order_stats"]["draft_orders"] == 1

    # Replays change nothing, and write nothing: a replayed event is a duplicate of a stream at its checkpoint,
    # which says every view counts it already. (They were recomputed, a read of every order of the customer, for
    # each such duplicate: a ten-minute soak's redeliveries after a switch kept the projectors at 4 events/s.)
    for order in (eur_placed, eur_cancelled, usd_placed_deleted):
        for event in order.published:
            await harness.publish(event, with_msg_id=False)
    await harness.stats_reach("the replayed events to be duplicates", lambda p: p.stats.duplicates >= 10)
    await harness.settled("the replay")
    doc = await customer_doc(harness, cid)
    assert doc is not None and doc["order_stats"] == expected
    assert doc["name"] == "Ada Lovelace" and doc["version"] == 1
    replayed = stats_writes(harness)
    assert replayed == writes, (writes, replayed)

    indexes = await harness.db["customers"].index_information()
    assert {tuple(k for k, _ in spec["key"]) for name, spec in indexes.items() if name != "_id_"} == {
        ("name", "_id"),
        ("email",),
    }


async def test_a_stream_ahead_of_its_checkpoint_recomputes_statistics_only_when_they_follow_what_it_is_ahead_by(
    harness: Harness,
) -> None:
    """A batch that wrote an order and stopped before its checkpoint leaves the order ahead of it. Ahead by an added
    item (which no statistic follows), the next placement is an increment on the statistics as they are; ahead by
    its creation (which they count), the customer's statistics are recomputed from its orders. Right either way."""
    customer = await register(harness)
    cid = customer.stream_id
    ahead_by_item, ahead_by_creation = await create_orders(harness, cid, 2)
    for order in (ahead_by_item, ahead_by_creation):
        added = await harness.emit(order, OrderItemAdded("SKU-L", "Lamp", 1, 400))
        await checkpoint_at(harness, order.order_id, added.version)
    # What a batch stopped between the documents and their checkpoints leaves behind.
    await harness.db["checkpoints"].update_one({"_id": ahead_by_item.order_id}, {"$set": {"version": 1}})
    await harness.db["checkpoints"].delete_one({"_id": ahead_by_creation.order_id})

    before = stats_writes(harness)
    placed = await harness.emit(ahead_by_item, OrderPlaced())
    await checkpoint_at(harness, ahead_by_item.order_id, placed.version)
    after_item = stats_writes(harness)
    assert after_item == {**before, "increment": before["increment"] + 1}, (before, after_item)

    placed = await harness.emit(ahead_by_creation, OrderPlaced())
    await checkpoint_at(harness, ahead_by_creation.order_id, placed.version)
    after_creation = stats_writes(harness)
    assert after_creation == {**after_item, "recompute": after_item["recompute"] + 1}, (after_item, after_creation)

    doc = await customer_doc(harness, cid)
    assert doc is not None
    assert doc["order_stats"] == {
        "draft_orders": 0,
        "placed_orders": 2,
        "cancelled_orders": 0,
        "placed_totals": [{"currency": "EUR", "total_minor": 800}],
    }


async def test_a_checkpoint_is_written_only_after_the_views_derived_from_its_stream(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(projector_batch_size=8)
    await h.start_projector()
    customer = await register(h, "Rename 1")
    orders = await create_orders(h, customer.stream_id, 20)
    violations: list[str] = []
    stop = asyncio.Event()

    async def watch() -> int:
        checks = 0
        order_ids = [o.order_id for o in orders]
        while True:  # at least one look, and one more after the last rename is checkpointed
            last = stop.is_set()
            # Orders applied completely first (their checkpoint, written after their own views), then the customer's
            # checkpoint, then the documents: orders only move forward, so what is read later is at least as new.
            # An order still being applied in another partition may briefly carry an older customer version (its
            # own fan-out step fixes it before its checkpoint); the customer's checkpoint promises only the orders
            # that existed when its views ran.
            applied = {d["_id"] async for d in h.db["checkpoints"].find({"_id": {"$in": order_ids}}, {"_id": 1})}
            cp = await checkpoint(h, customer.stream_id)
            docs = await orders_of(h, customer.stream_id)
            if cp is not None:
                checks += 1
                behind = [d["_id"] for d in docs if d["_id"] in applied and d["customer_version"] < cp["version"]]
                if behind:
                    violations.append(f"checkpoint v{cp['version']} but {len(behind)} orders behind")
            if last:
                return checks
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    try:
        for n in range(2, 8):
            await h.emit(customer, CustomerRenamed(f"Rename {n}"))
        cp = await checkpoint_at(h, customer.stream_id, 7)
    finally:
        stop.set()
        checks = await watcher
    assert violations == []
    assert checks > 0
    assert (cp["stream_type"], cp["version"], cp["position"]) == ("customer", 7, customer.published[-1].position)
    assert cp["updated_at"] is not None

    await h.settled("all renames")
    for order in orders:
        order_cp = await checkpoint(h, order.order_id)
        assert order_cp is not None
        assert (order_cp["stream_type"], order_cp["version"], order_cp["position"]) == (
            "order",
            1,
            order.published[0].position,
        )
    docs = await orders_of(h, customer.stream_id)
    assert {(d["customer_name"], d["customer_version"]) for d in docs} == {("Rename 7", 7)}


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body: bytes = response.read()
    return body.decode()


def _sample(text: str, name: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def test_metrics_are_served_over_http(harness_factory: Callable[..., Awaitable[Harness]]) -> None:
    h = await harness_factory()
    projector = await h.start_projector(projector_metrics_port=0)
    port = projector.metrics_port
    assert port is not None and port > 0
    customer = await register(h)
    [order] = await create_orders(h, customer.stream_id, 1)
    await h.publish(order.published[0], with_msg_id=False)  # a duplicate
    await h.settled("three messages")

    async def scraped() -> str | None:
        text = await asyncio.to_thread(_scrape, port)
        ready = (_sample(text, "cqrs_projector_events_duplicate_total") or 0) >= 1
        ready = ready and _sample(text, "cqrs_projector_consumer_pending") == 0
        return text if ready and _sample(text, "cqrs_projector_consumer_ack_pending") == 0 else None

    text = await eventually(scraped, what="/metrics to show the duplicate and an idle consumer")
    assert _sample(text, "cqrs_projection_lag_seconds_count") == 2
    assert (_sample(text, "cqrs_projection_lag_seconds_sum") or 0) > 0
    assert 'cqrs_projection_lag_seconds_bucket{le="0.001"}' in text
    assert 'cqrs_projection_lag_seconds_bucket{le="60.0"}' in text
    assert _sample(text, "cqrs_projector_events_applied_total") == 2
    assert _sample(text, "cqrs_projector_dead_letters_total") == 0
    assert _sample(text, "cqrs_projector_mongo_up") == 1

    # Another projector in the same process has metrics of its own.
    other = await h.start_projector(projector_durable=f"{h.settings.projector_durable}-2", projector_metrics_port=0)
    assert other.metrics_port not in (None, port)
    await h.stats_reach("the second projector to see 3 duplicates", lambda p: p is other and p.stats.duplicates == 3)
    assert other.metrics_port is not None
    second = await asyncio.to_thread(_scrape, other.metrics_port)
    assert (
        _sample(second, "cqrs_projector_events_duplicate_total"),
        _sample(second, "cqrs_projector_events_applied_total"),
    ) == (3, 0)
    assert _sample(await asyncio.to_thread(_scrape, port), "cqrs_projector_events_applied_total") == 2

    await projector.stop()
    assert projector.metrics_port is None
    try:
        await asyncio.to_thread(_scrape, port)
    except OSError:
        pass
    else:
        raise AssertionError("/metrics still served after stop()")


async def test_a_checkpoint_never_covers_a_derived_view_that_mongodb_refused(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(projector_park_after_deliveries=4)
    customer_id = str(uuid.uuid4())
    # MongoDB refuses order statistics with a draft order for this one customer (as a validator added by hand,
    # or a disk-full replica, would): the documents get written, their derived view does not.
    refuse = {"$or": [{"_id": {"$ne": customer_id}}, {"order_stats.draft_orders": {"$lte": 0}}]}
    await h.db.create_collection("customers", validator=refuse)
    await h.start_projector()
    await h.start_projector()  # two replicas racing on one durable consumer
    customer = Stream(customer_id, stream_type="customer")
    await h.emit(customer, CustomerRegistered(customer_id, "Val Idator", "val@example.org"))
    await customer_at(h, customer_id, 1)

    [order] = await create_orders(h, customer_id, 1)  # its statistics (one draft) are refused
    await h.order_at(order.order_id, 1)
    await h.emit(order, OrderItemAdded("SKU-A", "Anvil", 1, 100))  # a line edit: no statistic of its own
    await h.order_at(order.order_id, 2)
    bystander = await register(h, "By Stander", "by@example.org")
    [flowing] = await create_orders(h, bystander.stream_id, 1)
    await checkpoint_at(h, flowing.order_id, 1)  # other streams' checkpoints move on

    async def retried_a_few_times() -> bool:
        redeliveries = sum(
            p.metrics.registry.get_sample_value("cqrs_projector_redeliveries_total") or 0 for p in h.projectors
        )
        return redeliveries >= 3

    await eventually(retried_a_few_times, what="the refused batch to be offered again", timeout=30)

    async def parked() -> bool:
        doc = await checkpoint(h, order.order_id)
        return doc is not None and doc.get("parked", {}).get("kind") == "write_failed"

    # Offered `park_after` times, the stream parks (holding no JetStream slot); the projectors keep trying it.
    await eventually(parked, what="the stream to park as write_failed", timeout=30)
    for _ in range(30):  # and stays so: no batch may claim version 1 or 2 while the statistics are missing
        cp = await checkpoint(h, order.order_id)
        assert cp is None or cp["version"] == 0, f"checkpoint {cp} covers a version whose statistics are missing"
        stats = (await customer_doc(h, customer_id) or {}).get("order_stats", {})
        assert stats.get("draft_orders", 0) == 0
        await asyncio.sleep(0.05)

    await h.db.command("collMod", "customers", validator={})  # the cause is fixed
    cp = await checkpoint_at(h, order.order_id, 2)
    assert cp["version"] == 2
    doc = await customer_at(h, customer_id, 1)
    assert doc["order_stats"]["draft_orders"] == 1
    assert (await h.order(order.order_id) or {}).get("customer_name") == "Val Idator"
    await h.settled("everything applied once the statistics could be written")

    async def unparked() -> bool:
        return await h.db["checkpoints"].count_documents({"parked": {"$exists": True}}) == 0

    await eventually(unparked, what="no parked stream left")


async def test_two_replicas_end_with_correct_documents_views_and_checkpoints(
    harness_factory: Callable[..., Awaitable[Harness]],
) -> None:
    h = await harness_factory(projector_batch_size=5)
    await h.start_projector()
    await h.start_projector()
    customers = [await register(h, f"Customer {n}", f"c{n}@example.org") for n in range(3)]
    orders = {c.stream_id: await create_orders(h, c.stream_id, 6) for c in customers}
    for round_ in range(3):
        for customer in customers:
            await h.emit(customer, CustomerRenamed(f"{customer.stream_id[:4]} rename {round_}"))
            for n, order in enumerate(orders[customer.stream_id]):
                if round_ == 0:
                    await h.emit(order, OrderItemAdded("SKU-A", "Anvil", n + 1, 100))
                elif round_ == 1 and n % 2 == 0:
                    await h.emit(order, OrderPlaced())
                elif round_ == 2 and n % 3 == 0:
                    await h.emit(order, OrderCancelled("changed my mind"))

    for customer in customers:
        await checkpoint_at(h, customer.stream_id, 4)
        for order in orders[customer.stream_id]:
            await checkpoint_at(h, order.order_id, len(order.published))
    await h.settled("both replicas done", timeout=30)

    for customer in customers:
        final_name = f"{customer.stream_id[:4]} rename 2"
        docs = await orders_of(h, customer.stream_id)
        assert {(d["customer_name"], d["customer_version"]) for d in docs} == {(final_name, 4)}
        by_status = {"DRAFT": 0, "PLACED": 0, "CANCELLED": 0}
        placed_total = 0
        for order, doc in zip(orders[customer.stream_id], sorted(docs, key=lambda d: d["created_at"]), strict=True):
            assert doc["version"] == len(order.published)
            by_status[doc["status"]] += 1
            placed_total += doc["total_minor"] if doc["status"] == "PLACED" else 0
            cp = await checkpoint(h, order.order_id)
            assert cp is not None and (cp["version"], cp["position"]) == (
                len(order.published),
                order.published[-1].position,
            )
        view = await customer_doc(h, customer.stream_id)
        assert view is not None and view["name"] == final_name
        assert view["order_stats"] == {
            "draft_orders": by_status["DRAFT"],
            "placed_orders": by_status["PLACED"],
            "cancelled_orders": by_status["CANCELLED"],
            "placed_totals": [{"currency": "EUR", "total_minor": placed_total}] if placed_total else [],
        }
        assert (await checkpoint(h, customer.stream_id) or {}).get("version") == 4
