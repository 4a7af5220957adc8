"""The query service end to end against a real MongoDB-wire server: documents in, gRPC answers out.

Each test gets its own database (`unique_name`) and its own in-process query server on a free port, inserts
read-model documents directly (as the projector would) and calls the server through a real gRPC channel.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from cqrs.orders.v1 import order_pb2, query_service_pb2, query_service_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from core.grpc_errors import field_violations
from core.log_throttle import per_request
from localservers import free_port
from query_service.config import QuerySettings
from query_service.paging import ListFilter
from query_service.server import CUSTOMER_SERVICE_NAME, SERVICE_NAME, RunningServer, start_query_server
from query_service.watch import OrderWatchHub

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from cqrs.orders.v1.query_service_pb2_grpc import OrderQueryServiceAsyncStub as Stub

Document = dict[str, Any]

REPO_ROOT = Path(__file__).resolve().parents[2]
# Whole milliseconds: BSON dates have millisecond precision, so what we insert is what comes back.
T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)
WAIT_SECONDS = 15.0


# --------------------------------------------------------------------------------------------------- helpers


def make_order(
    *,
    created_at: dt.datetime,
    customer_id: str = "customer-1",
    status: str = "DRAFT",
    deleted: bool = False,
    order_id: str | None = None,
) -> Document:
    """A read-model document shaped as the projector writes it."""
    oid = order_id or str(uuid.uuid4())
    lines = [
        {"sku": "SKU-1", "name": "Widget", "quantity": 3, "unit_price_minor": 250, "line_total_minor": 750},
        {"sku": "SKU-2", "name": "Gadget", "quantity": 1, "unit_price_minor": 1999, "line_total_minor": 1999},
    ]
    return {
        "_id": oid,
        "order_id": oid,
        "customer_id": customer_id,
        "status": status,
        "currency": "EUR",
        "lines": lines,
        "total_minor": 2749,
        "shipping_address": {
            "recipient": "Ada Lovelace",
            "line1": "1 Analytical Way",
            "line2": "",
            "city": "London",
            "postal_code": "N1 7AA",
            "country": "GB",
        },
        "cancel_reason": "changed my mind" if status == "CANCELLED" else "",
        "created_at": created_at,
        "updated_at": created_at + dt.timedelta(seconds=5),
        "placed_at": created_at + dt.timedelta(seconds=4) if status in ("PLACED", "CANCELLED") else None,
        "version": 4,
        "position": 1234,
        "deleted": deleted,
    }


async def wait_for(condition: Callable[[], Awaitable[bool]], what: str, timeout: float = WAIT_SECONDS) -> None:
    """Polls `condition` until it holds; fails saying what it waited for."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await condition():
        if asyncio.get_running_loop().time() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


async def list_all(stub: Stub, request: query_service_pb2.ListOrdersRequest) -> list[str]:
    """Follows next_page_token to the end; returns the order ids in the order they were served."""
    ids: list[str] = []
    token = ""
    for _ in range(1000):
        page_request = query_service_pb2.ListOrdersRequest()
        page_request.CopyFrom(request)
        page_request.page_token = token
        response = await stub.ListOrders(page_request)
        ids.extend(order.order_id for order in response.orders)
        token = response.next_page_token
        if not token:
            return ids
    raise AssertionError("pagination did not end")


def newest_first(docs: list[Document]) -> list[str]:
    return [d["_id"] for d in sorted(docs, key=lambda d: (d["created_at"], d["_id"]), reverse=True)]


async def health_status(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    status: int = response.status
    return status


# -------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
async def orders(mongo_url: str, unique_name: str) -> AsyncIterator[AsyncCollection[Document]]:
    """The `orders` collection of this test's own database (dropped afterwards)."""
    client: AsyncMongoClient[Document] = AsyncMongoClient(mongo_url, tz_aware=True)
    try:
        yield client[unique_name]["orders"]
        await client.drop_database(unique_name)
    finally:
        await client.close()


@pytest.fixture
async def query_server(mongo_url: str, unique_name: str) -> AsyncIterator[RunningServer]:
    settings = QuerySettings(
        mongo_url=mongo_url, mongo_database=unique_name, query_listen="127.0.0.1:0", grace_seconds=1
    )
    running = await start_query_server(settings, health_interval=0.2)
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
    return query_service_pb2_grpc.OrderQueryServiceStub(channel)


# ----------------------------------------------------------------------------------------------------- GetOrder


async def test_get_order_returns_the_full_view(orders: AsyncCollection[Document], stub: Stub) -> None:
    doc = make_order(created_at=T0, status="PLACED")
    doc |= {"customer_name": "Ada", "customer_email": "ada@example.com", "customer_version": 2}
    await orders.insert_one(doc)

    order = (await stub.GetOrder(query_service_pb2.GetOrderRequest(order_id=doc["_id"]))).order

    assert order.order_id == doc["_id"]
    assert order.customer_id == "customer-1"
    assert order.status == order_pb2.ORDER_STATUS_PLACED
    assert order.currency == "EUR"
    assert [(ln.sku, ln.name, ln.quantity, ln.unit_price_minor, ln.line_total_minor) for ln in order.lines] == [
        ("SKU-1", "Widget", 3, 250, 750),
        ("SKU-2", "Gadget", 1, 1999, 1999),
    ]
    assert order.total_minor == 2749
    assert order.shipping_address.city == "London"
    assert order.shipping_address.country == "GB"
    assert order.created_at.ToDatetime(tzinfo=dt.UTC) == T0
    assert order.updated_at.ToDatetime(tzinfo=dt.UTC) == T0 + dt.timedelta(seconds=5)
    assert order.placed_at.ToDatetime(tzinfo=dt.UTC) == T0 + dt.timedelta(seconds=4)
    assert (order.version, order.position) == (4, 1234)
    assert (order.customer_name, order.customer_email, order.customer_version) == ("Ada", "ada@example.com", 2)


async def test_get_order_of_a_draft_leaves_placed_at_unset(orders: AsyncCollection[Document], stub: Stub) -> None:
    doc = make_order(created_at=T0, status="DRAFT")
    doc["shipping_address"] = None
    await orders.insert_one(doc)

    order = (await stub.GetOrder(query_service_pb2.GetOrderRequest(order_id=doc["_id"]))).order

    assert order.status == order_pb2.ORDER_STATUS_DRAFT
    assert not order.HasField("placed_at")
    assert not order.HasField("shipping_address")


async def test_get_order_accepts_an_upper_case_uuid(orders: AsyncCollection[Document], stub: Stub) -> None:
    doc = make_order(created_at=T0)
    await orders.insert_one(doc)

    response = await stub.GetOrder(query_service_pb2.GetOrderRequest(order_id=doc["_id"].upper()))

    assert response.order.order_id == doc["_id"]


async def test_get_order_of_a_deleted_order_is_not_found(orders: AsyncCollection[Document], stub: Stub) -> None:
    doc = make_order(created_at=T0, deleted=True)
    await orders.insert_one(doc)

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrder(query_service_pb2.GetOrderRequest(order_id=doc["_id"]))

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == f"order {doc['_id']} not found"


async def test_get_order_of_an_unknown_order_is_not_found(stub: Stub) -> None:
    unknown = str(uuid.uuid4())

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrder(query_service_pb2.GetOrderRequest(order_id=unknown))

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == f"order {unknown} not found"


@pytest.mark.parametrize("bad_id", ["", "not-a-uuid", "123", "{" + "0" * 32 + "}", "0" * 32])
async def test_get_order_with_a_malformed_id_is_invalid_argument(stub: Stub, bad_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrder(query_service_pb2.GetOrderRequest(order_id=bad_id))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(caught.value)] == ["order_id"]


async def test_a_corrupt_document_is_internal_without_details(
    orders: AsyncCollection[Document], stub: Stub, caplog: pytest.LogCaptureFixture
) -> None:
    doc = make_order(created_at=T0)
    doc["total_minor"] = "a lot"  # not an integer: the view cannot be built
    await orders.insert_one(doc)

    with caplog.at_level(logging.ERROR, logger="query_service"), pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetOrder(query_service_pb2.GetOrderRequest(order_id=doc["_id"]))

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    details = caught.value.details() or ""
    assert "Traceback" not in details and "ValueError" not in details and "a lot" not in details
    assert any(r.exc_info and "GetOrder" in r.getMessage() for r in caplog.records), "traceback not logged"


# --------------------------------------------------------------------------------------------------- ListOrders


async def test_list_orders_is_newest_first_and_skips_deleted(orders: AsyncCollection[Document], stub: Stub) -> None:
    docs = [make_order(created_at=T0 + dt.timedelta(minutes=i)) for i in (3, 1, 4, 2)]
    docs.append(make_order(created_at=T0 + dt.timedelta(minutes=9), deleted=True))
    await orders.insert_many(docs)

    response = await stub.ListOrders(query_service_pb2.ListOrdersRequest())

    live = [d for d in docs if not d["deleted"]]
    assert [o.order_id for o in response.orders] == newest_first(live)
    assert response.next_page_token == ""


async def test_list_orders_filters_by_customer_status_and_both(orders: AsyncCollection[Document], stub: Stub) -> None:
    docs = [
        make_order(created_at=T0 + dt.timedelta(seconds=i), customer_id=customer, status=status)
        for i, (customer, status) in enumerate(
            [
                ("alice", "DRAFT"),
                ("alice", "PLACED"),
                ("bob", "PLACED"),
                ("alice", "PLACED"),
                ("bob", "CANCELLED"),
                ("carol", "DRAFT"),
            ]
        )
    ]
    docs.append(make_order(created_at=T0 + dt.timedelta(minutes=1), customer_id="alice", deleted=True))
    await orders.insert_many(docs)

    def expected(customer: str | None, status: str | None) -> list[str]:
        return newest_first(
            [
                d
                for d in docs
                if not d["deleted"]
                and (customer is None or d["customer_id"] == customer)
                and (status is None or d["status"] == status)
            ]
        )

    by_customer = await stub.ListOrders(query_service_pb2.ListOrdersRequest(customer_id="alice"))
    by_status = await stub.ListOrders(query_service_pb2.ListOrdersRequest(status=order_pb2.ORDER_STATUS_PLACED))
    by_both = await stub.ListOrders(
        query_service_pb2.ListOrdersRequest(customer_id="bob", status=order_pb2.ORDER_STATUS_CANCELLED)
    )
    nobody = await stub.ListOrders(query_service_pb2.ListOrdersRequest(customer_id="nobody"))

    assert [o.order_id for o in by_customer.orders] == expected("alice", None)
    assert [o.order_id for o in by_status.orders] == expected(None, "PLACED")
    assert [o.order_id for o in by_both.orders] == expected("bob", "CANCELLED")
    assert len(by_both.orders) == 1
    assert list(nobody.orders) == []


async def test_pagination_serves_every_order_once_even_when_orders_arrive_between_pages(
    orders: AsyncCollection[Document], stub: Stub
) -> None:
    # Pairs share a created_at, so page boundaries fall between ties: the _id tie-break must be exact.
    docs = [make_order(created_at=T0 + dt.timedelta(seconds=i // 2)) for i in range(9)]
    await orders.insert_many(docs)

    seen: list[str] = []
    first = await stub.ListOrders(query_service_pb2.ListOrdersRequest(page_size=2))
    seen.extend(o.order_id for o in first.orders)
    # A new (newest) order and a deletion-free insert arrive while the client pages through.
    await orders.insert_one(make_order(created_at=T0 + dt.timedelta(hours=1)))
    token = first.next_page_token
    pages = 1
    while token:
        page = await stub.ListOrders(query_service_pb2.ListOrdersRequest(page_size=2, page_token=token))
        assert len(page.orders) <= 2
        seen.extend(o.order_id for o in page.orders)
        token = page.next_page_token
        pages += 1

    assert seen == newest_first(docs)
    assert pages == 5  # 9 orders, 2 per page: the last page has one order and no token


async def test_pagination_with_filters_and_an_exactly_full_last_page(
    orders: AsyncCollection[Document], stub: Stub
) -> None:
    docs = [make_order(created_at=T0 + dt.timedelta(seconds=i), customer_id="alice") for i in range(4)]
    docs += [make_order(created_at=T0 + dt.timedelta(seconds=i), customer_id="bob") for i in range(3)]
    await orders.insert_many(docs)

    request = query_service_pb2.ListOrdersRequest(customer_id="alice", page_size=2)
    second = await stub.ListOrders(
        query_service_pb2.ListOrdersRequest(
            customer_id="alice",
            page_size=2,
            page_token=(await stub.ListOrders(request)).next_page_token,
        )
    )

    assert await list_all(stub, request) == newest_first([d for d in docs if d["customer_id"] == "alice"])
    assert len(second.orders) == 2 and second.next_page_token == ""  # no extra, empty page


async def test_a_page_token_used_with_other_filters_is_invalid_argument(
    orders: AsyncCollection[Document], stub: Stub
) -> None:
    await orders.insert_many(
        [make_order(created_at=T0 + dt.timedelta(seconds=i), customer_id="alice") for i in range(3)]
    )
    token = (await stub.ListOrders(query_service_pb2.ListOrdersRequest(page_size=1))).next_page_token
    assert token

    for other in (
        query_service_pb2.ListOrdersRequest(page_token=token, customer_id="alice"),
        query_service_pb2.ListOrdersRequest(page_token=token, status=order_pb2.ORDER_STATUS_DRAFT),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListOrders(other)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [field for field, _ in field_violations(caught.value)] == ["page_token"]

    # The same filters with another page size are fine (AIP-158).
    page = await stub.ListOrders(query_service_pb2.ListOrdersRequest(page_token=token, page_size=5))
    assert len(page.orders) == 2


@pytest.mark.parametrize("garbled", ["x", "not base64!", "eyJ2IjoxfQ", "A" * 5000])
async def test_a_garbled_page_token_is_invalid_argument(stub: Stub, garbled: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOrders(query_service_pb2.ListOrdersRequest(page_token=garbled))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(caught.value)] == ["page_token"]


def _token_of(body: object) -> str:
    """A page token of our format around any JSON text or value (what a client could forge)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_FINGERPRINT = ListFilter().fingerprint()


@pytest.mark.parametrize(
    "crafted",
    [
        _token_of(b"[" * 3000),  # deep nesting: RecursionError in the JSON decoder
        _token_of(b'{"v":' * 500 + b"1" + b"}" * 500),
        _token_of(b"\xff\xfe\x00 garbage"),
        _token_of(b"null"),
        _token_of([1, 2, 3]),
        _token_of({"v": True, "t": 1, "i": str(uuid.UUID(int=1)), "f": _FINGERPRINT}),
        _token_of({"v": 1.0, "t": 1, "i": str(uuid.UUID(int=1)), "f": _FINGERPRINT}),
        _token_of({"v": 1, "t": "1", "i": str(uuid.UUID(int=1)), "f": _FINGERPRINT}),
        _token_of({"v": 1, "t": 10**300, "i": str(uuid.UUID(int=1)), "f": _FINGERPRINT}),
        _token_of({"v": 1, "t": -(2**63), "i": str(uuid.UUID(int=1)), "f": _FINGERPRINT}),
        _token_of({"v": 1, "t": 1, "i": "\ud800", "f": _FINGERPRINT}),  # a lone surrogate BSON cannot encode
        _token_of({"v": 1, "t": 1, "i": {"$gt": ""}, "f": _FINGERPRINT}),
        _token_of({"v": 1, "t": 1, "i": "a\u0000b", "f": _FINGERPRINT}),
        _token_of({"v": 1, "t": 1, "i": str(uuid.UUID(int=1)), "f": _FINGERPRINT, "x": [[[[]]]]}),
    ],
)
async def test_a_crafted_page_token_is_invalid_argument(
    orders: AsyncCollection[Document], stub: Stub, crafted: str
) -> None:
    await orders.insert_one(make_order(created_at=T0))

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOrders(query_service_pb2.ListOrdersRequest(page_token=crafted), timeout=10)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(caught.value)] == ["page_token"]


@pytest.mark.parametrize("customer_id", ["a\x00b", "bob\n", "\x1b[31mred", "x" * 65])
async def test_a_filter_with_control_characters_or_too_long_is_invalid_argument(stub: Stub, customer_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOrders(query_service_pb2.ListOrdersRequest(customer_id=customer_id), timeout=10)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(caught.value)] == ["customer_id"]


async def test_a_filter_in_any_script_is_fine(orders: AsyncCollection[Document], stub: Stub) -> None:
    doc = make_order(created_at=T0, customer_id="\u05e9\u05dc\u05d5\u05dd-\U0001f600")  # Hebrew (RTL) and an emoji
    await orders.insert_one(doc)

    response = await stub.ListOrders(query_service_pb2.ListOrdersRequest(customer_id=doc["customer_id"]), timeout=10)

    assert [o.order_id for o in response.orders] == [doc["_id"]]


def big_order(created_at: dt.datetime) -> Document:
    """The largest order the command side accepts: 100 lines, each with a 200-character name of 4-byte characters."""
    doc = make_order(created_at=created_at)
    doc["lines"] = [
        {
            "sku": f"SKU-{i:03d}-" + "X" * 56,
            "name": "\U0001f4e6" * 200,
            "quantity": 10_000,
            "unit_price_minor": 100_000_000_000,
            "line_total_minor": 10_000 * 100_000_000_000,
        }
        for i in range(100)
    ]
    return doc


async def test_pages_of_big_orders_fit_a_grpc_message_and_continue_exactly(
    orders: AsyncCollection[Document], stub: Stub
) -> None:
    docs = [big_order(T0 + dt.timedelta(milliseconds=i // 2)) for i in range(70)]  # ties on created_at too
    await orders.insert_many(docs)
    served: list[str] = []
    sizes: list[int] = []
    token = ""

    for _ in range(70):
        response = await stub.ListOrders(
            query_service_pb2.ListOrdersRequest(page_size=500, page_token=token), timeout=30
        )
        sizes.append(response.ByteSize())
        served.extend(order.order_id for order in response.orders)
        token = response.next_page_token
        if not token:
            break

    assert len(sizes) >= 2, "70 orders of ~85 KB cannot fit one 4 MiB page"
    assert max(sizes) <= 4 * 1024 * 1024
    assert served == newest_first(docs)  # every order once, in order: the token continues where the page stopped


async def test_negative_page_size_and_unknown_status_are_invalid_argument(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListOrders(query_service_pb2.ListOrdersRequest(page_size=-1, status=42))  # type: ignore[arg-type]

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(field for field, _ in field_violations(caught.value)) == ["page_size", "status"]


async def test_default_page_size_is_50_and_maximum_is_500(orders: AsyncCollection[Document], stub: Stub) -> None:
    docs = [make_order(created_at=T0 + dt.timedelta(milliseconds=i)) for i in range(501)]
    await orders.insert_many(docs)

    default = await stub.ListOrders(query_service_pb2.ListOrdersRequest())
    clamped = await stub.ListOrders(query_service_pb2.ListOrdersRequest(page_size=10_000))
    rest = await stub.ListOrders(query_service_pb2.ListOrdersRequest(page_size=500, page_token=clamped.next_page_token))

    assert len(default.orders) == 50 and default.next_page_token
    assert len(clamped.orders) == 500 and clamped.next_page_token
    assert [o.order_id for o in [*clamped.orders, *rest.orders]] == newest_first(docs)
    assert rest.next_page_token == ""


# --------------------------------------------------------------------------------------------------- WatchOrder


async def read_watch(stub: Stub, order_id: str, first: asyncio.Event | None = None, token: str = "") -> list[Any]:
    """Reads a WatchOrder stream to its end: [(version, deleted), ...]; sets `first` after the first message."""
    seen: list[Any] = []
    call = stub.WatchOrder(
        query_service_pb2.WatchOrderRequest(order_id=order_id, consistency_token=token), timeout=WAIT_SECONDS * 2
    )
    async for response in call:
        seen.append((response.order.version, response.deleted))
        if first is not None:
            first.set()
    return seen


async def start_watchers(stub: Stub, order_id: str, count: int) -> list[asyncio.Task[list[Any]]]:
    """`count` watchers of one order, returned once each has received the current document."""
    firsts = [asyncio.Event() for _ in range(count)]
    tasks = [asyncio.create_task(read_watch(stub, order_id, first)) for first in firsts]
    await asyncio.wait_for(asyncio.gather(*(first.wait() for first in firsts)), timeout=WAIT_SECONDS)
    return tasks


async def test_twenty_watchers_see_every_version_in_order_and_the_stream_ends_on_delete(
    orders: AsyncCollection[Document], stub: Stub, query_server: RunningServer
) -> None:
    doc = make_order(created_at=T0) | {"version": 1}
    await orders.insert_one(doc)
    watchers = await start_watchers(stub, doc["_id"], 20)
    assert query_server.watch_hub.watchers == 20
    assert query_server.watch_hub.mode == "change stream"

    # Whole-document writes: each change event carries the document exactly as written.
    for version in range(2, 11):
        await orders.replace_one({"_id": doc["_id"]}, doc | {"version": version})
    await orders.replace_one({"_id": doc["_id"]}, doc | {"version": 11, "deleted": True})
    results = await asyncio.wait_for(asyncio.gather(*watchers), timeout=WAIT_SECONDS)

    expected = [(v, False) for v in range(1, 11)] + [(11, True)]
    assert all(seen == expected for seen in results), results

    async def all_gone() -> bool:
        return query_server.watch_hub.watchers == 0

    await wait_for(all_gone, "the finished watchers to be unsubscribed")


async def test_watchers_of_fast_updates_see_increasing_versions_ending_with_the_latest(
    orders: AsyncCollection[Document], stub: Stub
) -> None:
    doc = make_order(created_at=T0) | {"version": 1}
    other = make_order(created_at=T0) | {"version": 1}
    await orders.insert_many([doc, other])
    watchers = await start_watchers(stub, doc["_id"], 5)

    # `$set` updates as the projector writes them, faster than anyone reads them: a watcher may get several of
    # them as one (the looked-up latest document) but never an old one, a duplicate or another order's.
    for version in range(2, 41):
        await orders.update_one({"_id": doc["_id"]}, {"$set": {"version": version}})
        await orders.update_one({"_id": other["_id"]}, {"$set": {"version": version}})
    await orders.update_one({"_id": doc["_id"]}, {"$set": {"version": 41, "deleted": True}})
    results = await asyncio.wait_for(asyncio.gather(*watchers), timeout=WAIT_SECONDS)

    for seen in results:
        versions = [version for version, _ in seen]
        assert versions == sorted(set(versions)), seen
        assert seen[0] == (1, False) and seen[-1] == (41, True)
        assert all(not deleted for _, deleted in seen[:-1])


async def test_watch_order_of_an_unknown_or_deleted_order_is_not_found(
    orders: AsyncCollection[Document], stub: Stub
) -> None:
    deleted = make_order(created_at=T0, deleted=True)
    await orders.insert_one(deleted)

    for order_id in (str(uuid.uuid4()), deleted["_id"]):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await read_watch(stub, order_id)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_watch_order_with_a_malformed_id_or_token_is_invalid_argument(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await read_watch(stub, "nope", token="v1.garbage")

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(field for field, _ in field_violations(caught.value)) == ["consistency_token", "order_id"]


async def test_a_watcher_that_leaves_is_forgotten(
    orders: AsyncCollection[Document], stub: Stub, query_server: RunningServer
) -> None:
    doc = make_order(created_at=T0)
    await orders.insert_one(doc)
    [watcher] = await start_watchers(stub, doc["_id"], 1)
    assert query_server.watch_hub.watchers == 1

    watcher.cancel()  # the client goes away

    async def forgotten() -> bool:
        return query_server.watch_hub.watchers == 0

    await wait_for(forgotten, "the server to drop the cancelled watcher")


async def test_watch_streams_end_with_unavailable_when_the_server_stops(
    mongo_url: str, unique_name: str, orders: AsyncCollection[Document]
) -> None:
    doc = make_order(created_at=T0)
    await orders.insert_one(doc)
    settings = QuerySettings(
        mongo_url=mongo_url, mongo_database=unique_name, query_listen="127.0.0.1:0", grace_seconds=30
    )
    running = await start_query_server(settings, health_interval=0.2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as chan:
            watchers = await start_watchers(query_service_pb2_grpc.OrderQueryServiceStub(chan), doc["_id"], 3)
            started = asyncio.get_running_loop().time()
            await running.stop()
            elapsed = asyncio.get_running_loop().time() - started
            for watcher in watchers:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await watcher
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert elapsed < 5, f"streams held the shutdown for {elapsed:.1f}s (grace is 30s)"
    finally:
        await running.stop()


async def test_watchers_beyond_the_limit_are_resource_exhausted(
    mongo_url: str, unique_name: str, orders: AsyncCollection[Document]
) -> None:
    doc = make_order(created_at=T0)
    await orders.insert_one(doc)
    settings = QuerySettings(
        mongo_url=mongo_url, mongo_database=unique_name, query_listen="127.0.0.1:0", query_max_watchers=2
    )
    running = await start_query_server(settings, health_interval=0.2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as chan:
            stub = query_service_pb2_grpc.OrderQueryServiceStub(chan)
            watchers = await start_watchers(stub, doc["_id"], 2)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await read_watch(stub, doc["_id"])
            for watcher in watchers:
                watcher.cancel()
    finally:
        await running.stop()

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "too many WatchOrder streams" in (caught.value.details() or "")


async def test_the_watch_feed_falls_back_to_polling_without_change_streams(
    orders: AsyncCollection[Document],
) -> None:
    # Standalone mongod has no change streams; the hub then polls. Forced here, since our server has them.
    doc = make_order(created_at=T0) | {"version": 1}
    await orders.insert_one(doc)
    hub = OrderWatchHub(orders, poll_interval=0.05, use_change_stream=False)
    try:
        subscription = await hub.subscribe(doc["_id"])
        assert hub.mode == "poll"
        await orders.update_one({"_id": doc["_id"]}, {"$set": {"version": 2}})
        while True:
            item = await asyncio.wait_for(subscription.next(), timeout=WAIT_SECONDS)
            if isinstance(item, dict) and item["version"] == 2:
                break
        hub.unsubscribe(subscription)
    finally:
        await hub.close()


# ----------------------------------------------------------------------------- health, reflection, indexes


async def test_health_is_serving_for_the_server_and_the_services(channel: grpc.aio.Channel) -> None:
    for service in ("", SERVICE_NAME, CUSTOMER_SERVICE_NAME):

        async def serving(service: str = service) -> bool:
            return bool(await health_status(channel, service) == health_pb2.HealthCheckResponse.SERVING)

        await wait_for(serving, f"health of {service!r} to be SERVING")


async def test_reflection_lists_the_services(channel: grpc.aio.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")

    responses = [response async for response in stub.ServerReflectionInfo(iter([request]))]

    names = {service.name for service in responses[0].list_services_response.service}
    assert {
        SERVICE_NAME,
        CUSTOMER_SERVICE_NAME,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names
    assert SERVICE_NAME == "cqrs.orders.v1.OrderQueryService"
    assert CUSTOMER_SERVICE_NAME == "cqrs.orders.v1.CustomerQueryService"


async def test_the_listing_indexes_are_created_once_the_collection_exists(
    orders: AsyncCollection[Document], query_server: RunningServer
) -> None:
    # The query service never creates the collection (the projector's first write does); it waits for it.
    await orders.insert_one(make_order(created_at=T0))
    wanted = {
        (("deleted", 1), ("created_at", 1), ("_id", 1)),
        (("deleted", 1), ("customer_id", 1), ("created_at", 1), ("_id", 1)),
        (("deleted", 1), ("status", 1), ("created_at", 1), ("_id", 1)),
        (("deleted", 1), ("customer_id", 1), ("status", 1), ("created_at", 1), ("_id", 1)),
    }

    async def created() -> bool:
        info = await orders.index_information()
        keys = {tuple((name, int(direction)) for name, direction in index["key"]) for index in info.values()}
        return wanted <= keys

    await wait_for(created, "the four ListOrders indexes")


# ------------------------------------------------------------------------------------------------ MongoDB down


async def test_a_port_in_use_is_refused_instead_of_shared(mongo_url: str, query_server: RunningServer) -> None:
    settings = QuerySettings(mongo_url=mongo_url, query_listen=f"127.0.0.1:{query_server.port}")

    with pytest.raises(RuntimeError, match="cannot listen"):
        await start_query_server(settings)


async def test_mongodb_down_is_unavailable_and_not_serving(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()  # nobody listens on it
    settings = QuerySettings(
        mongo_url=f"mongodb://127.0.0.1:{port}/?directConnection=true",
        mongo_database="unreachable",
        query_listen="127.0.0.1:0",
        mongo_timeout_ms=300,
        grace_seconds=0,
    )
    caplog.set_level(logging.WARNING, logger="query_service")
    per_request.clear()  # lines other tests of this process logged must not count against this one's
    running = await start_query_server(settings, health_interval=0.1)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as chan:
            stub = query_service_pb2_grpc.OrderQueryServiceStub(chan)
            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: stub.GetOrder(query_service_pb2.GetOrderRequest(order_id=str(uuid.uuid4()))),
                lambda: stub.ListOrders(query_service_pb2.ListOrdersRequest()),
            ] * 3
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await asyncio.wait_for(call(), timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
                # What is down, but neither where it runs nor the driver's own text.
                details = caught.value.details() or ""
                assert details == "read model (MongoDB) is unavailable; retry later"
                assert str(port) not in details and "127.0.0.1" not in details

            async def warned() -> bool:
                return any(
                    r.levelno == logging.WARNING and "MongoDB" in r.getMessage() and "at mongodb://" in r.getMessage()
                    for r in caplog.records
                )

            # Every call failed, but the log says so once per method (and window), with the driver's detail.
            per_call = [r.getMessage() for r in caplog.records if r.name == "query_service.api.runner"]
            assert len(per_call) == 2, per_call
            assert per_call[0].startswith("GetOrder: read model (MongoDB) is unavailable: ")
            assert per_call[1].startswith("ListOrders: read model (MongoDB) is unavailable: ")
            assert all(str(port) in line for line in per_call)

            await wait_for(warned, "a WARNING from the health watcher naming MongoDB")
            for service in ("", SERVICE_NAME):
                assert await health_status(chan, service) == health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        await running.stop()


async def test_queries_holding_every_pooled_connection_leave_the_service_ready(
    mongo_url: str, unique_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An overload is not MongoDB being down: readiness pings on a connection of their own, so a pod whose queries
    hold every pooled connection stays in rotation (taking it out would only move its load to the others)."""
    settings = QuerySettings(
        mongo_url=mongo_url, mongo_database=unique_name, query_listen="127.0.0.1:0", mongo_timeout_ms=300,
        grace_seconds=0,
    )  # fmt: skip
    caplog.set_level(logging.WARNING, logger="query_service")
    per_request.clear()
    running = await start_query_server(settings, health_interval=0.05)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as chan:
            stub = query_service_pb2_grpc.OrderQueryServiceStub(chan)
            await wait_for(lambda: _serving(chan), "the query service to be SERVING")
            async with contextlib.AsyncExitStack() as held:
                for server in running.client._topology._servers.values():
                    for _ in range(int(server.pool.opts.max_pool_size)):
                        await held.enter_async_context(server.pool.checkout())
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.GetOrder(query_service_pb2.GetOrderRequest(order_id=str(uuid.uuid4())), timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE  # no connection for the query
                for _ in range(20):  # each probe's ping would wait out its 300 ms for a pooled connection
                    assert await _serving(chan)
                    await asyncio.sleep(0.05)
            watcher = [r.getMessage() for r in caplog.records if r.name == "query_service.server"]
            assert not [line for line in watcher if "is unavailable" in line], watcher
            reply = await stub.ListOrders(query_service_pb2.ListOrdersRequest(), timeout=10)
            assert list(reply.orders) == []
    finally:
        await running.stop()


async def _serving(channel: grpc.aio.Channel) -> bool:
    return bool(await health_status(channel, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING)


# ------------------------------------------------------------------------------------------- process, imports


async def test_the_process_serves_and_stops_gracefully_on_sigterm(mongo_url: str, unique_name: str) -> None:
    port = free_port()
    env = {
        **os.environ,
        "CQRS_MONGO_URL": mongo_url,
        "CQRS_MONGO_DATABASE": unique_name,
        "CQRS_QUERY_LISTEN": f"127.0.0.1:{port}",
        "CQRS_GRACE_SECONDS": "2",
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "query_service",
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as chan:

            async def serving() -> bool:
                try:
                    return bool(await health_status(chan, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING)
                except grpc.aio.AioRpcError:
                    return False  # not listening yet

            await wait_for(serving, "`python -m query_service` to report SERVING")
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), timeout=WAIT_SECONDS)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    log_lines = (await process.stderr.read()).decode().splitlines()
    assert process.returncode == 0, "\n".join(log_lines)
    assert all(line.startswith("{") for line in log_lines), log_lines  # one JSON object per line
    assert any("query service stopped" in line for line in log_lines), log_lines


def test_the_query_service_imports_neither_asyncpg_nor_nats() -> None:
    script = textwrap.dedent(
        """
        import sys
        import query_service.__main__, query_service.server, query_service.api.orders, query_service.api.customers
        banned = sorted(m for m in sys.modules if m.split(".")[0] in ("asyncpg", "nats"))
        print(",".join(banned))
        sys.exit(1 if banned else 0)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, f"query_service imported {result.stdout.strip()!r} {result.stderr}"
