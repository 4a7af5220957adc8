"""The servers themselves fail under load: nats-server SIGSTOPped for 20 s or SIGKILLed and restarted on its data,
PostgreSQL SIGKILLed and restarted (crash recovery) several times in a row, the MongoDB-wire server SIGKILLed and
restarted three times. Commands get UNAVAILABLE while the event store is gone and nothing acknowledged is lost;
the relay and the projector resume by themselves within seconds."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.faults.audit import assert_scenario_clean, get_order_status, wait_outbox_older_than_drained
from tests.faults.load import Load
from tests.faults.stack import FaultStack
from tests.faults.support import RETRYABLE, RPC_TIMEOUT, health_status, wait_until

pytestmark = pytest.mark.slow

NATS_PAUSE_SECONDS = 20.0
PG_DOWN_SECONDS = 3.0
MONGO_KILLS = 3
RESUME_TIMEOUT = 15.0  # "within seconds": the relay's backoff is capped at a few seconds


async def _expect_health(address: str, wanted: str, *, timeout: float, why: str) -> None:
    async def probe() -> tuple[bool, str]:
        status = await health_status(address)
        return status == wanted, status

    await wait_until(probe, what=f"health {wanted} at {address} {why}", timeout=timeout, interval=0.2)


async def test_nats_paused_for_20_seconds(stack: FaultStack) -> None:
    rng = random.Random()
    service = await stack.command_service()
    await stack.projector()
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        await load.progress(30, what="before pausing nats-server")
        stack.pause_server(stack.nats)
        paused_at = time.monotonic()
        try:
            # Commands do not need NATS: the outbox buffers, the service keeps serving.
            await load.progress(30, timeout=NATS_PAUSE_SECONDS, what="while nats-server is SIGSTOPped")
            assert await health_status(service.address) == "SERVING", "a NATS outage must not stop commands"
            await asyncio.sleep(max(0.0, NATS_PAUSE_SECONDS - (time.monotonic() - paused_at)))  # the outage
        finally:
            stack.resume_server(stack.nats)
        resumed = time.time()
        drained = await wait_outbox_older_than_drained(
            stack.dsn, resumed, timeout=RESUME_TIMEOUT + 10,
            what="the relay to publish the backlog of a 20 s NATS stall after SIGCONT",
        )  # fmt: skip
        print(f"backlog of the NATS stall published {drained:.1f}s after SIGCONT")
        await load.progress(20, what="after SIGCONT")
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)


async def test_nats_killed_and_restarted(stack: FaultStack) -> None:
    rng = random.Random()
    service = await stack.command_service()
    await stack.projector()
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        for round_no in range(2):
            await load.progress(rng.randint(20, 40), what=f"before nats kill {round_no + 1}")
            await stack.kill_server(stack.nats)
            await load.progress(15, what=f"while nats-server is dead (round {round_no + 1})")
            await stack.restart_server(stack.nats)
            restarted = time.time()
            await wait_outbox_older_than_drained(
                stack.dsn, restarted, timeout=RESUME_TIMEOUT,
                what=f"the relay to publish the backlog after nats-server restart {round_no + 1}",
            )  # fmt: skip
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)


async def test_postgres_killed_and_restarted_repeatedly(stack: FaultStack) -> None:
    rng = random.Random()
    service = await stack.command_service()
    await stack.projector()
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        for round_no in range(3):
            await load.progress(rng.randint(20, 40), what=f"before PostgreSQL kill {round_no + 1}")
            killed = time.monotonic()
            await stack.kill_server(stack.postgres)
            await _expect_health(service.address, "NOT_SERVING", timeout=10, why="while PostgreSQL is dead")

            async def refused(killed: float = killed) -> tuple[bool, str]:
                seen = load.failures_since(killed)
                return bool(seen), f"{len(seen)} failed commands since the kill"

            await wait_until(refused, what="a command to be refused while PostgreSQL is dead", timeout=RPC_TIMEOUT + 5)
            slow = [f for f in load.failures_since(killed) if f.seconds >= RPC_TIMEOUT * 0.9]
            assert not slow, f"commands hung instead of getting UNAVAILABLE: {[(f.code.name, f.seconds) for f in slow]}"
            await asyncio.sleep(max(0.0, PG_DOWN_SECONDS - (time.monotonic() - killed)))  # the outage itself
            await stack.restart_server(stack.postgres)
            restarted = time.time()
            await service.wait_serving(timeout=RESUME_TIMEOUT)
            await load.progress(10, timeout=RESUME_TIMEOUT, what=f"after PostgreSQL restart {round_no + 1}")
            await wait_outbox_older_than_drained(
                stack.dsn, restarted, timeout=RESUME_TIMEOUT,
                what=f"the relay to resume publishing after PostgreSQL restart {round_no + 1}",
            )  # fmt: skip
        outage_codes = {f.code for f in load.failures}
        assert outage_codes <= RETRYABLE, f"statuses seen during PostgreSQL outages: {load.failure_summary()}"
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)


async def test_mongo_killed_and_restarted(stack: FaultStack) -> None:
    """Killed several times, at random points of the projector's batches: every write of a batch is journaled, so a
    kill must never lose a write whose event was acked."""
    rng = random.Random()
    service = await stack.command_service()
    await stack.projector()
    query = await stack.query_service()
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        for round_no in range(MONGO_KILLS):
            await load.progress(rng.randint(15, 40), what=f"before MongoDB kill {round_no + 1}")
            order_id = next(a.stream_id for a in reversed(load.acks) if a.rpc == "CreateOrder")
            await stack.kill_server(stack.mongo)
            await _expect_health(query.address, "NOT_SERVING", timeout=10, why="while MongoDB is dead")
            code, seconds = await get_order_status(query.address, order_id)
            assert code == "UNAVAILABLE" and seconds < RPC_TIMEOUT, (
                f"GetOrder, MongoDB dead: {code} after {seconds:.1f}s"
            )
            await load.progress(10, what="while MongoDB is dead (commands do not need it)")
            await stack.restart_server(stack.mongo)
            await query.wait_serving(timeout=RESUME_TIMEOUT + 5)

            async def answers(order_id: str = order_id) -> tuple[bool, str]:
                code, _ = await get_order_status(query.address, order_id)
                return code == "OK", code

            await wait_until(
                answers, what=f"GetOrder to answer OK after MongoDB restart {round_no + 1}", timeout=RESUME_TIMEOUT
            )
        await load.progress(15, what="after the last MongoDB restart")
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)
