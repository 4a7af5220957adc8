"""Customer write-model guarantees against a real PostgreSQL: unique emails enforced atomically with the append."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from command_service.domain.customer_commands import ChangeCustomerEmail, RegisterCustomer
from command_service.event_store import EventStore
from command_service.handlers import CommandContext, customer_handler
from core.errors import AlreadyExists


def ctx() -> CommandContext:
    rid = str(uuid.uuid4())
    return CommandContext(request_id=rid, request_hash=rid)


async def test_concurrent_registrations_with_one_email_have_one_winner(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    handler = customer_handler(event_store)

    async def register(i: int) -> str:
        try:
            await handler.handle(RegisterCustomer(str(uuid.uuid4()), f"Twin {i}", " Same@Example.com "), ctx())
            return "ok"
        except AlreadyExists:
            return "taken"

    results = await asyncio.gather(*(register(i) for i in range(12)))
    assert results.count("ok") == 1 and results.count("taken") == 11
    assert await pg_pool.fetchval("SELECT count(*) FROM events") == 1
    assert await pg_pool.fetchval("SELECT count(*) FROM request_log") == 1
    assert await pg_pool.fetchval("SELECT value FROM unique_claims") == "same@example.com"


async def test_email_is_released_when_it_changes_and_taken_by_the_new_owner(event_store: EventStore) -> None:
    handler = customer_handler(event_store)
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    await handler.handle(RegisterCustomer(first, "First", "a@example.com"), ctx())
    with pytest.raises(AlreadyExists, match=r"a@example\.com"):
        await handler.handle(RegisterCustomer(second, "Second", "A@EXAMPLE.COM"), ctx())
    await handler.handle(ChangeCustomerEmail(first, "b@example.com"), ctx())
    await handler.handle(RegisterCustomer(second, "Second", "a@example.com"), ctx())
    with pytest.raises(AlreadyExists):
        await handler.handle(ChangeCustomerEmail(second, "b@example.com"), ctx())
    # Changing to one's own email is a no-op, not a conflict.
    same = await handler.handle(ChangeCustomerEmail(first, "B@example.com"), ctx())
    assert same.version == 2


async def test_concurrent_email_changes_to_one_address_have_one_winner(event_store: EventStore) -> None:
    handler = customer_handler(event_store)
    ids = [str(uuid.uuid4()) for _ in range(6)]
    for i, customer_id in enumerate(ids):
        await handler.handle(RegisterCustomer(customer_id, f"C{i}", f"c{i}@example.com"), ctx())

    async def change(customer_id: str) -> bool:
        try:
            await handler.handle(ChangeCustomerEmail(customer_id, "wanted@example.com"), ctx())
            return True
        except AlreadyExists:
            return False

    assert (await asyncio.gather(*(change(c) for c in ids))).count(True) == 1


async def test_customers_swapping_emails_at_once_are_refused_and_never_an_internal_error(
    event_store: EventStore, pg_pool: asyncpg.Pool
) -> None:
    """Each swap's two changes release their own email, then wait for the other's: PostgreSQL aborts one of them
    as a deadlock (about one pair in seven here), which is retried, and then refused like the other."""
    handler = customer_handler(event_store)
    outcomes: list[str] = []
    for _ in range(40):
        first, second = str(uuid.uuid4()), str(uuid.uuid4())
        await handler.handle(RegisterCustomer(first, "First", f"{first}@example.com"), ctx())
        await handler.handle(RegisterCustomer(second, "Second", f"{second}@example.com"), ctx())
        results = await asyncio.gather(
            handler.handle(ChangeCustomerEmail(first, f"{second}@example.com"), ctx()),
            handler.handle(ChangeCustomerEmail(second, f"{first}@example.com"), ctx()),
            return_exceptions=True,
        )
        outcomes += ["taken" if isinstance(r, AlreadyExists) else repr(r) for r in results]
    assert set(outcomes) == {"taken"}, [o for o in outcomes if o != "taken"][:5]
    # Nothing changed: every customer keeps the email it registered with.
    owners = await pg_pool.fetch("SELECT value, owner_stream_id FROM unique_claims")
    assert all(row["value"] == f"{row['owner_stream_id']}@example.com" for row in owners)
