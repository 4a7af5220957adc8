"""Order history and as-of reads end to end, through the typed client: an order is created, changed several times
and deleted; its change log lists every event in order with the ids of the commands that made them, and GetOrder
as of each version (and each time) answers exactly what GetOrder answered at that point."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC

import grpc
import pytest
from cqrs.orders.v1 import command_service_pb2 as cpb
from cqrs.orders.v1 import order_pb2
from cqrs.orders.v1 import query_service_pb2 as qpb

from cqrs_client import OrdersClient
from cqrs_client.errors import field_violations
from tests.e2e.conftest import Stack

ADDRESS = order_pb2.Address(recipient="Ada", line1="1 Main St", city="London", postal_code="N1 9GU", country="GB")
NEW_ADDRESS = order_pb2.Address(recipient="Ada", line1="2 Side St", city="Bath", postal_code="BA1 1AA", country="GB")


async def expect_error(call: Awaitable[object], code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code, raised.value.details()
    return raised.value


async def history(client: OrdersClient, order_id: str, page_size: int) -> list[qpb.OrderHistoryEvent]:
    events: list[qpb.OrderHistoryEvent] = []
    token = ""
    while True:
        page = await client.get_order_history(order_id, page_size=page_size, page_token=token, read_your_writes=True)
        assert len(page.events) <= page_size
        events.extend(page.events)
        token = page.next_page_token
        if not token:
            return events


async def test_history_and_as_of_reads_of_a_changed_and_deleted_order(stack: Stack) -> None:
    async with OrdersClient.connect(
        f"127.0.0.1:{stack.command_server.port}", stack.query_server.address, default_timeout=10.0
    ) as client:
        session = client.session()  # its reads wait for its own writes
        customer = await session.register_customer("Ada Lovelace", f"{uuid.uuid4().hex}@example.com")
        created = await session.create_order(customer.customer_id, "EUR", ADDRESS)
        order_id = created.order_id
        results = [created]
        snapshots = [(await session.get_order(order_id)).order]
        changes: list[Callable[[], Awaitable[cpb.CommandResult]]] = [
            lambda: session.add_item(order_id, "SKU-A", "Anvil", 2, 1999),
            lambda: session.add_item(order_id, "SKU-B", "Bucket", 1, 250),
            lambda: session.change_quantity(order_id, "SKU-A", 5),
            lambda: session.change_shipping_address(order_id, NEW_ADDRESS),
            lambda: session.place_order(order_id),
        ]
        for change in changes:
            results.append(await change())
            snapshots.append((await session.get_order(order_id)).order)
        assert [s.version for s in snapshots] == list(range(1, 7))
        results.append(await session.delete_order(order_id))
        await expect_error(session.get_order(order_id), grpc.StatusCode.NOT_FOUND)

        # The change log survives the deletion: every event, in order, with who and why.
        events = await history(session, order_id, page_size=4)
        assert [e.event_type for e in events] == [
            "OrderCreated",
            "OrderItemAdded",
            "OrderItemAdded",
            "OrderItemQuantityChanged",
            "OrderShippingAddressChanged",
            "OrderPlaced",
            "OrderDeleted",
        ]
        assert [e.version for e in events] == list(range(1, 8))
        assert [e.position for e in events] == sorted(e.position for e in events)
        assert [e.request_id for e in events] == [e.causation_id for e in events]
        assert len({e.request_id for e in events}) == 7
        assert all(e.correlation_id == e.request_id for e in events)  # no x-correlation-id: the request's own id
        assert all(e.subject == "" for e in events)  # auth is off
        assert [e.version for e in events] == [r.version for r in results]
        assert json.loads(events[1].payload_json) == {
            "sku": "SKU-A",
            "name": "Anvil",
            "quantity": 2,
            "unit_price_minor": 1999,
        }
        assert [e.recorded_at for e in events[:6]] == [s.updated_at for s in snapshots]

        # As of each version and each time: exactly what GetOrder answered then.
        for snapshot in snapshots:
            by_version = await session.get_order(order_id, as_of_version=snapshot.version)
            assert by_version.order == snapshot
            at = snapshot.updated_at.ToDatetime(tzinfo=UTC)
            by_time = await session.get_order(order_id, as_of_time=at)
            assert by_time.order == snapshot

        await expect_error(session.get_order(order_id, as_of_version=7), grpc.StatusCode.NOT_FOUND)  # deleted then
        beyond = await expect_error(session.get_order(order_id, as_of_version=8), grpc.StatusCode.INVALID_ARGUMENT)
        assert [v.field for v in field_violations(beyond)] == ["as_of_version"]
        both = await expect_error(
            session.get_order(order_id, as_of_version=1, as_of_time=events[0].recorded_at.ToDatetime(tzinfo=UTC)),
            grpc.StatusCode.INVALID_ARGUMENT,
        )
        assert [v.field for v in field_violations(both)] == ["as_of_version", "as_of_time"]
        before = events[0].recorded_at.ToDatetime(tzinfo=UTC).replace(year=2000)
        await expect_error(session.get_order(order_id, as_of_time=before), grpc.StatusCode.NOT_FOUND)
        bad_token = await expect_error(
            session.get_order_history(order_id, page_token="not-a-token"), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert [v.field for v in field_violations(bad_token)] == ["page_token"]
        unknown = str(uuid.uuid4())
        await expect_error(session.get_order_history(unknown), grpc.StatusCode.NOT_FOUND)
        await expect_error(session.get_order(unknown, as_of_version=1), grpc.StatusCode.NOT_FOUND)
