"""cqrs_client against the whole stack (PostgreSQL, JetStream, projector, MongoDB-wire server, both services),
and the example checkout service run as a separate process against it."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from pathlib import Path

import grpc
import pytest

from cqrs_client import Address, OrdersClient, OrderStatus, RetryPolicy, field_violations
from tests.e2e.conftest import Stack

ROOT = Path(__file__).resolve().parents[2]
ADDRESS = Address(recipient="Ada Lovelace", line1="12 Analytical St", city="London", postal_code="N1 9GU", country="GB")
PLACED = OrderStatus.Value("ORDER_STATUS_PLACED")
CANCELLED = OrderStatus.Value("ORDER_STATUS_CANCELLED")


def _connect(stack: Stack) -> OrdersClient:
    return OrdersClient.connect(
        f"127.0.0.1:{stack.command_server.port}",
        stack.query_server.address,
        default_timeout=10.0,
        retry=RetryPolicy(max_attempts=3, total_timeout=30.0),
    )


def _email() -> str:
    return f"{uuid.uuid4().hex}@example.com"


async def test_full_flow_with_read_your_writes(stack: Stack) -> None:
    async with _connect(stack) as client:
        customer = await client.register_customer("Ada Lovelace", _email())
        assert client.last_token == customer.consistency_token
        seen = await client.get_customer(customer.customer_id, read_your_writes=True)
        assert seen.customer.name == "Ada Lovelace"

        created = await client.create_order(customer.customer_id, "EUR", ADDRESS)
        order_id = created.order_id
        await client.add_item(order_id, "BOOK-1", "Notes on the Engine", 1, 2599)
        await client.add_item(order_id, "PEN-7", "Fountain pen", 2, 1250)
        await client.change_quantity(order_id, "PEN-7", 3)
        await client.add_item(order_id, "TMP", "removed again", 1, 1)
        await client.remove_item(order_id, "TMP")
        await client.change_shipping_address(
            order_id, Address(recipient="Ada", line1="1 St", city="Bath", postal_code="BA1 1AA", country="GB")
        )
        placed = await client.place_order(order_id)
        assert client.last_token == placed.consistency_token

        # Right after the command: the token makes the query wait for the projector instead of missing the write.
        view = await client.get_order(order_id, read_your_writes=True)
        order = view.order
        assert order.status == PLACED and order.version == placed.version
        assert [(line.sku, line.quantity) for line in order.lines] == [("BOOK-1", 1), ("PEN-7", 3)]
        assert order.total_minor == 2599 + 3 * 1250
        assert order.shipping_address.city == "Bath"

        renamed = await client.rename_customer(customer.customer_id, "Ada King")
        await client.change_customer_email(customer.customer_id, _email(), expected_version=renamed.version)
        deactivated = await client.deactivate_customer(customer.customer_id)
        stats = await client.get_customer(customer.customer_id, consistency=deactivated.consistency_token)
        assert stats.customer.name == "Ada King"
        assert stats.customer.order_stats.placed_orders == 1

        listed = await client.list_customers(name_prefix="Ada King", read_your_writes=True)
        assert [c.customer_id for c in listed.customers] == [customer.customer_id]


async def test_session_iter_orders_and_watch(stack: Stack) -> None:
    async with _connect(stack) as client:
        session = client.session()
        customer = await session.register_customer("Paging Customer", _email())
        order_ids = [(await session.create_order(customer.customer_id, "EUR", ADDRESS)).order_id for _ in range(7)]
        await session.add_item(order_ids[0], "SKU-1", "thing", 1, 100)
        await session.place_order(order_ids[0])
        await session.cancel_order(order_ids[1], "changed my mind")

        # The session's tokens make every page reflect all seven creates; page size 3 forces three pages.
        seen = [o.order_id async for o in session.iter_orders(customer_id=customer.customer_id, page_size=3)]
        assert sorted(seen) == sorted(order_ids) and len(seen) == 7
        first_page = await session.list_orders(customer_id=customer.customer_id, page_size=3)
        assert len(first_page.orders) == 3 and first_page.next_page_token

        placed = [o.order_id async for o in client.iter_orders(customer_id=customer.customer_id, status=PLACED)]
        assert placed == [order_ids[0]]
        cancelled = await session.get_order(order_ids[1])
        assert cancelled.order.status == CANCELLED and cancelled.order.cancel_reason == "changed my mind"

        # Watch from the current state (the token says which), then delete: the stream ends with deleted=True.
        watch = client.watch_order(order_ids[2], read_your_writes=False, timeout=20)
        first = await anext(watch)
        assert first.order.order_id == order_ids[2] and not first.deleted
        deleted = await session.delete_order(order_ids[2])
        rest = [u async for u in watch]
        assert rest and rest[-1].deleted

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.get_order(order_ids[2], consistency=deleted.consistency_token)
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND


async def test_errors_carry_field_violations_and_are_not_retried(stack: Stack) -> None:
    async with _connect(stack) as client:
        customer = await client.register_customer("Errors", _email())
        created = await client.create_order(customer.customer_id, "EUR", ADDRESS)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.add_item(created.order_id, "SKU", "thing", 0, 100)
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "quantity" in {v.field for v in field_violations(raised.value)}

        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.place_order(created.order_id, expected_version=99)
        assert raised.value.code() == grpc.StatusCode.ABORTED


async def test_same_request_id_is_idempotent(stack: Stack) -> None:
    async with _connect(stack) as client:
        customer = await client.register_customer("Idempotent", _email())
        key = str(uuid.uuid4())
        first = await client.create_order(customer.customer_id, "EUR", ADDRESS, request_id=key)
        again = await client.create_order(customer.customer_id, "EUR", ADDRESS, request_id=key)
        assert again.order_id == first.order_id and again.version == first.version


async def test_example_checkout_service_runs_against_the_stack(stack: Stack) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "protos")])}
    env.pop("CQRS_BEARER_TOKEN", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(ROOT / "examples" / "checkout_service.py"),
        "--command-addr", f"127.0.0.1:{stack.command_server.port}", "--query-addr", stack.query_server.address,
        "--timeout", "10",
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(process.communicate(), timeout=90)
    except TimeoutError:
        process.kill()
        await process.wait()
        raise AssertionError("examples/checkout_service.py did not finish within 90 s") from None
    output = out.decode()
    assert process.returncode == 0, f"exit {process.returncode}\nstdout:\n{output}\nstderr:\n{err.decode()}"
    assert "ORDER_STATUS_PLACED" in output
    assert "COBOL-1" in output and "total 40.47 EUR" in output, output
