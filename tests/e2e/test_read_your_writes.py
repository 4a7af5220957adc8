"""Read-your-writes across the whole stack: a command's consistency token makes the next query see the command.

commands -> PostgreSQL -> outbox relay -> JetStream -> projector (documents, then `checkpoints`) -> MongoDB ->
query service waiting for the token.
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from typing import Any

import grpc
import pytest
from cqrs.orders.v1 import command_service_pb2 as cpb
from cqrs.orders.v1 import consistency_pb2
from cqrs.orders.v1 import customer_service_pb2 as custpb
from cqrs.orders.v1 import query_service_pb2 as qpb

from tests.e2e.conftest import Stack
from tests.e2e.test_orders_e2e import ADDRESS, add, register, rid

EOF: object = grpc.aio.EOF  # type: ignore[attr-defined]  # what a finished stream's read() returns; grpc-stubs lacks it

T = 10.0  # RPC deadline (s)


def consistency(*tokens: str, accept_stale: bool = False) -> consistency_pb2.ConsistencyRequirement:
    return consistency_pb2.ConsistencyRequirement(consistency_tokens=list(tokens), accept_stale=accept_stale)


async def register_with_token(stack: Stack, name: str) -> custpb.CustomerCommandResult:
    reply = await stack.customer_commands.RegisterCustomer(
        custpb.RegisterCustomerRequest(request_id=rid(), name=name, email=f"{uuid.uuid4().hex}@example.com"),
        timeout=T,
    )
    return reply.result


async def create_order(stack: Stack, customer_id: str) -> cpb.CommandResult:
    reply = await stack.commands.CreateOrder(
        cpb.CreateOrderRequest(request_id=rid(), customer_id=customer_id, currency="EUR", shipping_address=ADDRESS),
        timeout=T,
    )
    return reply.result


async def get_with(stack: Stack, order_id: str, *tokens: str, timeout: float = T) -> qpb.GetOrderResponse:
    return await stack.queries.GetOrder(
        qpb.GetOrderRequest(order_id=order_id, consistency=consistency(*tokens)), timeout=timeout
    )


async def test_a_query_with_the_commands_token_always_sees_the_write(stack: Stack) -> None:
    customer_id = await register(stack)
    waits: list[int] = []
    misses_without_token = 0

    for i in range(30):
        created = await create_order(stack, customer_id)
        # Without the token the read model may well not have the order yet (counted, not asserted).
        try:
            plain = await stack.queries.GetOrder(qpb.GetOrderRequest(order_id=created.order_id), timeout=T)
            misses_without_token += plain.order.version < created.version
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND
            misses_without_token += 1
        seen = await get_with(stack, created.order_id, created.consistency_token)
        assert seen.order.version == created.version == 1
        assert not seen.consistency.stale
        waits.append(seen.consistency.waited_ms)

        added = await add(stack, created.order_id, f"SKU-{i}", qty=2, price=150)
        seen = await get_with(stack, created.order_id, added.consistency_token)
        assert seen.order.version == added.version == 2
        assert [(line.sku, line.quantity) for line in seen.order.lines] == [(f"SKU-{i}", 2)]
        assert seen.order.total_minor == 300
        waits.append(seen.consistency.waited_ms)

    print(
        f"\nread-your-writes: 60 queries right after their command waited median {statistics.median(waits)} ms, "
        f"max {max(waits)} ms; {misses_without_token}/30 immediate reads without the token missed the order"
    )


async def test_a_rename_is_visible_in_the_orders_and_the_customer_with_its_token(stack: Stack) -> None:
    registered = await register_with_token(stack, "Ada Lovelace")
    order = await create_order(stack, registered.customer_id)
    # A token covers its own stream. The customer's name on the order comes from the customer's stream, which
    # another partition (another projector replica) may apply later: its token is what covers it.
    before = await get_with(stack, order.order_id, order.consistency_token, registered.consistency_token)
    assert before.order.customer_name == "Ada Lovelace"

    renamed = (
        await stack.customer_commands.RenameCustomer(
            custpb.RenameCustomerRequest(request_id=rid(), customer_id=registered.customer_id, name="Ada King"),
            timeout=T,
        )
    ).result

    after = await get_with(stack, order.order_id, renamed.consistency_token)
    customer = await stack.customer_queries.GetCustomer(
        custpb.GetCustomerRequest(
            customer_id=registered.customer_id, consistency=consistency(renamed.consistency_token)
        ),
        timeout=T,
    )
    listed = await stack.customer_queries.ListCustomers(
        custpb.ListCustomersRequest(name_prefix="Ada K", consistency=consistency(renamed.consistency_token)),
        timeout=T,
    )

    assert (after.order.customer_name, after.order.customer_version) == ("Ada King", renamed.version)
    assert not after.consistency.stale
    assert (customer.customer.name, customer.customer.version) == ("Ada King", renamed.version)
    assert customer.customer.order_stats.draft_orders == 1
    assert [c.customer_id for c in listed.customers] == [registered.customer_id]


async def test_watch_order_sees_every_change_in_order_and_ends_on_delete(stack: Stack) -> None:
    customer_id = await register(stack)
    created = await create_order(stack, customer_id)
    call = stack.queries.WatchOrder(
        qpb.WatchOrderRequest(order_id=created.order_id, consistency_token=created.consistency_token), timeout=60
    )
    seen: list[tuple[int, bool]] = []

    async def next_message() -> qpb.WatchOrderResponse:
        message = await asyncio.wait_for(call.read(), timeout=T)
        assert message is not EOF, f"the stream ended early after {seen}"
        assert isinstance(message, qpb.WatchOrderResponse)
        seen.append((message.order.version, message.deleted))
        return message

    first = await next_message()
    assert first.order.version == 1 and not first.deleted

    commands: list[Any] = [
        lambda: add(stack, created.order_id, "SKU-1"),
        lambda: add(stack, created.order_id, "SKU-2", qty=3),
        lambda: stack.commands.ChangeItemQuantity(
            cpb.ChangeItemQuantityRequest(request_id=rid(), order_id=created.order_id, sku="SKU-1", quantity=5),
            timeout=T,
        ),
        lambda: stack.commands.RemoveOrderItem(
            cpb.RemoveOrderItemRequest(request_id=rid(), order_id=created.order_id, sku="SKU-2"), timeout=T
        ),
    ]
    for command in commands:
        reply = await command()
        version = reply.version if isinstance(reply, cpb.CommandResult) else reply.result.version
        # One change at a time: the stream must deliver exactly this version next.
        message = await next_message()
        assert (message.order.version, message.deleted) == (version, False)

    deleted = await stack.commands.DeleteOrder(
        cpb.DeleteOrderRequest(request_id=rid(), order_id=created.order_id), timeout=T
    )
    last = await next_message()
    assert (last.order.version, last.deleted) == (deleted.result.version, True)
    assert await asyncio.wait_for(call.read(), timeout=T) is EOF
    assert [v for v, _ in seen] == list(range(1, deleted.result.version + 1))
    assert await call.code() == grpc.StatusCode.OK


async def test_with_the_projector_stopped_a_new_token_is_unavailable_unless_stale_is_accepted(stack: Stack) -> None:
    customer_id = await register(stack)
    created = await create_order(stack, customer_id)
    assert (await get_with(stack, created.order_id, created.consistency_token)).order.version == 1

    await stack.projector.stop()
    added = await add(stack, created.order_id, "SKU-1")

    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await get_with(stack, created.order_id, added.consistency_token, timeout=1.5)
    elapsed = time.monotonic() - started
    stale = await stack.queries.GetOrder(
        qpb.GetOrderRequest(
            order_id=created.order_id, consistency=consistency(added.consistency_token, accept_stale=True)
        ),
        timeout=2.0,
    )

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert elapsed < 1.5
    details = caught.value.details() or ""
    assert f"{created.order_id} is at version 1, the token needs 2" in details, details
    assert stale.order.version == 1
    assert stale.consistency.stale
    assert [(lag.stream_id, lag.required_version, lag.applied_version) for lag in stale.consistency.behind] == [
        (created.order_id, 2, 1)
    ]
