"""CustomerQueryService against a real MongoDB-wire server: customer documents in, gRPC answers out."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from cqrs.orders.v1 import customer_pb2, customer_service_pb2, customer_service_pb2_grpc
from pymongo import AsyncMongoClient
from pymongo.asynchronous.collection import AsyncCollection

from core.grpc_errors import field_violations
from query_service.config import QuerySettings
from query_service.server import RunningServer, start_query_server
from tests.support import eventually

if TYPE_CHECKING:
    from cqrs.orders.v1.customer_service_pb2_grpc import CustomerQueryServiceAsyncStub as Stub

Document = dict[str, Any]
T0 = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def make_customer(name: str, email: str | None = None, **extra: Any) -> Document:
    """A customer document shaped as the projector writes it."""
    customer_id = str(uuid.uuid4())
    return {
        "_id": customer_id,
        "customer_id": customer_id,
        "name": name,
        "email": email or f"{customer_id}@example.com",
        "status": "ACTIVE",
        "registered_at": T0,
        "updated_at": T0 + dt.timedelta(minutes=1),
        "version": 2,
        "position": 321,
    } | extra


def stats_only(customer_id: str | None = None) -> Document:
    """A document the order statistics created before the customer's own events were projected."""
    cid = customer_id or str(uuid.uuid4())
    return {"_id": cid, "order_stats": {"draft_orders": 1, "placed_orders": 0, "cancelled_orders": 0}}


async def list_all(stub: Stub, **filters: Any) -> list[str]:
    """Names served across all pages (following next_page_token)."""
    names: list[str] = []
    token = ""
    for _ in range(1000):
        response = await stub.ListCustomers(
            customer_service_pb2.ListCustomersRequest(page_token=token, **filters), timeout=10
        )
        names.extend(c.name for c in response.customers)
        token = response.next_page_token
        if not token:
            return names
    raise AssertionError("pagination did not end")


@pytest.fixture
async def customers(mongo_url: str, unique_name: str) -> AsyncIterator[AsyncCollection[Document]]:
    client: AsyncMongoClient[Document] = AsyncMongoClient(mongo_url, tz_aware=True)
    try:
        yield client[unique_name]["customers"]
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
async def stub(query_server: RunningServer) -> AsyncIterator[Stub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{query_server.port}") as chan:
        yield customer_service_pb2_grpc.CustomerQueryServiceStub(chan)


# -------------------------------------------------------------------------------------------------- GetCustomer


async def test_get_customer_returns_the_view_with_order_statistics(
    customers: AsyncCollection[Document], stub: Stub
) -> None:
    doc = make_customer(
        "Ada Lovelace",
        "ada@example.com",
        status="DEACTIVATED",
        order_stats={
            "draft_orders": 2,
            "placed_orders": 3,
            "cancelled_orders": 1,
            "placed_totals": [{"currency": "USD", "total_minor": 500}, {"currency": "EUR", "total_minor": 12_345}],
        },
    )
    await customers.insert_one(doc)

    customer = (await stub.GetCustomer(customer_service_pb2.GetCustomerRequest(customer_id=doc["_id"]))).customer

    assert (customer.customer_id, customer.name, customer.email) == (doc["_id"], "Ada Lovelace", "ada@example.com")
    assert customer.status == customer_pb2.CUSTOMER_STATUS_DEACTIVATED
    assert (customer.version, customer.position) == (2, 321)
    assert customer.registered_at.ToDatetime(tzinfo=dt.UTC) == T0
    assert customer.updated_at.ToDatetime(tzinfo=dt.UTC) == T0 + dt.timedelta(minutes=1)
    stats = customer.order_stats
    assert (stats.draft_orders, stats.placed_orders, stats.cancelled_orders) == (2, 3, 1)
    assert [(t.currency, t.total_minor) for t in stats.placed_totals] == [("EUR", 12_345), ("USD", 500)]


async def test_a_customer_without_statistics_has_zeros(customers: AsyncCollection[Document], stub: Stub) -> None:
    doc = make_customer("Grace Hopper")
    await customers.insert_one(doc)

    customer = (
        await stub.GetCustomer(customer_service_pb2.GetCustomerRequest(customer_id=doc["_id"].upper()))
    ).customer

    assert customer.customer_id == doc["_id"]
    assert customer.status == customer_pb2.CUSTOMER_STATUS_ACTIVE
    assert customer.order_stats == customer_pb2.CustomerOrderStats()


async def test_unknown_and_statistics_only_customers_are_not_found(
    customers: AsyncCollection[Document], stub: Stub
) -> None:
    only_stats = stats_only()
    await customers.insert_one(only_stats)

    for customer_id in (only_stats["_id"], str(uuid.uuid4())):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetCustomer(customer_service_pb2.GetCustomerRequest(customer_id=customer_id))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == f"customer {customer_id} not found"


@pytest.mark.parametrize("bad_id", ["", "ada", "0" * 32])
async def test_get_customer_with_a_malformed_id_is_invalid_argument(stub: Stub, bad_id: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetCustomer(customer_service_pb2.GetCustomerRequest(customer_id=bad_id))

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [field for field, _ in field_violations(caught.value)] == ["customer_id"]


# ------------------------------------------------------------------------------------------------ ListCustomers


async def test_list_customers_is_by_name_then_id_and_skips_statistics_only_documents(
    customers: AsyncCollection[Document], stub: Stub
) -> None:
    docs = [make_customer(name) for name in ("Carol", "alice", "Bob", "Alice", "Bob", "Bob")]
    await customers.insert_many([*docs, stats_only()])

    response = await stub.ListCustomers(customer_service_pb2.ListCustomersRequest())

    expected = sorted(docs, key=lambda d: (d["name"], d["_id"]))
    assert [c.customer_id for c in response.customers] == [d["_id"] for d in expected]
    assert [c.name for c in response.customers] == ["Alice", "Bob", "Bob", "Bob", "Carol", "alice"]
    assert response.next_page_token == ""


async def test_paging_serves_everyone_once_across_equal_names(customers: AsyncCollection[Document], stub: Stub) -> None:
    docs = [make_customer(name) for name in ["Bob"] * 5 + ["Ann", "Cleo", "Bo", "Bobby"]]
    await customers.insert_many(docs)

    ids: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListCustomers(customer_service_pb2.ListCustomersRequest(page_size=2, page_token=token))
        assert len(page.customers) <= 2
        ids.extend(c.customer_id for c in page.customers)
        pages += 1
        token = page.next_page_token
        if not token:
            break

    assert ids == [d["_id"] for d in sorted(docs, key=lambda d: (d["name"], d["_id"]))]
    assert pages == 5


async def test_name_prefix_is_literal_even_with_regex_metacharacters(
    customers: AsyncCollection[Document], stub: Stub
) -> None:
    names = ["A.B (Ltd) *", "A.B (Ltd) x", "AxB (Ltd) *", "a.b (ltd) *", "A.B", "[x]+? ^$|\\ #", "[x]", "Zed"]
    await customers.insert_many([make_customer(name) for name in names])

    assert await list_all(stub, name_prefix="A.B (Ltd) *") == ["A.B (Ltd) *"]
    assert await list_all(stub, name_prefix="A.B") == ["A.B", "A.B (Ltd) *", "A.B (Ltd) x"]
    assert await list_all(stub, name_prefix="[x]+? ^$|\\") == ["[x]+? ^$|\\ #"]
    assert await list_all(stub, name_prefix="[x]") == ["[x]", "[x]+? ^$|\\ #"]
    assert await list_all(stub, name_prefix=".*") == []
    assert await list_all(stub, name_prefix="Ze", page_size=1) == ["Zed"]


async def test_email_is_normalised_and_matched_exactly_and_combines_with_the_prefix(
    customers: AsyncCollection[Document], stub: Stub
) -> None:
    await customers.insert_many(
        [
            make_customer("Ada", "ada@example.com"),
            make_customer("Ada Byron", "ada.byron@example.com"),
            make_customer("Bea", "bea@example.com"),
        ]
    )

    assert await list_all(stub, email="  ADA@Example.COM \n") == ["Ada"]
    assert await list_all(stub, email="ada@example") == []
    assert await list_all(stub, email="ada@example.com", name_prefix="Ad") == ["Ada"]
    assert await list_all(stub, email="ada@example.com", name_prefix="Bea") == []
    assert await list_all(stub, name_prefix="Ada") == ["Ada", "Ada Byron"]


async def test_a_page_token_is_bound_to_its_filters(customers: AsyncCollection[Document], stub: Stub) -> None:
    await customers.insert_many([make_customer(name) for name in ("Ann", "Anna", "Annette")])
    first = await stub.ListCustomers(customer_service_pb2.ListCustomersRequest(name_prefix="Ann", page_size=1))
    assert first.next_page_token

    for bad in (
        customer_service_pb2.ListCustomersRequest(name_prefix="An", page_token=first.next_page_token),
        customer_service_pb2.ListCustomersRequest(page_token=first.next_page_token),
        customer_service_pb2.ListCustomersRequest(name_prefix="Ann", page_token="garbage"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListCustomers(bad)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [field for field, _ in field_violations(caught.value)] == ["page_token"]

    rest = await stub.ListCustomers(
        customer_service_pb2.ListCustomersRequest(name_prefix="Ann", page_size=5, page_token=first.next_page_token)
    )
    assert [c.name for c in rest.customers] == ["Anna", "Annette"]


async def test_page_sizes_default_to_50_and_are_capped_at_500(customers: AsyncCollection[Document], stub: Stub) -> None:
    await customers.insert_many([make_customer(f"Customer {i:04d}") for i in range(501)])

    default = await stub.ListCustomers(customer_service_pb2.ListCustomersRequest())
    capped = await stub.ListCustomers(customer_service_pb2.ListCustomersRequest(page_size=10_000))
    rest = await stub.ListCustomers(
        customer_service_pb2.ListCustomersRequest(page_size=500, page_token=capped.next_page_token)
    )

    assert len(default.customers) == 50 and default.next_page_token
    assert len(capped.customers) == 500 and capped.next_page_token
    assert [c.name for c in rest.customers] == ["Customer 0500"] and rest.next_page_token == ""


async def test_bad_list_arguments_are_reported_together(stub: Stub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.ListCustomers(
            customer_service_pb2.ListCustomersRequest(page_size=-1, name_prefix="x" * 201, email="e" * 300)
        )

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert sorted(field for field, _ in field_violations(caught.value)) == ["email", "name_prefix", "page_size"]


async def test_the_customer_indexes_are_created_once_the_collection_exists(
    customers: AsyncCollection[Document], query_server: RunningServer
) -> None:
    await customers.insert_one(make_customer("Ada"))
    wanted = {(("name", 1), ("_id", 1)), (("email", 1),)}

    async def created() -> bool:
        info = await customers.index_information()
        keys = {tuple((name, int(direction)) for name, direction in index["key"]) for index in info.values()}
        return wanted <= keys

    await eventually(created, what="the (name, _id) and (email) indexes on customers")
