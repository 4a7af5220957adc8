"""Read-your-writes on the query side against a real MongoDB-wire server: queries with consistency tokens.

Each test inserts read-model documents and `checkpoints` directly (as the projector writes them: the checkpoint
last) and calls an in-process query server through a real gRPC channel.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any, cast

import grpc
import pytest
from cqrs.orders.v1 import (
    consistency_pb2,
    customer_service_pb2,
    customer_service_pb2_grpc,
    order_pb2,
    query_service_pb2,
)
from cqrs.orders.v1 import query_service_pb2_grpc as qgrpc
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from core.consistency import ConsistencyToken
from core.errors import Unavailable
from core.grpc_errors import field_violations
from core.log_throttle import per_request
from core.rpc_table import Context
from localservers import free_port
from query_service.api.runner import Query, QueryRunner
from query_service.config import QuerySettings
from query_service.consistency import ConsistencyWaiter, ReadYourWrites, Requirement
from query_service.server import RunningServer, start_query_server
from tests.integration.test_query_service import T0, make_order
from tests.support import eventually

if TYPE_CHECKING:
    from cqrs.orders.v1.customer_service_pb2_grpc import CustomerQueryServiceAsyncStub as CustomerStub
    from cqrs.orders.v1.query_service_pb2_grpc import OrderQueryServiceAsyncStub as Stub

Document = dict[str, Any]


def token(stream_id: str, version: int, stream_type: str = "order") -> str:
    return ConsistencyToken(stream_type, stream_id, version, position=1000 + version).encode()


def consistency(*tokens: str, accept_stale: bool = False) -> consistency_pb2.ConsistencyRequirement:
    return consistency_pb2.ConsistencyRequirement(consistency_tokens=list(tokens), accept_stale=accept_stale)


async def set_checkpoint(db: AsyncDatabase[Document], stream_id: str, version: int, stream_type: str = "order") -> None:
    """Raises a stream's checkpoint as the projector does (`$max`, last in its batch)."""
    await db["checkpoints"].update_one(
        {"_id": stream_id},
        {
            "$max": {"version": version, "position": 1000 + version},
            "$set": {"stream_type": stream_type, "updated_at": dt.datetime.now(dt.UTC)},
        },
        upsert=True,
    )


async def put_order(db: AsyncDatabase[Document], version: int, order_id: str | None = None) -> Document:
    """An order document at `version` with its checkpoint (document first, checkpoint last)."""
    doc = make_order(created_at=T0, order_id=order_id) | {"version": version}
    await db["orders"].replace_one({"_id": doc["_id"]}, doc, upsert=True)
    await set_checkpoint(db, doc["_id"], version)
    return doc


# -------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
async def db(mongo_url: str, unique_name: str) -> AsyncIterator[AsyncDatabase[Document]]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(mongo_url, tz_aware=True)
    try:
        yield client[unique_name]
        await client.drop_database(unique_name)
    finally:
        await client.close()


async def _server(mongo_url: str, database: str, **overrides: Any) -> RunningServer:
    settings = QuerySettings(
        mongo_url=mongo_url, mongo_database=database, query_listen="127.0.0.1:0", grace_seconds=1, **overrides
    )
    return await start_query_server(settings, health_interval=0.2)


@pytest.fixture
async def query_server(mongo_url: str, unique_name: str) -> AsyncIterator[RunningServer]:
    running = await _server(mongo_url, unique_name)
    try:
        yield running
    finally:
        await running.stop()


@pytest.fixture
async def channel(query_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{query_server.port}") as chan:
        yield chan


@pytest.fixture
def stub(channel: grpc.aio.Channel) -> Stub:
    return qgrpc.OrderQueryServiceStub(channel)


@pytest.fixture
def customer_stub(channel: grpc.aio.Channel) -> CustomerStub:
    return customer_service_pb2_grpc.CustomerQueryServiceStub(channel)


# ----------------------------------------------------------------------------------------------------- tests


async def test_without_tokens_the_response_says_it_did_not_wait(db: AsyncDatabase[Document], stub: Stub) -> None:
    doc = await put_order(db, 3)

    response = await stub.GetOrder(query_service_pb2.GetOrderRequest(order_id=doc["_id"]))

    assert response.consistency == consistency_pb2.ReadConsistency()  # stale=false, waited_ms=0, behind=[]


async def test_a_reflected_token_answers_at_once_and_then_without_any_query(
    db: AsyncDatabase[Document], stub: Stub, query_server: RunningServer
) -> None:
    doc = await put_order(db, 3)
    request = query_service_pb2.GetOrderRequest(order_id=doc["_id"], consistency=consistency(token(doc["_id"], 3)))

    first = await stub.GetOrder(request, timeout=5)
    queries = query_server.consistency_waiter.queries
    again = await stub.GetOrder(request, timeout=5)
    older = await stub.GetOrder(
        query_service_pb2.GetOrderRequest(order_id=doc["_id"], consistency=consistency(token(doc["_id"], 1))),
        timeout=5,
    )

    for response in (first, again, older):
        assert response.order.version == 3
        assert not response.consistency.stale and not response.consistency.behind
    assert first.consistency.waited_ms < 500
    assert again.consistency.waited_ms == 0 and older.consistency.waited_ms == 0
    assert query_server.consistency_waiter.queries == queries, "a known-reflected token queried MongoDB"


async def test_a_token_reflected_later_is_waited_for(db: AsyncDatabase[Document], stub: Stub) -> None:
    doc = await put_order(db, 1)

    async def project_later() -> None:
        await asyncio.sleep(0.3)
        await put_order(db, 2, order_id=doc["_id"])

    started = time.monotonic()
    projector = asyncio.create_task(project_later())
    response = await stub.GetOrder(
        query_service_pb2.GetOrderRequest(order_id=doc["_id"], consistency=consistency(token(doc["_id"], 2))),
        timeout=10,
    )
    elapsed = time.monotonic() - started
    await projector

    assert response.order.version == 2
    assert not response.consistency.stale
    assert 250 <= response.consistency.waited_ms <= elapsed * 1000 + 1
    assert elapsed >= 0.3


async def test_an_unreachable_token_is_unavailable_within_the_deadline_saying_how_far_behind(
    db: AsyncDatabase[Document], stub: Stub
) -> None:
    doc = await put_order(db, 2)
    request = query_service_pb2.GetOrderRequest(order_id=doc["_id"], consistency=consistency(token(doc["_id"], 5)))

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrder(request, timeout=1.0)
    elapsed = time.monotonic() - started

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # ours, not DEADLINE_EXCEEDED
    details = caught.value.details() or ""
    assert f"order {doc['_id']} is at version 2, the token needs 5" in details, details
    assert "after waiting 0.8" in details, details  # 1 s minus the margin that keeps us ahead of the deadline
    assert "accept_stale" in details
    assert 0.7 < elapsed < 1.0


async def test_accept_stale_answers_with_what_is_there_marked_stale(db: AsyncDatabase[Document], stub: Stub) -> None:
    doc = await put_order(db, 2)
    unknown_customer = str(uuid.uuid4())
    request = query_service_pb2.GetOrderRequest(
        order_id=doc["_id"],
        consistency=consistency(
            token(doc["_id"], 5), token(unknown_customer, 1, "customer"), token(doc["_id"], 2), accept_stale=True
        ),
    )

    response = await stub.GetOrder(request, timeout=1.0)

    assert response.order.version == 2
    assert response.consistency.stale
    assert 700 <= response.consistency.waited_ms < 1000
    behind = {
        (lag.stream_type, lag.stream_id, lag.required_version, lag.applied_version)
        for lag in response.consistency.behind
    }
    assert behind == {("order", doc["_id"], 5, 2), ("customer", unknown_customer, 1, 0)}


async def test_the_server_caps_the_wait_below_a_long_deadline(mongo_url: str, db: AsyncDatabase[Document]) -> None:
    doc = await put_order(db, 1)
    running = await _server(mongo_url, db.name, query_max_wait_seconds=0.3)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as chan:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await qgrpc.OrderQueryServiceStub(chan).ListOrders(
                    query_service_pb2.ListOrdersRequest(consistency=consistency(token(doc["_id"], 2))), timeout=30
                )
            elapsed = time.monotonic() - started
    finally:
        await running.stop()

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert 0.3 <= elapsed < 2


@pytest.mark.parametrize("bad", ["", "v1.", "v1.bm90IGpzb24", "v2.eyJ0IjoibyJ9", "x" * 600, token("o", 1)[:-3] + "!!!"])
async def test_a_malformed_token_is_invalid_argument_naming_it(stub: Stub, bad: str) -> None:
    request = query_service_pb2.GetOrderRequest(
        order_id="not-a-uuid", consistency=consistency(token(str(uuid.uuid4()), 1), bad)
    )

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrder(request, timeout=5)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(field for field, _ in field_violations(caught.value)) == [
        "consistency.consistency_tokens[1]",
        "order_id",
    ]


async def test_every_query_takes_tokens_and_reports_its_consistency(
    db: AsyncDatabase[Document], stub: Stub, customer_stub: CustomerStub
) -> None:
    order = await put_order(db, 4)
    customer_id = str(uuid.uuid4())
    await db["customers"].insert_one(
        {"_id": customer_id, "customer_id": customer_id, "name": "Ada", "email": "ada@example.com",
         "status": "ACTIVE", "version": 2, "position": 77}
    )  # fmt: skip
    await set_checkpoint(db, customer_id, 2, "customer")
    tokens = consistency(token(order["_id"], 4), token(customer_id, 2, "customer"))
    late = consistency(token(order["_id"], 9), accept_stale=True)

    answers: list[Any] = [  # replies of four message types, each with its `consistency`
        await stub.ListOrders(query_service_pb2.ListOrdersRequest(consistency=tokens), timeout=5),
        await customer_stub.GetCustomer(
            customer_service_pb2.GetCustomerRequest(customer_id=customer_id, consistency=tokens), timeout=5
        ),
        await customer_stub.ListCustomers(customer_service_pb2.ListCustomersRequest(consistency=tokens), timeout=5),
    ]
    stale: list[Any] = [
        await stub.ListOrders(query_service_pb2.ListOrdersRequest(consistency=late), timeout=1.0),
        await customer_stub.GetCustomer(
            customer_service_pb2.GetCustomerRequest(customer_id=customer_id, consistency=late), timeout=1.0
        ),
        await customer_stub.ListCustomers(customer_service_pb2.ListCustomersRequest(consistency=late), timeout=1.0),
    ]

    assert all(not a.consistency.stale and not a.consistency.behind for a in answers)
    assert all(s.consistency.stale and [lag.required_version for lag in s.consistency.behind] == [9] for s in stale)
    for bad_call in (
        stub.ListOrders(query_service_pb2.ListOrdersRequest(consistency=consistency("junk")), timeout=5),
        customer_stub.ListCustomers(customer_service_pb2.ListCustomersRequest(consistency=consistency("junk"))),
        customer_stub.GetCustomer(
            customer_service_pb2.GetCustomerRequest(customer_id=customer_id, consistency=consistency("junk"))
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await bad_call
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in field_violations(caught.value)] == ["consistency.consistency_tokens[0]"]


async def test_two_hundred_waiting_queries_share_one_poll(
    db: AsyncDatabase[Document], stub: Stub, query_server: RunningServer
) -> None:
    docs = [await put_order(db, 1) for _ in range(20)]
    waiter = query_server.consistency_waiter
    queries_before = waiter.queries

    async def query(i: int) -> query_service_pb2.GetOrderResponse:
        doc = docs[i % len(docs)]
        request = query_service_pb2.GetOrderRequest(order_id=doc["_id"], consistency=consistency(token(doc["_id"], 2)))
        return await stub.GetOrder(request, timeout=20)

    started = time.monotonic()
    calls = [asyncio.create_task(query(i)) for i in range(200)]

    async def all_waiting() -> bool:
        return waiter.waiting == 200

    try:
        await eventually(all_waiting, what="200 queries waiting for their tokens", interval=0.01)
        await asyncio.sleep(0.3)  # the queries wait a while; the poll runs meanwhile
        for doc in docs:
            await put_order(db, 2, order_id=doc["_id"])
        responses = await asyncio.wait_for(asyncio.gather(*calls), timeout=20)
    finally:
        for call in calls:
            call.cancel()

    elapsed = time.monotonic() - started
    assert all(r.order.version == 2 and not r.consistency.stale for r in responses)
    rounds = waiter.queries - queries_before
    # One query per round of 15 ms at most, however many requests wait (per request it would be ~200 x rounds).
    print(f"{rounds} checkpoint queries in {elapsed:.2f}s for 200 waiting requests")
    assert 1 <= rounds <= elapsed / 0.015 + 2, f"{rounds} checkpoint queries in {elapsed:.2f}s"
    assert waiter.waiting == 0


async def test_waiting_queries_beyond_the_limit_are_resource_exhausted(
    mongo_url: str, db: AsyncDatabase[Document], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="query_service.api.runner")
    per_request.clear()  # lines other tests of this process logged must not count against this one's
    doc = await put_order(db, 1)
    running = await _server(mongo_url, db.name, query_max_waiters=2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as chan:
            stub = qgrpc.OrderQueryServiceStub(chan)
            request = query_service_pb2.GetOrderRequest(
                order_id=doc["_id"], consistency=consistency(token(doc["_id"], 2), accept_stale=True)
            )
            waiting = [asyncio.ensure_future(stub.GetOrder(request, timeout=3)) for _ in range(2)]

            async def two_waiting() -> bool:
                return running.consistency_waiter.waiting == 2

            await eventually(two_waiting, what="two queries waiting for their token", interval=0.01)
            refused = []
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetOrder(request, timeout=3)
                refused.append(caught.value)
            stale = await asyncio.gather(*waiting)
    finally:
        await running.stop()

    for refusal in refused:
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "too many queries are waiting" in (refusal.details() or "")
    assert all(r.consistency.stale for r in stale)
    # three refused, one line (per method and window)
    lines = [r.getMessage() for r in caplog.records if r.name == "query_service.api.runner"]
    assert len(lines) == 1 and lines[0].startswith("GetOrder: too many queries are waiting"), lines


async def test_mongodb_down_while_waiting_is_unavailable() -> None:
    settings = QuerySettings(
        mongo_url=f"mongodb://127.0.0.1:{free_port()}/?directConnection=true",
        mongo_database="unreachable",
        query_listen="127.0.0.1:0",
        mongo_timeout_ms=300,
        grace_seconds=0,
    )
    running = await start_query_server(settings, health_interval=0.1)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as chan:
            order_id = str(uuid.uuid4())
            request = query_service_pb2.GetOrderRequest(order_id=order_id, consistency=consistency(token(order_id, 1)))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await qgrpc.OrderQueryServiceStub(chan).GetOrder(request, timeout=10)
    finally:
        await running.stop()

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert caught.value.details() == "read model (MongoDB) is unavailable; retry later"


# ------------------------------------------------------------------------------------- tokens are input


def forged(body: object) -> str:
    """A token of our format around any JSON body (what a client could forge)."""
    raw = json.dumps(body, separators=(",", ":")).encode()
    return "v1." + base64.urlsafe_b64encode(raw).decode().rstrip("=")


_ID = "3f2c8a9e-5b1d-4c7a-9e2f-0a1b2c3d4e5f"


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (forged({"t": "invoice", "s": _ID, "v": 1, "p": 1}), "unknown stream type"),
        (forged({"t": "order", "s": "x" * 300, "v": 1, "p": 1}), "stream id"),
        (forged({"t": "order", "s": _ID.upper(), "v": 1, "p": 1}), "stream id"),
        (forged({"t": "order", "s": "a\u0000b", "v": 1, "p": 1}), "stream id"),
        (forged({"t": "order", "s": _ID, "v": 2**63, "p": 1}), "version"),
        (forged({"t": "order", "s": _ID, "v": 10**40, "p": 1}), "version"),
        (forged({"t": "order", "s": _ID, "v": 0, "p": 1}), "version"),
        (forged({"t": "order", "s": _ID, "v": True, "p": 1}), "version"),
        (forged({"t": "order", "s": _ID, "v": 1.5, "p": 1}), "version"),
        (forged({"t": "order", "s": _ID, "v": 1, "p": 2**64}), "position"),
        (forged({"t": ["order"], "s": _ID, "v": 1, "p": 1}), "unknown stream type"),
        (forged([[[[[[[[]]]]]]]]), "malformed"),
        ("v1." + base64.urlsafe_b64encode(b"\xff\xfe garbage").decode(), "malformed"),
    ],
)
async def test_a_forged_token_is_invalid_argument_saying_why(stub: Stub, bad: str, why: str) -> None:
    order_id = str(uuid.uuid4())
    request = query_service_pb2.GetOrderRequest(order_id=order_id, consistency=consistency(bad))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrder(request, timeout=5)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = field_violations(caught.value)
    assert [f for f, _ in violations] == ["consistency.consistency_tokens[0]"]
    assert why in violations[0][1]


async def test_a_token_with_the_largest_version_waits_and_answers_stale(
    db: AsyncDatabase[Document], stub: Stub
) -> None:
    doc = await put_order(db, 1)
    request = query_service_pb2.GetOrderRequest(
        order_id=doc["_id"],
        consistency=consistency(ConsistencyToken("order", doc["_id"], 2**63 - 1, 1).encode(), accept_stale=True),
    )

    response = await stub.GetOrder(request, timeout=1.0)

    assert response.consistency.stale
    assert [(lag.required_version, lag.applied_version) for lag in response.consistency.behind] == [(2**63 - 1, 1)]


async def test_more_than_a_hundred_tokens_are_one_violation(stub: Stub) -> None:
    tokens = [token(str(uuid.uuid4()), 1) for _ in range(101)]
    request = query_service_pb2.ListOrdersRequest(consistency=consistency(*tokens))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOrders(request, timeout=5)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in field_violations(caught.value)] == ["consistency.consistency_tokens"]


async def test_a_flood_of_waiting_tokens_keeps_every_checkpoint_query_small(db: AsyncDatabase[Document]) -> None:
    """4,000 waiting queries with 100 unknown streams each (as forged tokens would make): 400,000 streams, whose
    single `$in` would exceed MongoDB's 16 MB document limit. Every poll must stay small, nobody may fail, and a
    query with one real token among them is still answered."""
    real = await put_order(db, 1)
    waiter = ConsistencyWaiter(db["checkpoints"], poll_interval=0.01)
    flood = [
        [Requirement("order", str(uuid.uuid4()), 1) for _ in range(100)]  # never reflected
        for _ in range(4_000)
    ]
    try:
        flooding = [asyncio.create_task(waiter.wait(reqs, timeout=8.0)) for reqs in flood]
        await eventually(lambda: _true(waiter.waiting == len(flood)), what="the flood to wait", interval=0.01)
        started = time.monotonic()
        outcome = await waiter.wait([Requirement("order", real["_id"], 1)], timeout=6.0)
        waited = time.monotonic() - started
        assert waiter.last_error is None, f"the shared poll failed: {waiter.last_error!r}"
        assert outcome.reached, f"a real token was not seen among the flood within {waited:.2f}s"
        for task in flooding:
            task.cancel()
        results = await asyncio.gather(*flooding, return_exceptions=True)
    finally:
        await waiter.close()
    failures = [r for r in results if isinstance(r, BaseException) and not isinstance(r, asyncio.CancelledError)]
    assert failures == [], f"{len(failures)} flooding waits failed, e.g. {failures[:1]!r}"


async def _true(value: bool) -> bool:
    return value


async def test_a_hundred_malformed_tokens_are_one_short_invalid_argument(stub: Stub) -> None:
    """Every violation spelled out would exceed gRPC's 16 KB trailer limit (RESOURCE_EXHAUSTED, not our answer)."""
    tokens = [token(str(uuid.uuid4()), 1)[:-4] + "AAAA!" for _ in range(100)]
    request = query_service_pb2.ListOrdersRequest(consistency=consistency(*tokens))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOrders(request, timeout=5)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    fields = [f for f, _ in field_violations(caught.value)]
    assert fields[-1] == "consistency.consistency_tokens" and len(fields) == 6


async def test_the_waiter_records_each_wait_and_its_own_share_after_the_last_checkpoint(
    db: AsyncDatabase[Document],
) -> None:
    """`consistency_wait` is a query's whole wait; `checkpoint_to_seen` only what the waiter added after the last
    checkpoint the query needed was written (its tick and query). The checkpoints come long after the queries
    began to wait and 0.2 s apart, so counting from the arrival, or from the first checkpoint, would show."""
    registry = CollectorRegistry()
    waiter = ConsistencyWaiter(db["checkpoints"], poll_interval=0.01, registry=registry)
    first, second = await put_order(db, 1), await put_order(db, 1)
    try:
        waits = [
            asyncio.create_task(waiter.wait([Requirement("order", first["_id"], 2)], timeout=10.0)),
            asyncio.create_task(
                waiter.wait([Requirement("order", first["_id"], 2), Requirement("order", second["_id"], 2)], 10.0)
            ),
        ]
        await asyncio.sleep(0.4)
        await set_checkpoint(db, first["_id"], 2)
        await asyncio.sleep(0.2)
        await set_checkpoint(db, second["_id"], 2)
        outcomes = await asyncio.gather(*waits)
    finally:
        await waiter.close()
    assert all(outcome.reached for outcome in outcomes)

    def stage(name: str, part: str) -> float | None:
        return registry.get_sample_value(f"cqrs_query_stage_seconds_{part}", {"stage": name})

    assert stage("consistency_wait", "count") == 2 and stage("checkpoint_to_seen", "count") == 2
    waited = stage("consistency_wait", "sum")
    assert waited is not None and waited >= 0.4 + 0.6, waited
    after_checkpoints = stage("checkpoint_to_seen", "sum")
    assert after_checkpoints is not None and 0 <= after_checkpoints < 0.15, after_checkpoints


async def test_a_waiter_loop_that_fails_unexpectedly_fails_its_waiters_fast_and_restarts(
    db: AsyncDatabase[Document], caplog: pytest.LogCaptureFixture
) -> None:
    real = await put_order(db, 1)
    waiter = ConsistencyWaiter(db["checkpoints"], poll_interval=0.01)
    book = waiter._book  # inject a bug into our own bookkeeping, once
    observe = book.observe
    calls = 0

    def broken_once(versions: Mapping[str, int]) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("injected bug in the waiter loop")
        return observe(versions)

    book.observe = broken_once  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        with pytest.raises(Unavailable, match="retry"):
            await waiter.wait([Requirement("order", real["_id"], 1)], timeout=5.0)
        assert time.monotonic() - started < 2.0  # failed at once, not at its deadline
        assert any("consistency waiter failed" in r.getMessage() and r.exc_info for r in caplog.records)
        outcome = await waiter.wait([Requirement("order", real["_id"], 1)], timeout=5.0)  # restarted
        assert outcome.reached
    finally:
        await waiter.close()


# ------------------------------------------------------------------------------ across a generation switch


async def activate(base: AsyncDatabase[Document], database: AsyncDatabase[Document], generation: int) -> None:
    """Makes `database` the active read-model generation, as `cqrs rebuild --cutover` or `--activate` does."""
    await base["read_model_generations"].replace_one(
        {"_id": "active"},
        {"_id": "active", "generation": generation, "database": database.name, "versions": {},
         "switched_at": dt.datetime.now(dt.UTC)},
        upsert=True,
    )  # fmt: skip


@pytest.fixture
async def next_generation(db: AsyncDatabase[Document]) -> AsyncIterator[AsyncDatabase[Document]]:
    database = db.client[f"{db.name}_g2"]
    try:
        yield database
    finally:
        await db.client.drop_database(database.name)


async def test_a_token_the_old_generation_reflected_is_waited_for_on_the_new_one(
    mongo_url: str, db: AsyncDatabase[Document], next_generation: AsyncDatabase[Document]
) -> None:
    """A switch's target can be behind the generation it replaces for a moment (it catches up on the last events
    while already active; a rollback's target longer): what the query service saw in the old one must not answer
    a token in the new one."""
    await activate(db, db, 1)
    doc = await put_order(db, 3)
    await put_order(next_generation, 1, order_id=doc["_id"])  # the target, still behind
    request = query_service_pb2.GetOrderRequest(order_id=doc["_id"], consistency=consistency(token(doc["_id"], 3)))
    running = await _server(mongo_url, db.name, generation_poll_seconds=0.05)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as chan:
            stub = qgrpc.OrderQueryServiceStub(chan)
            assert (await stub.GetOrder(request, timeout=5)).order.version == 3  # seen in generation 1

            await activate(db, next_generation, 2)

            async def switched() -> bool:
                plain = query_service_pb2.GetOrderRequest(order_id=doc["_id"])
                return (await stub.GetOrder(plain, timeout=5)).order.version == 1

            await eventually(switched, what="the query service to read generation 2")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetOrder(request, timeout=1.0)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert f"order {doc['_id']} is at version 1, the token needs 3" in (caught.value.details() or "")

            async def catch_up() -> None:
                await asyncio.sleep(0.3)
                await put_order(next_generation, 3, order_id=doc["_id"])

            caught_up = asyncio.create_task(catch_up())
            response = await stub.GetOrder(request, timeout=10)
            await caught_up
    finally:
        await running.stop()
    assert response.order.version == 3 and not response.consistency.stale
    assert response.consistency.waited_ms >= 250


async def test_checkpoints_read_while_the_generation_switches_do_not_count_for_the_new_one(
    db: AsyncDatabase[Document], next_generation: AsyncDatabase[Document]
) -> None:
    doc = await put_order(db, 3)
    await put_order(next_generation, 1, order_id=doc["_id"])
    waiter = ConsistencyWaiter(db["checkpoints"], poll_interval=0.01)
    try:
        waiting = asyncio.create_task(waiter.wait([Requirement("order", doc["_id"], 3)], timeout=1.0))
        for _ in range(100):  # one turn of the loop at a time, until the poll's query has been sent
            if waiter.queries:
                break
            await asyncio.sleep(0)
        assert waiter.queries == 1
        waiter.use_database(next_generation)  # while generation 1's answer (version 3) is on its way
        outcome = await waiting
    finally:
        await waiter.close()
    assert not outcome.reached, "answered by a poll of the generation switched away from"
    assert [(lag.required, lag.applied) for lag in outcome.behind] == [(3, 1)]


async def test_a_query_read_across_a_switch_waits_and_reads_again_in_the_new_generation(
    db: AsyncDatabase[Document], next_generation: AsyncDatabase[Document]
) -> None:
    """The switch can land between a query's wait and its read: its answer then comes from a generation its tokens
    were not checked against, so it waits there and reads again."""
    doc = await put_order(db, 3)
    await put_order(next_generation, 1, order_id=doc["_id"])
    waiter = ConsistencyWaiter(db["checkpoints"], poll_interval=0.01)
    databases = [db]

    async def read(source: None, order_id: str, read_consistency: consistency_pb2.ReadConsistency) -> Any:
        if len(databases) == 1:  # the first read: the switch lands just before it
            waiter.use_database(next_generation)
            databases.append(next_generation)
            asyncio.get_running_loop().call_later(
                0.3, lambda: asyncio.ensure_future(put_order(next_generation, 3, order_id))
            )
        found = await databases[-1]["orders"].find_one({"_id": order_id})
        assert found is not None
        return query_service_pb2.GetOrderResponse(
            order=order_pb2.Order(version=found["version"]), consistency=read_consistency
        )

    entry: Query[Any, None, str, Any] = Query(query_service_pb2.GetOrderRequest, lambda r: r.order_id, read)
    request = query_service_pb2.GetOrderRequest(order_id=doc["_id"], consistency=consistency(token(doc["_id"], 3)))
    try:
        runner = QueryRunner(None, ReadYourWrites(waiter, 5.0))
        response = await runner.run("GetOrder", entry, request, cast(Context, _Deadline(5)))
        assert isinstance(response, query_service_pb2.GetOrderResponse)
    finally:
        await waiter.close()
    assert response.order.version == 3, "answered from the new generation before it reflected the token"
    assert not response.consistency.stale and response.consistency.waited_ms >= 250


class _Deadline:
    """What `QueryRunner.run` asks of a gRPC context when nothing fails: the time left."""

    def __init__(self, seconds: float) -> None:
        self._until = time.monotonic() + seconds

    def time_remaining(self) -> float:
        return self._until - time.monotonic()


async def test_with_no_time_to_wait_a_token_is_still_checked_once(mongo_url: str, db: AsyncDatabase[Document]) -> None:
    doc = await put_order(db, 3)
    running = await _server(mongo_url, db.name, query_max_wait_seconds=0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as chan:
            stub = qgrpc.OrderQueryServiceStub(chan)
            reflected = await stub.GetOrder(
                query_service_pb2.GetOrderRequest(order_id=doc["_id"], consistency=consistency(token(doc["_id"], 3))),
                timeout=5,
            )
            ahead = await stub.GetOrder(
                query_service_pb2.GetOrderRequest(
                    order_id=doc["_id"], consistency=consistency(token(doc["_id"], 5), accept_stale=True)
                ),
                timeout=5,
            )
    finally:
        await running.stop()
    assert reflected.order.version == 3 and not reflected.consistency.stale
    assert ahead.consistency.stale
    assert [(lag.required_version, lag.applied_version) for lag in ahead.consistency.behind] == [(5, 3)]
