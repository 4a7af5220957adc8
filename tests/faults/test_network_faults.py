"""A TCP fault proxy (tests/faults/proxy.py) between the services and each dependency: added latency, blackhole
(half-open connections: nothing flows, nobody is told) and reset (RST). While its store is gone a service reports
NOT_SERVING and answers UNAVAILABLE before the caller's deadline; after heal it recovers by itself."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator

import pytest

from tests.faults.audit import assert_scenario_clean, get_order_status, wait_outbox_older_than_drained
from tests.faults.load import Load
from tests.faults.proxy import FaultProxy
from tests.faults.stack import FaultStack
from tests.faults.support import RPC_TIMEOUT, health_status, wait_until

pytestmark = pytest.mark.slow

OUTAGE_SECONDS = 5.0  # longer than every client-side timeout of the services (2 s PostgreSQL, 1 s MongoDB)
DETECT_TIMEOUT = 10.0  # health must turn NOT_SERVING within this
RECOVER_TIMEOUT = 20.0  # ... and SERVING again / the backlog published within this after heal


@pytest.fixture
async def proxies(stack: FaultStack) -> AsyncIterator[dict[str, FaultProxy]]:
    started = {
        "postgres": await FaultProxy("127.0.0.1", stack.postgres.port, "postgres-proxy").start(),
        "nats": await FaultProxy("127.0.0.1", stack.nats.port, "nats-proxy").start(),
        "mongo": await FaultProxy("127.0.0.1", stack.mongo.port, "mongo-proxy").start(),
    }
    try:
        yield started
    finally:
        await asyncio.gather(*(p.close() for p in started.values()))


async def _expect_health(address: str, wanted: str, *, timeout: float, why: str) -> float:
    async def probe() -> tuple[bool, str]:
        status = await health_status(address)
        return status == wanted, status

    return await wait_until(probe, what=f"health {wanted} at {address} {why}", timeout=timeout, interval=0.2)


def _hangs(load: Load, since: float, why: str) -> list[str]:
    """Commands that failed since `since` only when their deadline ran out (instead of a fast UNAVAILABLE)."""
    slow = [f for f in load.failures_since(since) if f.seconds >= RPC_TIMEOUT * 0.9]
    if not slow:
        return []
    examples = [(f.rpc, f.code.name, round(f.seconds, 1), f.details[:80]) for f in slow[:5]]
    return [
        f"{why}: {len(slow)} of {len(load.failures_since(since))} failed commands hung until the "
        f"{RPC_TIMEOUT:.0f}s deadline instead of getting UNAVAILABLE: {examples}"
    ]


async def _finish(stack: FaultStack, load: Load, errors: list[str]) -> None:
    """The end-of-scenario checks, reported together with what went wrong during the faults."""
    try:
        await assert_scenario_clean(stack, load)
    except AssertionError as exc:
        errors.append(str(exc))
    assert not errors, "\n".join(errors)


async def test_postgres_network_faults(stack: FaultStack, proxies: dict[str, FaultProxy]) -> None:
    pg = proxies["postgres"]
    dsn = stack.dsn.replace(f":{stack.postgres.port}/", f":{pg.port}/")
    service = await stack.command_service(dsn=dsn)
    await stack.projector()
    load = Load([service.address], seed=random.randrange(1 << 30)).start()
    errors: list[str] = []
    try:
        await load.progress(20, what="before any fault")
        pg.latency(0.05)
        await load.progress(15, what="with 50 ms added to every PostgreSQL round trip")
        pg.heal()
        for fault in ("blackhole", "reset"):
            began = time.monotonic()
            getattr(pg, fault)()
            await _expect_health(
                service.address, "NOT_SERVING", timeout=DETECT_TIMEOUT, why=f"with PostgreSQL {fault}d"
            )

            async def refused(began: float = began) -> tuple[bool, str]:
                seen = [f for f in load.failures_since(began) if f.code.name == "UNAVAILABLE"]
                return bool(seen), f"failures since the fault: {len(load.failures_since(began))}"

            await wait_until(
                refused, what=f"a command answered UNAVAILABLE with PostgreSQL {fault}d", timeout=RPC_TIMEOUT + 5
            )
            await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - began)))  # the outage itself
            errors += _hangs(load, began, f"PostgreSQL {fault}")
            pg.heal()
            healed = time.time()
            await _expect_health(
                service.address, "SERVING", timeout=RECOVER_TIMEOUT, why=f"after PostgreSQL {fault} healed"
            )
            await load.progress(15, timeout=RECOVER_TIMEOUT, what=f"after PostgreSQL {fault} healed")
            await wait_outbox_older_than_drained(
                stack.dsn, healed, timeout=RECOVER_TIMEOUT, what=f"the relay to publish again after PostgreSQL {fault}"
            )
    finally:
        await load.stop()
    await _finish(stack, load, errors)


async def test_nats_network_faults(stack: FaultStack, proxies: dict[str, FaultProxy]) -> None:
    """The relay and the projector reach NATS through the proxy; commands never need NATS."""
    nats_proxy = proxies["nats"]
    url = f"nats://{nats_proxy.address}"
    service = await stack.command_service(nats_url=url)
    await stack.projector(nats_url=url)
    load = Load([service.address], seed=random.randrange(1 << 30)).start()
    try:
        await load.progress(20, what="before any fault")
        nats_proxy.latency(0.05)
        await load.progress(15, what="with 50 ms added to NATS")
        nats_proxy.heal()
        for fault in ("blackhole", "reset"):
            began = time.monotonic()
            getattr(nats_proxy, fault)()
            await load.progress(20, what=f"with NATS {fault}d (the outbox buffers)")
            assert await health_status(service.address) == "SERVING", f"NATS {fault} must not stop commands"
            await asyncio.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - began)))
            nats_proxy.heal()
            healed = time.time()
            await wait_outbox_older_than_drained(
                stack.dsn, healed, timeout=RECOVER_TIMEOUT,
                what=f"the relay to publish the backlog after NATS {fault} healed (it must drop a dead connection)",
            )  # fmt: skip
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)


async def test_mongo_network_faults(stack: FaultStack, proxies: dict[str, FaultProxy]) -> None:
    """The projector and the query service reach MongoDB through the proxy."""
    mongo_proxy = proxies["mongo"]
    url = stack.mongo_url.replace(f":{stack.mongo.port}/", f":{mongo_proxy.port}/")
    service = await stack.command_service()
    await stack.projector(mongo_url=url)
    query = await stack.query_service(mongo_url=url)
    load = Load([service.address], seed=random.randrange(1 << 30)).start()
    try:
        await load.progress(30, what="before any fault")
        order_id = next(a.stream_id for a in reversed(load.acks) if a.rpc == "CreateOrder")

        async def answers() -> tuple[bool, str]:
            code, _ = await get_order_status(query.address, order_id)
            return code == "OK", code

        await wait_until(answers, what="GetOrder to find the order", timeout=RECOVER_TIMEOUT)
        mongo_proxy.latency(0.05)
        code, seconds = await get_order_status(query.address, order_id)
        assert code == "OK", f"GetOrder with 50 ms MongoDB latency: {code} after {seconds:.1f}s"
        mongo_proxy.heal()
        for fault in ("blackhole", "reset"):
            getattr(mongo_proxy, fault)()
            await _expect_health(query.address, "NOT_SERVING", timeout=DETECT_TIMEOUT, why=f"with MongoDB {fault}d")
            code, seconds = await get_order_status(query.address, order_id)
            assert code == "UNAVAILABLE" and seconds < RPC_TIMEOUT * 0.9, (
                f"GetOrder with MongoDB {fault}d: {code} after {seconds:.1f}s (wanted UNAVAILABLE before the deadline)"
            )
            await load.progress(15, what=f"commands with MongoDB {fault}d")
            mongo_proxy.heal()
            await _expect_health(query.address, "SERVING", timeout=RECOVER_TIMEOUT, why=f"after MongoDB {fault} healed")
            await wait_until(
                answers, what=f"GetOrder to answer OK after MongoDB {fault} healed", timeout=RECOVER_TIMEOUT
            )
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)
