"""`cqrs demo`: drives orders through the running services and reports throughput and replication lag."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
import uuid

import grpc
from cqrs.orders.v1 import command_service_pb2 as cpb
from cqrs.orders.v1 import command_service_pb2_grpc as cgrpc
from cqrs.orders.v1 import customer_service_pb2 as custpb
from cqrs.orders.v1 import customer_service_pb2_grpc as custgrpc
from cqrs.orders.v1 import order_pb2
from cqrs.orders.v1 import query_service_pb2 as qpb
from cqrs.orders.v1 import query_service_pb2_grpc as qgrpc

from core.backoff import exponential

RPC_TIMEOUT = 5.0


def _rid() -> str:
    return str(uuid.uuid4())


async def _wait_visible(
    query: qgrpc.OrderQueryServiceAsyncStub, order_id: str, version: int, timeout: float
) -> tuple[order_pb2.Order, float]:
    """Polls GetOrder until the read model shows `version`; returns the order and the seconds it took."""
    start = time.perf_counter()
    attempt = 0
    while True:
        try:
            reply = await query.GetOrder(qpb.GetOrderRequest(order_id=order_id), timeout=RPC_TIMEOUT)
            if reply.order.version >= version:
                return reply.order, time.perf_counter() - start
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.NOT_FOUND:
                raise
        if time.perf_counter() - start > timeout:
            raise TimeoutError(f"order {order_id} did not reach version {version} in the read model in {timeout}s")
        attempt += 1
        await asyncio.sleep(exponential(attempt, 0.002, 0.05))


async def _one_order(
    commands: cgrpc.OrderCommandServiceAsyncStub, query: qgrpc.OrderQueryServiceAsyncStub, customer: str, timeout: float
) -> tuple[order_pb2.Order, int, float]:
    """Creates, fills, changes and places one order, then reads it back.

    Returns the order as read, the commands sent, and the lag: seconds from PlaceOrder's reply until a query saw it.
    """
    created = await commands.CreateOrder(
        cpb.CreateOrderRequest(
            request_id=_rid(),
            customer_id=customer,
            currency="EUR",
            shipping_address=order_pb2.Address(
                recipient="Ada Lovelace", line1="12 Analytical St", city="London", postal_code="N1 9GU", country="GB"
            ),
        ),
        timeout=RPC_TIMEOUT,
    )
    order_id = created.result.order_id
    await commands.AddOrderItem(
        cpb.AddOrderItemRequest(
            request_id=_rid(),
            order_id=order_id,
            sku="BOOK-1",
            name="Notes on the Engine",
            quantity=1,
            unit_price_minor=2599,
        ),
        timeout=RPC_TIMEOUT,
    )
    await commands.AddOrderItem(
        cpb.AddOrderItemRequest(
            request_id=_rid(), order_id=order_id, sku="PEN-7", name="Fountain pen", quantity=2, unit_price_minor=1250
        ),
        timeout=RPC_TIMEOUT,
    )
    await commands.ChangeItemQuantity(
        cpb.ChangeItemQuantityRequest(request_id=_rid(), order_id=order_id, sku="PEN-7", quantity=3),
        timeout=RPC_TIMEOUT,
    )
    placed = await commands.PlaceOrder(cpb.PlaceOrderRequest(request_id=_rid(), order_id=order_id), timeout=RPC_TIMEOUT)
    order, lag = await _wait_visible(query, order_id, placed.result.version, timeout)
    return order, 5, lag


async def run_demo(command_addr: str, query_addr: str, orders: int = 20, timeout: float = 10.0) -> int:
    async with grpc.aio.insecure_channel(command_addr) as cch, grpc.aio.insecure_channel(query_addr) as qch:
        commands = cgrpc.OrderCommandServiceStub(cch)
        query = qgrpc.OrderQueryServiceStub(qch)
        customers = custgrpc.CustomerCommandServiceStub(cch)
        suffix = uuid.uuid4().hex[:8]
        registered = await customers.RegisterCustomer(
            custpb.RegisterCustomerRequest(
                request_id=_rid(), name=f"Ada Lovelace {suffix}", email=f"ada.{suffix}@example.com"
            ),
            timeout=RPC_TIMEOUT,
        )
        customer = registered.result.customer_id

        started = time.perf_counter()
        results = await asyncio.gather(*(_one_order(commands, query, customer, timeout) for _ in range(orders)))
        elapsed = time.perf_counter() - started
        sent = sum(r[1] for r in results)
        lags = [r[2] for r in results]
        last = results[-1][0]
        listed = await query.ListOrders(qpb.ListOrdersRequest(customer_id=customer, page_size=500), timeout=RPC_TIMEOUT)

    print(
        f"order {last.order_id} for customer {last.customer_name or last.customer_id}: "
        f"{order_pb2.OrderStatus.Name(last.status)}, version {last.version}, position {last.position}"
    )
    for line in last.lines:
        print(
            f"  {line.quantity} x {line.sku:<8} {line.name:<22} {line.unit_price_minor / 100:>8.2f} "
            f"= {line.line_total_minor / 100:>8.2f} {last.currency}"
        )
    print(f"  total {last.total_minor / 100:.2f} {last.currency}")
    print(f"ListOrders(customer) returned {len(listed.orders)} of {orders} orders")
    print(
        f"commands: {sent} in {elapsed:.2f}s (including read-backs) = {sent / elapsed:.0f} commands/s, "
        f"{orders} orders concurrently"
    )
    ms = sorted(lag * 1000 for lag in lags)
    print(
        "replication lag seen by a reader polling after the last command (ms): "
        f"min {ms[0]:.1f}, median {statistics.median(ms):.1f}, max {ms[-1]:.1f}"
    )
    if len(listed.orders) != orders:
        print("read model is missing orders", file=sys.stderr)
        return 1
    return 0
