"""`commit_appends`: many appends in one statement and one commit, with per-append outcomes on conflicts."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from command_service.event_store import (
    OUTBOX_CHANNEL,
    AppendRequest,
    ClaimTaken,
    CommandReply,
    DuplicateRequest,
    RequestRecord,
    UniqueClaim,
    VersionConflict,
    commit_appends,
)
from command_service.group_commit import GroupCommitter
from core.envelope import EventMetadata
from core.errors import Unavailable
from core.order_events import ORDER_STREAM_TYPE, OrderCreated, OrderItemAdded
from core.values import Address

ADDRESS = Address("Ada", "1 Main St", "", "London", "N1", "GB")


def create(order_id: str, request_id: str | None = None, claims: tuple[UniqueClaim, ...] = ()) -> AppendRequest:
    rid = request_id or str(uuid.uuid4())
    return AppendRequest(
        ORDER_STREAM_TYPE,
        order_id,
        0,
        (OrderCreated(order_id, "customer-1", "EUR", ADDRESS),),
        EventMetadata(rid, rid, rid),
        RequestRecord(rid, "CreateOrder", rid),
        last_position=0,
        claims=claims,
    )


def add_items(order_id: str, expected_version: int, count: int, last_position: int = 0) -> AppendRequest:
    rid = str(uuid.uuid4())
    return AppendRequest(
        ORDER_STREAM_TYPE,
        order_id,
        expected_version,
        tuple(OrderItemAdded(f"SKU-{i}", "Thing", 1, 100) for i in range(count)),
        EventMetadata(rid, rid, rid),
        RequestRecord(rid, "AddOrderItem", rid),
        last_position=last_position,
    )


async def table_counts(pool: asyncpg.Pool) -> tuple[int, int, int]:
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM events) e, (SELECT count(*) FROM outbox) o, (SELECT count(*) FROM request_log) r"
    )
    assert row is not None
    return row["e"], row["o"], row["r"]


async def test_batch_is_one_statement_with_replies_in_order_and_positions_following_versions(
    pg_pool: asyncpg.Pool,
) -> None:
    first, second = str(uuid.uuid4()), str(uuid.uuid4())
    async with pg_pool.acquire() as conn:
        created = await commit_appends(conn, [create(first), create(second)], timeout=5)
        assert [type(r) for r in created] == [CommandReply, CommandReply]
        noop = add_items(first, 1, 0, last_position=123)
        outcomes = await commit_appends(conn, [add_items(first, 1, 3), noop, add_items(second, 1, 2)], timeout=5)
    replies = [o for o in outcomes if isinstance(o, CommandReply)]
    assert len(replies) == 3
    assert [(r.stream_id, r.version) for r in replies] == [(first, 4), (first, 1), (second, 3)]
    assert replies[1].position == 123  # a no-op reports the position its command saw

    rows = await pg_pool.fetch("SELECT stream_id, version, position FROM events ORDER BY position")
    by_stream: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        by_stream.setdefault(row["stream_id"], []).append((row["version"], row["position"]))
    for stream in (first, second):
        versions = [v for v, _ in by_stream[stream]]
        assert versions == sorted(versions) == list(range(1, len(versions) + 1))  # position order = version order
    assert replies[0].position == by_stream[first][-1][1]
    assert replies[2].position == by_stream[second][-1][1]
    logged = await pg_pool.fetchval(
        "SELECT reply ->> 'position' FROM request_log WHERE request_id = $1", noop.request.request_id
    )
    assert logged == "123"
    assert await table_counts(pg_pool) == (7, 7, 5)


async def test_a_conflict_fails_only_its_own_append_and_the_rest_commit_together(pg_pool: asyncpg.Pool) -> None:
    taken_order, reused_request = str(uuid.uuid4()), str(uuid.uuid4())
    async with pg_pool.acquire() as conn:
        setup = [create(taken_order), create(str(uuid.uuid4()), request_id=reused_request)]
        await commit_appends(conn, setup, timeout=5)
        before = await table_counts(pg_pool)
        fresh = [create(str(uuid.uuid4())) for _ in range(3)]
        batch = [
            fresh[0],
            create(taken_order),
            fresh[1],
            create(str(uuid.uuid4()), request_id=reused_request),
            fresh[2],
        ]
        outcomes = await commit_appends(conn, batch, timeout=5)
    assert isinstance(outcomes[1], VersionConflict)
    assert isinstance(outcomes[3], DuplicateRequest)
    assert all(isinstance(outcomes[i], CommandReply) for i in (0, 2, 4))
    assert await table_counts(pg_pool) == (before[0] + 3, before[1] + 3, before[2] + 3)
    stored = await pg_pool.fetch("SELECT stream_id FROM events WHERE stream_id = ANY($1)", [a.stream_id for a in fresh])
    assert len(stored) == 3


async def test_single_append_conflicts_map_to_their_domain_errors(pg_pool: asyncpg.Pool) -> None:
    order_id, request_id = str(uuid.uuid4()), str(uuid.uuid4())
    async with pg_pool.acquire() as conn:
        await commit_appends(conn, [create(order_id, request_id=request_id)], timeout=5)
        before = await table_counts(pg_pool)
        (version_taken,) = await commit_appends(conn, [create(order_id)], timeout=5)
        (request_taken,) = await commit_appends(conn, [create(str(uuid.uuid4()), request_id=request_id)], timeout=5)
    assert isinstance(version_taken, VersionConflict)
    assert isinstance(request_taken, DuplicateRequest)
    assert await table_counts(pg_pool) == before


async def test_claims_in_a_batch_are_enforced_per_append(pg_pool: asyncpg.Pool) -> None:
    claim = UniqueClaim("email", "ada@example.com")
    async with pg_pool.acquire() as conn:
        outcomes = await commit_appends(
            conn, [create(str(uuid.uuid4()), claims=(claim,)), create(str(uuid.uuid4()), claims=(claim,))], timeout=5
        )
    assert isinstance(outcomes[0], CommandReply)
    assert isinstance(outcomes[1], ClaimTaken)
    assert await table_counts(pg_pool) == (1, 1, 1)


async def test_a_batch_wakes_the_relay_once_it_commits(pg_pool: asyncpg.Pool, event_store_dsn: str) -> None:
    listener = await asyncpg.connect(event_store_dsn)
    woken = asyncio.Event()
    try:
        await listener.add_listener(OUTBOX_CHANNEL, lambda *_: woken.set())
        async with pg_pool.acquire() as conn:
            await commit_appends(conn, [add_items(str(uuid.uuid4()), 0, 0)], timeout=5)  # no events: no wake-up
            await asyncio.sleep(0.2)
            assert not woken.is_set()
            await commit_appends(conn, [create(str(uuid.uuid4())), create(str(uuid.uuid4()))], timeout=5)
        await asyncio.wait_for(woken.wait(), timeout=5)
    finally:
        await listener.close()


async def test_group_committer_shares_commits_between_concurrent_appends(pg_pool: asyncpg.Pool) -> None:
    committer = GroupCommitter(pg_pool, timeout=5, max_batch=64, flushers=1)
    try:
        taken = str(uuid.uuid4())
        await committer.submit(create(taken))
        appends = [create(str(uuid.uuid4())) for _ in range(40)] + [create(taken)]
        outcomes = await asyncio.gather(*(committer.submit(a) for a in appends), return_exceptions=True)
    finally:
        await committer.close()
    assert sum(isinstance(o, CommandReply) for o in outcomes) == 40
    assert isinstance(outcomes[-1], VersionConflict)
    assert committer.batches < committer.appends / 4  # the 41 concurrent appends shared a few commits
    assert await table_counts(pg_pool) == (41, 41, 41)


async def test_appends_beyond_the_committers_backlog_are_unavailable_and_write_nothing(pg_pool: asyncpg.Pool) -> None:
    committer = GroupCommitter(pg_pool, timeout=5, max_batch=1, flushers=1, max_waiting=2)
    try:
        # Submitted in one go, before the flusher (started by the first) runs: two wait, the rest find it full.
        outcomes = await asyncio.gather(
            *(committer.submit(create(str(uuid.uuid4()))) for _ in range(6)), return_exceptions=True
        )
    finally:
        await committer.close()
    refused = [o for o in outcomes if isinstance(o, Unavailable)]
    assert len(refused) == 4 and all("2 appends waiting to be committed; retry later" in str(o) for o in refused)
    assert sum(isinstance(o, CommandReply) for o in outcomes) == 2
    assert await table_counts(pg_pool) == (2, 2, 2)
