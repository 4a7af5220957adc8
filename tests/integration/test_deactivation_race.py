"""CreateOrder decided against an active customer must not commit once the customer was deactivated meanwhile:
the customer's version is re-checked inside the append's own statement (both write modes)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import pytest

from command_service.domain import commands as cmd
from command_service.domain.customer_commands import DeactivateCustomer
from command_service.event_store import EventStore, StreamGuard
from command_service.handlers import (
    ORDERS,
    ActiveCustomerCheck,
    CommandContext,
    CommandHandler,
    customer_handler,
)
from core.errors import FailedPrecondition
from core.values import Address
from tests.support import registered_customer

ADDRESS = Address("Ada", "1 Main St", "", "London", "N1", "GB")


def ctx() -> CommandContext:
    rid = str(uuid.uuid4())
    return CommandContext(request_id=rid, request_hash=rid)


class DeactivateRightAfterTheCheck:
    """The real precondition, then (once) the customer's deactivation commits before the order's append."""

    def __init__(self, store: EventStore) -> None:
        self._check = ActiveCustomerCheck(store)
        self._store = store
        self.calls = 0

    async def __call__(self, command: cmd.OrderCommand) -> Sequence[StreamGuard]:
        self.calls += 1
        guards = await self._check(command)
        if self.calls == 1 and isinstance(command, cmd.CreateOrder):
            await customer_handler(self._store).handle(DeactivateCustomer(command.customer_id), ctx())
        return guards


async def _count(store: EventStore, stream_id: str) -> int:
    return len(await store.load_stream(stream_id))


async def test_create_order_for_a_customer_deactivated_meanwhile_fails_and_writes_nothing(
    event_store: EventStore,
) -> None:
    customer_id = await registered_customer(event_store)
    racing = DeactivateRightAfterTheCheck(event_store)
    handler = CommandHandler(event_store, ORDERS, max_attempts=5, precondition=racing)
    order_id = str(uuid.uuid4())
    with pytest.raises(FailedPrecondition, match="deactivated"):
        await handler.handle(cmd.CreateOrder(order_id, customer_id, "EUR", ADDRESS), ctx())
    assert racing.calls == 2  # decided again after the guard failed
    assert await _count(event_store, order_id) == 0


async def test_a_customer_change_that_keeps_it_active_only_makes_the_order_decide_again(
    event_store: EventStore,
) -> None:
    from command_service.domain.customer_commands import RenameCustomer

    customer_id = await registered_customer(event_store)

    class RenameRightAfterTheCheck(DeactivateRightAfterTheCheck):
        async def __call__(self, command: cmd.OrderCommand) -> Sequence[StreamGuard]:
            self.calls += 1
            guards = await self._check(command)
            if self.calls == 1 and isinstance(command, cmd.CreateOrder):
                await customer_handler(self._store).handle(RenameCustomer(command.customer_id, "Ada B."), ctx())
            return guards

    racing = RenameRightAfterTheCheck(event_store)
    handler = CommandHandler(event_store, ORDERS, max_attempts=5, precondition=racing)
    order_id = str(uuid.uuid4())
    reply = await handler.handle(cmd.CreateOrder(order_id, customer_id, "EUR", ADDRESS), ctx())
    assert reply.version == 1 and racing.calls == 2
    assert await _count(event_store, order_id) == 1
