"""The projector SIGKILLed between its MongoDB write and its JetStream ack, at random times, with two replicas on
the durable consumer, and SIGSTOPped past the ack wait while another replica runs. Redeliveries must be harmless
(version guard) and the read model must end equal to the event store."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from tests.faults.audit import assert_scenario_clean, failpoint_in_source, read_model_versions, stream_versions
from tests.faults.load import Load
from tests.faults.stack import FaultStack
from tests.faults.support import ACK_WAIT, wait_until

pytestmark = pytest.mark.slow

POINT = "projector.after_write_before_ack"


async def test_projector_killed_after_write_before_ack(stack: FaultStack) -> None:
    if not failpoint_in_source(POINT, "projector"):
        pytest.skip(
            f"failpoint {POINT!r} is declared in core/failpoints.py but no projector code calls "
            f'failpoint("{POINT}") yet, so arming it would never kill anything'
        )
    rng = random.Random()
    service = await stack.command_service()
    projector = await stack.projector(failpoints=f"{POINT}=kill@{rng.randint(1, 4)}")
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        for round_no in range(3):
            code = await projector.wait_exit(30, f"round {round_no}: load while failpoint {POINT} is armed")
            assert code == -9, f"expected death by SIGKILL at {POINT}, got exit status {code}: {projector.tail()}"
            assert f"failpoint {POINT}: SIGKILL" in projector.tail(20000), "the projector died, but not at the point"
            await load.progress(10, what=f"while the projector is down (round {round_no + 1})")
            # The next start is armed again except the last: the messages it wrote but never acked come back after
            # the ack wait and must be recognised as already applied.
            armed = round_no + 1 < 3
            await projector.start(extra_env={"CQRS_FAILPOINTS": f"{POINT}=kill@{rng.randint(2, 5)}"} if armed else None)
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)


async def test_projector_killed_at_random_times(stack: FaultStack) -> None:
    rng = random.Random()
    service = await stack.command_service()
    projector = await stack.projector()
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        for round_no in range(4):
            await load.progress(rng.randint(10, 40), what=f"before projector kill {round_no + 1}")
            await asyncio.sleep(rng.uniform(0, 0.3))
            await projector.kill()
            await projector.start()
            await projector.wait_projector_serving()  # the next kill hits a working projector
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)


async def test_two_projector_replicas_one_killed_repeatedly(stack: FaultStack) -> None:
    """Two replicas share the durable consumer for the whole run; one of them is killed and restarted 3 times."""
    rng = random.Random()
    service = await stack.command_service()
    replicas = [await stack.projector(), await stack.projector()]
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        for round_no in range(3):
            await load.progress(rng.randint(20, 50), what=f"before replica kill {round_no + 1}")
            victim = rng.choice(replicas)
            await victim.kill()
            await load.progress(10, what=f"with one projector replica dead (round {round_no + 1})")
            await victim.start()
            await victim.wait_projector_serving()
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)


async def test_projector_paused_past_ack_wait_while_another_runs(stack: FaultStack) -> None:
    """SIGSTOP one replica (holding messages) for 2.5x the ack wait: the other must carry on, redeliveries
    included; after SIGCONT the stale one's late writes must be rejected by the version guard."""
    rng = random.Random()
    service = await stack.command_service()
    frozen, other = await stack.projector(), await stack.projector()
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        await load.progress(40, what="before the pause")
        frozen.pause()
        paused_at = time.monotonic()
        try:
            await load.progress(30, what="while one projector is paused")
            # While it is still paused, everything committed so far must reach the read model through the other
            # replica (including what the paused one held: redelivered after the ack wait).
            target = await stream_versions(stack.dsn)

            async def caught_up() -> tuple[bool, str]:
                actual = await read_model_versions(stack.mongo_url, stack.names.name)
                behind = [f"{k[1]} v{actual.get(k, 0)}<v{v}" for k, v in target.items() if actual.get(k, 0) < v]
                return not behind, f"{len(behind)} of {len(target)} streams behind, e.g. {behind[:3]}"

            await wait_until(
                caught_up,
                what="the running replica to apply every event committed before the pause (redeliveries included) "
                "while the other is SIGSTOPped",
                timeout=ACK_WAIT * 2.5 + 15,
                interval=0.25,
            )
            # Keep it stopped well past the ack wait in any case (the fault's duration, not a wait for a condition).
            await asyncio.sleep(max(0.0, ACK_WAIT * 2.5 - (time.monotonic() - paused_at)))
        finally:
            frozen.resume()
        assert frozen.alive and other.alive
        await load.progress(20, what="after SIGCONT")
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)
