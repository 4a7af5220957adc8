"""A rolling restart as the users of the typed client see it: the command_service replicas are sent SIGTERM and
started again, one after the other, several times, under load from `cqrs_client.OrdersClient`. It must cost those
users nothing: every call returns (the client resends the same request_id on UNAVAILABLE, and on the CANCELLED a
stopping replica gives the calls it had received but not started, grpc/grpc#41785), every acknowledged command is
stored once, and the audit is clean."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import pytest

from cqrs_client import OrdersClient, RetryPolicy
from tests.faults.audit import assert_stack_clean
from tests.faults.load import Ack
from tests.faults.stack import FaultStack
from tests.faults.support import ADDRESS

pytestmark = pytest.mark.slow

ROUNDS = 4  # per replica: eight stops in all (a stop cancels calls in about a third of them under this load)
WORKERS = 16  # typed clients, half on each replica
ACK_TIMEOUT = 60.0
# Long enough to outlast a replica's stop and start on a busy two-core machine (a few seconds).
RETRY = RetryPolicy(max_attempts=30, initial_backoff=0.05, max_backoff=0.5, total_timeout=30.0)


async def _user(address: str, index: int, acks: list[Ack], stop: asyncio.Event) -> None:
    """Registers a customer, then creates, fills and places orders until told to stop; any error ends the test."""
    async with OrdersClient.connect(address, address, retry=RETRY, default_timeout=5.0) as client:
        rid = str(uuid.uuid4())
        customer = await client.register_customer(f"Rolling user {index}", f"{rid}@example.com", request_id=rid)
        acks.append(Ack("RegisterCustomer", rid, customer.customer_id, customer.version))
        while not stop.is_set():
            rid = str(uuid.uuid4())
            created = await client.create_order(customer.customer_id, "EUR", ADDRESS, request_id=rid)
            acks.append(Ack("CreateOrder", rid, created.order_id, created.version))
            rid = str(uuid.uuid4())
            added = await client.add_item(created.order_id, "SKU-1", "Item", 1, 500, request_id=rid)
            acks.append(Ack("AddOrderItem", rid, created.order_id, added.version))
            rid = str(uuid.uuid4())
            placed = await client.place_order(created.order_id, request_id=rid)
            acks.append(Ack("PlaceOrder", rid, created.order_id, placed.version))


async def test_rolling_restarts_of_command_service_cost_typed_client_users_nothing(stack: FaultStack) -> None:
    rng = random.Random()
    await stack.projector()
    replicas = [await stack.command_service(), await stack.command_service()]
    acks: list[Ack] = []
    stop = asyncio.Event()
    users = [
        asyncio.create_task(_user(replicas[i % 2].address, i, acks, stop), name=f"user-{i}") for i in range(WORKERS)
    ]

    async def more_acks(count: int, what: str) -> None:
        target, deadline = len(acks) + count, time.monotonic() + ACK_TIMEOUT
        while len(acks) < target:
            ended, _ = await asyncio.wait(users, timeout=0.05, return_when=asyncio.FIRST_COMPLETED)
            for user in ended:
                await user  # before `stop` only an error ends a user: it fails the test here, with its status
            assert time.monotonic() < deadline, f"{len(acks)}/{target} acknowledged {ACK_TIMEOUT:.0f}s {what}"

    try:
        await more_acks(40, "before the first restart")
        for round_no in range(ROUNDS):
            for replica in replicas:
                await asyncio.sleep(rng.uniform(0, 0.5))  # a random instant within the load
                await replica.stop_gracefully(30)
                await replica.start()
                await replica.wait_serving()
                await more_acks(20, f"after restarting {replica.address} (round {round_no + 1})")
    finally:
        stop.set()
        done, pending = await asyncio.wait(users, timeout=RETRY.total_timeout + 10)
        for task in pending:
            task.cancel()
    for task in done:
        await task  # any user's error fails the test, with its status
    assert not pending, f"{len(pending)} users did not finish their last call"

    await assert_stack_clean(stack, acks)
