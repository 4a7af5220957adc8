"""SIGKILL of command_service (which runs the outbox relay) at named failpoints and at random times, with one and
with two replicas whose relays compete for the relay lock. Nothing acknowledged may be lost, the outbox must
drain after every restart, and the read model must end equal to the event store."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.faults.audit import assert_scenario_clean, wait_outbox_older_than_drained
from tests.faults.load import Load
from tests.faults.stack import FaultStack

pytestmark = pytest.mark.slow

ROUNDS = 3


@pytest.mark.parametrize("point", ["relay.after_commit_before_publish", "relay.after_ack_before_delete"])
async def test_command_service_killed_at_relay_failpoint(stack: FaultStack, point: str) -> None:
    rng = random.Random()
    await stack.projector()
    service = await stack.command_service(failpoints=f"{point}=kill@{rng.randint(2, 6)}")
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        for round_no in range(ROUNDS):
            # The relay reaches the point within a few batches of the load and the process dies right there.
            code = await service.wait_exit(30, f"round {round_no}: load while failpoint {point} is armed")
            assert code == -9, f"expected death by SIGKILL at {point}, got exit status {code}: {service.tail()}"
            assert f"failpoint {point}: SIGKILL" in service.tail(20000), "the process died, but not at the failpoint"
            restarted = time.time()
            await service.start()  # without the failpoint: it must pick up what the dead one left in the outbox
            await service.wait_serving()
            await load.progress(15, what=f"after restart {round_no + 1}")
            await wait_outbox_older_than_drained(
                stack.dsn, restarted, timeout=15, what=f"the restarted relay to publish what was left at {point}"
            )
            if round_no + 1 < ROUNDS:  # arm it again for the next round: a crash, then a start with the point on
                await service.kill()
                await service.start(extra_env={"CQRS_FAILPOINTS": f"{point}=kill@{rng.randint(1, 6)}"})
                # No wait for SERVING: with a backlog in the outbox it may well die at the point before that.
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)


async def test_command_service_killed_at_random_times(stack: FaultStack) -> None:
    rng = random.Random()
    await stack.projector()
    service = await stack.command_service()
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        for round_no in range(4):
            await load.progress(rng.randint(5, 40), what=f"before kill {round_no + 1}")
            await asyncio.sleep(rng.uniform(0, 0.3))  # a random instant, not a wait for a condition
            await service.kill()
            restarted = time.time()
            await service.start()
            await service.wait_serving()
            await load.progress(10, what=f"after restart {round_no + 1}")
            await wait_outbox_older_than_drained(
                stack.dsn, restarted, timeout=15, what=f"the relay to publish the backlog after restart {round_no + 1}"
            )
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)


async def test_two_command_service_replicas_relays_compete(stack: FaultStack) -> None:
    rng = random.Random()
    await stack.projector()
    replicas = [await stack.command_service(), await stack.command_service()]
    load = Load([r.address for r in replicas], workers=4, seed=rng.randrange(1 << 30)).start()
    try:
        await load.progress(30, what="with both replicas up")
        for round_no in range(4):
            # Kill whichever holds the relay lock half of the time, a random one otherwise.
            victim = rng.choice(replicas)
            await asyncio.sleep(rng.uniform(0, 0.3))
            await victim.kill()
            killed = time.time()
            await load.progress(10, what=f"through the surviving replica after kill {round_no + 1}")
            await wait_outbox_older_than_drained(
                stack.dsn, killed, timeout=15, what=f"a relay to publish after replica kill {round_no + 1} (failover)"
            )
            await victim.start()
            await victim.wait_serving()
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)
