"""The end of a fault scenario: waiting for quiescence (outbox drained, read model and checkpoints caught up),
then checking every acknowledged command is stored, failures were retryable, and the end-to-end audit is clean;
and the query-side probes some scenarios make."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import asyncpg
import grpc
from cqrs.orders.v1 import (
    query_service_pb2,
    query_service_pb2_grpc,
)
from pymongo import AsyncMongoClient

from core.customer_events import CUSTOMER_STREAM_TYPE
from core.generations import read_active
from core.order_events import ORDER_STREAM_TYPE
from core.read_model import CHECKPOINTS_COLLECTION
from core.subjects import SUBJECT_PREFIX
from cqrsctl.verify import VerifyConfig, run_verify
from projector.partitions import CLAIMED_WHILE_ITS_WORKER_RUNS
from tests.faults.load import Ack, Load
from tests.faults.stack import FaultStack
from tests.faults.support import (
    CHANNEL_OPTIONS,
    QUIESCE_LIMIT,
    QUIESCE_TIMEOUT,
    READ_MODEL_PROBE_DUTY,
    REPO_ROOT,
    RETRYABLE,
    RPC_TIMEOUT,
    wait_drained,
    wait_until,
)

# --------------------------------------------------------------------------------------------- quiescence


async def pg_scalar(dsn: str, sql: str, *args: Any) -> Any:
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        return await conn.fetchval(sql, *args, timeout=5)
    finally:
        await conn.close()


async def outbox_rows(dsn: str) -> int:
    return int(await pg_scalar(dsn, "SELECT count(*) FROM outbox"))


async def wait_outbox_empty(dsn: str, *, stall: float = QUIESCE_TIMEOUT, limit: float = QUIESCE_LIMIT) -> float:
    async def probe() -> tuple[int, str]:
        rows = await outbox_rows(dsn)
        return rows, f"{rows} outbox rows left"

    what = "the outbox to drain (every event published and acked)"
    return await wait_drained(probe, what=what, stall=stall, limit=limit)


async def wait_outbox_older_than_drained(dsn: str, since_wallclock: float, *, timeout: float, what: str) -> float:
    """Waits until no outbox row enqueued before `since_wallclock` (epoch seconds) is left: the relay publishes."""

    async def probe() -> tuple[bool, str]:
        rows = int(
            await pg_scalar(dsn, "SELECT count(*) FROM outbox WHERE enqueued_at < to_timestamp($1)", since_wallclock)
        )
        total = await outbox_rows(dsn)
        return rows == 0, f"{rows} rows from before still in the outbox ({total} in all)"

    return await wait_until(probe, what=what, timeout=timeout, interval=0.2)


async def stream_versions(dsn: str) -> dict[tuple[str, str], int]:
    """(stream_type, stream_id) -> the stream's last version in the event store."""
    conn = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await conn.fetch(
            "SELECT stream_type, stream_id, max(version) AS v FROM events GROUP BY 1, 2", timeout=10
        )
    finally:
        await conn.close()
    return {(r["stream_type"], r["stream_id"]): int(r["v"]) for r in rows}


_COLLECTIONS = {ORDER_STREAM_TYPE: "orders", CUSTOMER_STREAM_TYPE: "customers"}


def _collection_names() -> dict[str, str]:
    """stream type -> read-model collection, from the projection registry when it can be imported."""
    try:
        from core.projections.customers import CUSTOMERS
        from core.projections.orders import ORDERS

        return {ORDERS.stream_type: ORDERS.collection, CUSTOMERS.stream_type: CUSTOMERS.collection}
    except ImportError:  # pragma: no cover - the registry moved; the names are the documented ones
        return dict(_COLLECTIONS)


async def active_database_name(mongo_url: str, base: str) -> str:
    """The database of the read model's active generation (`base` until a cutover records another)."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_url, serverSelectionTimeoutMS=3000, timeoutMS=10000
    )
    try:
        active = await read_active(client[base])
        return base if active is None else active.database
    finally:
        await client.close()


async def read_model_versions(mongo_url: str, database: str) -> dict[tuple[str, str], int]:
    """(stream_type, stream_id) -> `version` of its read-model document."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_url, serverSelectionTimeoutMS=3000, timeoutMS=10000
    )
    try:
        versions: dict[tuple[str, str], int] = {}
        for stream_type, collection in _collection_names().items():
            async for doc in client[database][collection].find({}, {"version": 1}):
                versions[(stream_type, str(doc["_id"]))] = int(doc.get("version", 0))
        return versions
    finally:
        await client.close()


async def checkpoint_versions(mongo_url: str, database: str) -> tuple[dict[str, int], int]:
    """stream_id -> the version its checkpoint says every view reflects; and how many streams are parked."""
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(
        mongo_url, serverSelectionTimeoutMS=3000, timeoutMS=10000
    )
    try:
        versions: dict[str, int] = {}
        parked = 0
        async for doc in client[database][CHECKPOINTS_COLLECTION].find({}, {"version": 1, "parked.kind": 1}):
            versions[str(doc["_id"])] = int(doc.get("version", 0))
            parked += 1 if doc.get("parked") else 0
        return versions, parked
    finally:
        await client.close()


def checkpoint_lag(expected: dict[tuple[str, str], int], checkpoints: dict[str, int]) -> list[str]:
    """Every stream whose checkpoint is not at its last version in the event store."""
    return [
        f"{stream_type} {stream_id}: event store v{version}, checkpoint v{checkpoints.get(stream_id, 0)}"
        for (stream_type, stream_id), version in sorted(expected.items())
        if checkpoints.get(stream_id, 0) != version
    ]


def read_model_lag(expected: dict[tuple[str, str], int], actual: dict[tuple[str, str], int]) -> list[str]:
    """Every stream whose document is missing, behind, ahead, or has no stream in the event store."""
    problems = []
    for key, version in sorted(expected.items()):
        have = actual.get(key)
        if have != version:
            problems.append(
                f"{key[0]} {key[1]}: event store v{version}, read model {'missing' if have is None else f'v{have}'}"
            )
    for key in sorted(set(actual) - set(expected)):
        problems.append(f"{key[0]} {key[1]}: document v{actual[key]} without events in the event store")
    return problems


async def wait_read_model_caught_up(
    stack: FaultStack, *, stall: float = QUIESCE_TIMEOUT, limit: float = QUIESCE_LIMIT, report_every: float = 15.0
) -> float:
    async def probe() -> tuple[int, str]:
        expected = await stream_versions(stack.dsn)
        database = await active_database_name(stack.mongo_url, stack.names.name)  # after a cutover: the new one
        actual = await read_model_versions(stack.mongo_url, database)
        # The checkpoints too: a projector killed between a batch's documents and its checkpoints leaves them
        # behind until its unacked messages are redelivered (after the ack wait).
        checkpoints, parked = await checkpoint_versions(stack.mongo_url, database)
        problems = read_model_lag(expected, actual) + checkpoint_lag(expected, checkpoints)
        # Progress is counted in events, not streams: a stream many events behind differs until the last of them.
        behind = sum(abs(version - actual.get(key, 0)) + abs(version - checkpoints.get(key[1], 0))
                     for key, version in expected.items())  # fmt: skip
        left = max(behind, 1) if problems else 0
        differ = f"{len(problems)} of {len(expected)} streams differ ({behind} versions apart, {parked} parked)"
        return left, f"{differ}, e.g. {problems[:3]}"

    what = "the read model (MongoDB: documents and checkpoints) to reach every stream's last version"
    # The probe reads every document and checkpoint: after a long soak (~20,000 streams) the local MongoDB-wire
    # server spent most of its CPU serving it, and the projectors' catch-up crawled (tens of events a second).
    return await wait_drained(
        probe, what=what, stall=stall, limit=limit, report_every=report_every, max_duty=READ_MODEL_PROBE_DUTY
    )


async def wait_quiescent(stack: FaultStack) -> None:
    """Outbox empty, then every read-model document and checkpoint at its stream's last version (each waited for
    as long as it keeps moving: `wait_drained`)."""
    outbox = await wait_outbox_empty(stack.dsn)
    read_model = await wait_read_model_caught_up(stack)
    print(f"quiescent: outbox drained in {outbox:.1f}s, read model caught up {read_model:.1f}s later")


# --------------------------------------------------------------------------------------------- assertions


async def assert_acked_commands_stored(dsn: str, acks: Sequence[Ack]) -> None:
    """(a) Every command that got OK is in the request log and its event is at the replied (stream, version)."""
    assert acks, "the scenario acknowledged no command at all: the load never ran"
    rids = [a.request_id for a in acks]
    conn = await asyncpg.connect(dsn, timeout=10)
    try:
        logged = {
            r["request_id"]: r["stream_id"]
            for r in await conn.fetch("SELECT request_id, stream_id FROM request_log WHERE request_id = ANY($1)", rids)
        }
        events = {
            (r["stream_id"], r["version"]): r["rid"]
            for r in await conn.fetch(
                """SELECT e.stream_id, e.version, e.metadata->>'request_id' AS rid
                     FROM events e JOIN unnest($1::text[], $2::int[]) AS k(sid, v)
                       ON e.stream_id = k.sid AND e.version = k.v""",
                [a.stream_id for a in acks],
                [a.version for a in acks],
            )
        }
    finally:
        await conn.close()
    lost = []
    for ack in acks:
        problems = []
        if logged.get(ack.request_id) != ack.stream_id:
            problems.append(f"request log: {logged.get(ack.request_id, 'missing')!r}")
        event_rid = events.get((ack.stream_id, ack.version))
        if event_rid != ack.request_id:
            problems.append(f"event at v{ack.version}: {'missing' if event_rid is None else f'request {event_rid}'}")
        if problems:
            lost.append(f"{ack.rpc} {ack.request_id} -> {ack.stream_id} v{ack.version}: {'; '.join(problems)}")
    assert not lost, f"{len(lost)} of {len(acks)} acknowledged commands are not in the event store: {lost[:5]}"


def assert_failures_retryable(load: Load) -> None:
    """(b) Failed commands got only UNAVAILABLE / ABORTED, or CANCELLED from a replica being stopped (`Load.stops`):
    never INTERNAL/UNKNOWN, never a hang past the deadline."""
    bad = [f for f in load.failures if f.code not in RETRYABLE and not any(s.cancelled(f) for s in load.stops)]
    if bad:
        examples = [f"{f.rpc}: {f.code.name} after {f.seconds:.1f}s: {f.details[:200]}" for f in bad[:5]]
        raise AssertionError(
            f"{len(bad)} of {len(load.failures)} failed commands got a non-retryable status "
            f"({Counter(f.code.name for f in bad)}); e.g. {examples}"
        )


async def assert_audit_clean(
    *,
    postgres_dsn: str,
    nats_url: str,
    mongo_url: str,
    mongo_database: str,
    stream_name: str,
    subject_prefix: str | None = None,
    settle_seconds: float = 2.0,
) -> None:
    """(c) The end-to-end audit (`cqrs verify`, i.e. `cqrsctl.verify.run_verify`) finds nothing.

    First a narrow check of our own that needs nothing but the two databases (every order/customer document in
    MongoDB is at its PostgreSQL stream's max version and every stream has its document), then the real audit. Both
    read the active generation of `mongo_database` (the base database; after a cutover, the generation switched to).
    """
    expected = await stream_versions(postgres_dsn)
    actual = await read_model_versions(mongo_url, await active_database_name(mongo_url, mongo_database))
    problems = read_model_lag(expected, actual)
    assert not problems, f"audit (versions): {len(problems)} streams differ: {problems[:10]}"
    config = VerifyConfig(
        postgres_dsn=postgres_dsn,
        nats_url=nats_url,
        mongo_url=mongo_url,
        mongo_database=mongo_database,
        stream_name=stream_name,
        settle_seconds=settle_seconds,
        subject_prefix=SUBJECT_PREFIX if subject_prefix is None else subject_prefix,
    )
    try:
        result = await run_verify(config)
    except Exception as exc:  # reported as what it is: the audit tool failed, not the scenario
        raise AssertionError(
            f"cqrs verify itself failed (bug in cqrsctl/verify?): {exc!r}; the version check before it had passed"
        ) from exc
    findings = list(result.findings)
    assert result.clean, f"cqrs verify found {len(findings)} problems: {[str(f) for f in findings[:10]]}"


def assert_no_partition_claimed_while_its_worker_ran(stack: FaultStack) -> None:
    """No projector's ownership loop claimed a partition it was consuming (which would have started a second worker
    on it): the audit cannot see that, the projector's log can (`projector.partitions`)."""
    for service in stack.services:
        if service.module == "projector" and CLAIMED_WHILE_ITS_WORKER_RUNS in service.log_text():
            raise AssertionError(f"a projector claimed a partition whose worker ran: see {service.log_path}")


async def assert_stack_clean(stack: FaultStack, acks: Sequence[Ack]) -> None:
    """Quiescence, then (a) for these acknowledged commands, no partition consumed twice over in one projector, and
    (c) on the scenario's own servers."""
    await wait_quiescent(stack)
    await assert_acked_commands_stored(stack.dsn, acks)
    assert_no_partition_claimed_while_its_worker_ran(stack)
    n = stack.names
    await assert_audit_clean(
        postgres_dsn=stack.dsn, nats_url=stack.nats_url, mongo_url=stack.mongo_url, mongo_database=n.name,
        stream_name=n.stream, subject_prefix=n.prefix,
    )  # fmt: skip


async def assert_scenario_clean(stack: FaultStack, load: Load) -> None:
    """Quiescence, then (a), (b) and (c), with the load's seed in every failure message."""
    try:
        assert_failures_retryable(load)
        await assert_stack_clean(stack, load.acks)
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n[load seed {load.seed}: {len(load.acks)} acked, failures: {load.failure_summary()}]"
        ) from None


# --------------------------------------------------------------------------------------------- query side


async def get_order_status(address: str, order_id: str, timeout: float = RPC_TIMEOUT) -> tuple[str, float]:
    """Calls GetOrder; returns (status code name, seconds taken)."""
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
        try:
            await query_service_pb2_grpc.OrderQueryServiceStub(channel).GetOrder(
                query_service_pb2.GetOrderRequest(order_id=order_id), timeout=timeout
            )
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
    return code, time.monotonic() - started


def failpoint_in_source(name: str, package: str) -> bool:
    """True when some module of `package` calls `failpoint("<name>")` (another engineer may not have added it)."""
    needle = f'failpoint("{name}")'
    return any(needle in path.read_text(errors="replace") for path in (REPO_ROOT / package).rglob("*.py"))
