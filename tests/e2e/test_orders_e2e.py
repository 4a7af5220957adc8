"""End to end through gRPC: commands -> PostgreSQL -> outbox relay -> JetStream -> projector -> MongoDB -> queries."""

from __future__ import annotations

import asyncio
import logging
import uuid

import asyncpg
import grpc
import pytest
from cqrs.orders.v1 import command_service_pb2 as cpb
from cqrs.orders.v1 import command_service_pb2_grpc as cgrpc
from cqrs.orders.v1 import customer_service_pb2 as custpb
from cqrs.orders.v1 import order_pb2
from cqrs.orders.v1 import query_service_pb2 as qpb
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from command_service.config import CommandServiceSettings
from command_service.server import start_command_server
from core.grpc_errors import field_violations
from localservers import NatsHandle
from tests.e2e.conftest import Stack
from tests.support import eventually

ADDRESS = order_pb2.Address(recipient="Ada", line1="1 Main St", city="London", postal_code="N1 9GU", country="GB")
T = 10.0  # RPC deadline (s)


def rid() -> str:
    return str(uuid.uuid4())


async def register(stack: Stack, name: str = "Ada Lovelace", email: str | None = None) -> str:
    reply = await stack.customer_commands.RegisterCustomer(
        custpb.RegisterCustomerRequest(request_id=rid(), name=name, email=email or f"{uuid.uuid4().hex}@example.com"),
        timeout=T,
    )
    return reply.result.customer_id


async def create(stack: Stack, customer: str | None = None) -> cpb.CommandResult:
    customer = customer or await register(stack)
    reply = await stack.commands.CreateOrder(
        cpb.CreateOrderRequest(request_id=rid(), customer_id=customer, currency="EUR", shipping_address=ADDRESS),
        timeout=T,
    )
    return reply.result


async def add(stack: Stack, order_id: str, sku: str, qty: int = 1, price: int = 100) -> cpb.CommandResult:
    reply = await stack.commands.AddOrderItem(
        cpb.AddOrderItemRequest(
            request_id=rid(), order_id=order_id, sku=sku, name=f"item {sku}", quantity=qty, unit_price_minor=price
        ),
        timeout=T,
    )
    return reply.result


async def visible(stack: Stack, order_id: str, version: int, timeout: float = 15.0) -> order_pb2.Order:
    """The order as the query side shows it once it reflects `version`."""

    async def probe() -> order_pb2.Order | None:
        try:
            order = (await stack.queries.GetOrder(qpb.GetOrderRequest(order_id=order_id), timeout=T)).order
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                return None
            raise
        return order if order.version >= version else None

    return await eventually(probe, what=f"order {order_id} at version {version} in the read model", timeout=timeout)


async def event_count(stack: Stack) -> int:
    conn = await asyncpg.connect(stack.postgres_dsn)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM events"))
    finally:
        await conn.close()


async def expect_error(call: object, code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    assert info.value.code() == code, f"expected {code}, got {info.value.code()}: {info.value.details()}"
    return info.value


async def test_order_lifecycle_through_commands_and_queries(stack: Stack) -> None:
    customer_id = await register(stack)
    created = await create(stack, customer_id)
    order_id = created.order_id
    assert created.version == 1 and created.position >= 1
    await add(stack, order_id, "A", qty=2, price=250)
    await add(stack, order_id, "B", qty=1, price=1000)
    await stack.commands.ChangeItemQuantity(
        cpb.ChangeItemQuantityRequest(request_id=rid(), order_id=order_id, sku="A", quantity=3), timeout=T
    )
    await add(stack, order_id, "C")
    await stack.commands.RemoveOrderItem(
        cpb.RemoveOrderItemRequest(request_id=rid(), order_id=order_id, sku="C"), timeout=T
    )
    new_address = order_pb2.Address(recipient="Bob", line1="2 High St", city="Paris", postal_code="75001", country="FR")
    await stack.commands.ChangeShippingAddress(
        cpb.ChangeShippingAddressRequest(request_id=rid(), order_id=order_id, shipping_address=new_address), timeout=T
    )
    placed = (
        await stack.commands.PlaceOrder(cpb.PlaceOrderRequest(request_id=rid(), order_id=order_id), timeout=T)
    ).result
    assert placed.version == 8

    order = await visible(stack, order_id, placed.version)
    assert order.status == order_pb2.ORDER_STATUS_PLACED
    assert [(line.sku, line.quantity, line.line_total_minor) for line in order.lines] == [("A", 3, 750), ("B", 1, 1000)]
    assert order.total_minor == 1750 and order.currency == "EUR"
    assert order.shipping_address == new_address
    assert order.position == placed.position
    assert order.placed_at.seconds > 0 and order.created_at.seconds > 0

    cancelled = (
        await stack.commands.CancelOrder(
            cpb.CancelOrderRequest(request_id=rid(), order_id=order_id, reason="changed my mind"), timeout=T
        )
    ).result
    order = await visible(stack, order_id, cancelled.version)
    assert order.status == order_pb2.ORDER_STATUS_CANCELLED and order.cancel_reason == "changed my mind"

    listed = await stack.queries.ListOrders(qpb.ListOrdersRequest(customer_id=customer_id), timeout=T)
    assert [o.order_id for o in listed.orders] == [order_id]

    deleted = (
        await stack.commands.DeleteOrder(cpb.DeleteOrderRequest(request_id=rid(), order_id=order_id), timeout=T)
    ).result

    async def gone() -> bool:
        try:
            await stack.queries.GetOrder(qpb.GetOrderRequest(order_id=order_id), timeout=T)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.NOT_FOUND
        return False

    await eventually(gone, what="the deleted order to be NOT_FOUND")
    listed = await stack.queries.ListOrders(qpb.ListOrdersRequest(customer_id=customer_id), timeout=T)
    assert list(listed.orders) == []
    assert deleted.version == cancelled.version + 1
    await expect_error(
        stack.commands.PlaceOrder(cpb.PlaceOrderRequest(request_id=rid(), order_id=order_id), timeout=T),
        grpc.StatusCode.NOT_FOUND,
    )


async def test_malformed_create_is_invalid_argument_with_field_violations_and_writes_nothing(stack: Stack) -> None:
    err = await expect_error(
        stack.commands.CreateOrder(cpb.CreateOrderRequest(request_id="", customer_id="", currency="euro"), timeout=T),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    fields = {f for f, _ in field_violations(err)}
    assert {"request_id", "customer_id", "currency", "shipping_address"} <= fields
    assert not any(f.startswith("shipping_address.") for f in fields)
    err = await expect_error(
        stack.commands.CreateOrder(
            cpb.CreateOrderRequest(
                request_id=rid(), customer_id="c", currency="EUR",
                shipping_address=order_pb2.Address(recipient="A", line1="x", city="y", postal_code="1", country="XX"),
            ),
            timeout=T,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )  # fmt: skip
    assert [f for f, _ in field_violations(err)] == ["shipping_address.country"]
    assert await event_count(stack) == 0


async def test_create_order_needs_an_existing_active_customer(stack: Stack) -> None:
    before = await event_count(stack)
    err = await expect_error(create(stack, str(uuid.uuid4())), grpc.StatusCode.FAILED_PRECONDITION)
    assert "does not exist" in (err.details() or "")
    customer_id = await register(stack)
    await stack.customer_commands.DeactivateCustomer(
        custpb.DeactivateCustomerRequest(request_id=rid(), customer_id=customer_id), timeout=T
    )
    err = await expect_error(create(stack, customer_id), grpc.StatusCode.FAILED_PRECONDITION)
    assert "deactivated" in (err.details() or "")
    assert await event_count(stack) == before + 2  # the registration and the deactivation only


async def test_rule_violations_have_precise_statuses_and_write_nothing(stack: Stack) -> None:
    order_id = (await create(stack)).order_id
    before = await event_count(stack)
    await expect_error(
        stack.commands.PlaceOrder(cpb.PlaceOrderRequest(request_id=rid(), order_id=order_id), timeout=T),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    await expect_error(
        stack.commands.AddOrderItem(
            cpb.AddOrderItemRequest(
                request_id=rid(), order_id=str(uuid.uuid4()), sku="A", name="a", quantity=1, unit_price_minor=1
            ),
            timeout=T,
        ),
        grpc.StatusCode.NOT_FOUND,
    )
    err = await expect_error(
        stack.commands.AddOrderItem(
            cpb.AddOrderItemRequest(
                request_id=rid(), order_id=order_id, sku="A", name="a", quantity=0, unit_price_minor=-5
            ),
            timeout=T,
        ),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    assert {"quantity", "unit_price_minor"} <= {f for f, _ in field_violations(err)}
    await expect_error(
        stack.commands.AddOrderItem(
            cpb.AddOrderItemRequest(
                request_id=rid(),
                order_id=order_id,
                sku="A",
                name="a",
                quantity=1,
                unit_price_minor=1,
                expected_version=5,
            ),
            timeout=T,
        ),
        grpc.StatusCode.ABORTED,
    )
    assert await event_count(stack) == before
    await add(stack, order_id, "A")
    await expect_error(
        stack.commands.AddOrderItem(
            cpb.AddOrderItemRequest(
                request_id=rid(), order_id=order_id, sku="A", name="a", quantity=1, unit_price_minor=1
            ),
            timeout=T,
        ),
        grpc.StatusCode.ALREADY_EXISTS,
    )
    await stack.commands.PlaceOrder(cpb.PlaceOrderRequest(request_id=rid(), order_id=order_id), timeout=T)
    err = await expect_error(
        stack.commands.AddOrderItem(
            cpb.AddOrderItemRequest(
                request_id=rid(), order_id=order_id, sku="B", name="b", quantity=1, unit_price_minor=1
            ),
            timeout=T,
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
    )
    assert "PLACED" in (err.details() or "")


async def test_repeated_request_id_returns_the_first_reply(stack: Stack) -> None:
    order_id = (await create(stack)).order_id
    request = cpb.AddOrderItemRequest(
        request_id=rid(), order_id=order_id, sku="A", name="a", quantity=1, unit_price_minor=1
    )
    first = await stack.commands.AddOrderItem(request, timeout=T)
    before = await event_count(stack)
    again = await stack.commands.AddOrderItem(request, timeout=T)
    assert again == first
    assert await event_count(stack) == before
    other = cpb.AddOrderItemRequest(
        request_id=request.request_id, order_id=order_id, sku="B", name="b", quantity=1, unit_price_minor=1
    )
    await expect_error(stack.commands.AddOrderItem(other, timeout=T), grpc.StatusCode.FAILED_PRECONDITION)


async def test_every_event_reaches_the_read_model_exactly_once_across_a_nats_outage(
    stack: Stack, nats_server: NatsHandle, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    customer_id = await register(stack)
    first = await create(stack, customer_id)
    await visible(stack, first.order_id, 1)
    finals: dict[str, int] = {}
    with nats_server.outage():
        for _ in range(3):
            order_id = (await create(stack, customer_id)).order_id
            await add(stack, order_id, "A", qty=2, price=100)
            last = await add(stack, order_id, "B", qty=1, price=50)
            finals[order_id] = last.version
        await asyncio.sleep(3.5)  # the relay's and the projector's NATS clients retry once a second meanwhile
    for order_id, version in finals.items():
        order = await visible(stack, order_id, version, timeout=45)
        assert order.version == version
        assert [(line.sku, line.quantity) for line in order.lines] == [("A", 2), ("B", 1)]
        assert order.total_minor == 250
    # The outage is one line per client (they retry once a second; a line at most every 10 s), and no traceback.
    unavailable = sorted(r.name for r in caplog.records if "NATS (JetStream) unavailable" in r.getMessage())
    assert unavailable == ["command_service.relay", "projector.consumer"], unavailable
    assert not [r.getMessage() for r in caplog.records if r.exc_info and r.name.startswith("nats")]


async def test_health_and_reflection_of_the_command_service(stack: Stack) -> None:
    health = health_pb2_grpc.HealthStub(stack.command_channel)

    async def serving() -> bool:
        reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=T)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    await eventually(serving, what="command service health SERVING")
    stub = reflection_pb2_grpc.ServerReflectionStub(stack.command_channel)
    services: list[str] = []
    async for reply in stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])):
        services = [s.name for s in reply.list_services_response.service]
    assert "cqrs.orders.v1.OrderCommandService" in services
    assert "grpc.health.v1.Health" in services


async def test_command_service_answers_unavailable_when_postgres_is_down() -> None:
    running = await start_command_server(
        CommandServiceSettings(
            postgres_dsn="postgresql://postgres@127.0.0.1:9/postgres", nats_url="nats://127.0.0.1:9",
            command_listen="127.0.0.1:0", postgres_timeout_seconds=1.0, relay_enabled=False, grace_seconds=0,
        )
    )  # fmt: skip
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = cgrpc.OrderCommandServiceStub(channel)
            err = await expect_error(
                stub.CreateOrder(
                    cpb.CreateOrderRequest(request_id=rid(), customer_id="c", currency="EUR", shipping_address=ADDRESS),
                    timeout=T,
                ),
                grpc.StatusCode.UNAVAILABLE,
            )
            assert "PostgreSQL" in (err.details() or "")
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=T)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
            # ... but alive: a database outage must not get the pod restarted.
            reply = await health.Check(health_pb2.HealthCheckRequest(service="liveness"), timeout=T)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await running.stop()
