"""Projector replicas scaled 1 -> 3 -> 2 under load, with replicas SIGKILLed and added mid-run, once with the
stream's partitions owned by replicas and once with the shared consumer of streams created before partitioning.

Both runs end with the audit clean and every acknowledged command stored. They print redeliveries (from JetStream:
deliveries beyond one per message, kills included) and naks per 1,000 events side by side, and the partitioned run
must end with every partition owned exactly once, shared fairly between the two survivors."""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest

from cqrsctl.status import render_projectors, scrape
from projector.consumer import group_consumers
from tests.faults.audit import assert_scenario_clean
from tests.faults.load import Load
from tests.faults.stack import FaultStack
from tests.faults.support import Service, wait_until

pytestmark = pytest.mark.slow

PARTITIONS = 8


@dataclass
class Counts:
    events: int
    redeliveries: int
    naks: float

    def per_thousand(self, value: float) -> float:
        return 1000 * value / max(self.events, 1)


@contextlib.asynccontextmanager
async def fault_stack() -> AsyncIterator[FaultStack]:
    base = Path(tempfile.mkdtemp(prefix="cqrs-faults-"))
    stack = FaultStack(base, f"f{uuid.uuid4().hex[:10]}")
    ok = False
    try:
        await stack.start_servers()
        yield stack
        ok = True
    finally:
        if not ok:
            print(f"\n===== logs (kept in {base}) =====\n{stack.diagnostics()}")
        await stack.close()
        if ok:
            shutil.rmtree(base, ignore_errors=True)


class Scenario:
    def __init__(self, stack: FaultStack, partitions: int) -> None:
        self.stack = stack
        self.partitions = partitions
        self.replicas: list[Service] = []
        self.naks_of_the_dead = 0.0

    async def add_replica(self) -> Service:
        """Starts a replica and waits until it has applied events of the load: one killed, or scraped, before it
        took part would test nothing."""
        replica = await self.stack.projector(CQRS_STREAM_PARTITIONS=str(self.partitions))
        self.replicas.append(replica)

        async def working() -> tuple[bool, str]:
            applied = (await asyncio.to_thread(replica.metrics)).get("cqrs_projector_events_applied_total", 0.0)
            return applied > 0, f"{applied:.0f} events applied"

        await wait_until(working, what=f"projector replica #{len(self.replicas)} to apply events", timeout=60)
        return replica

    async def kill_one(self, rng: random.Random) -> None:
        victim = rng.choice(self.replicas)
        with contextlib.suppress(OSError):  # what it counted up to now (a lower bound of its naks)
            self.naks_of_the_dead += (await asyncio.to_thread(victim.metrics)).get("cqrs_projector_naks_total", 0.0)
        await victim.kill()
        self.replicas.remove(victim)

    async def owned(self) -> list[float]:
        samples = [await asyncio.to_thread(r.metrics) for r in self.replicas]
        return [s.get("cqrs_projector_partitions_owned", 0.0) for s in samples]

    async def counts(self) -> Counts:
        names = self.stack.names
        nc = await nats.connect(self.stack.nats_url, connect_timeout=5)
        try:
            js = nc.jetstream()
            events = int((await js.stream_info(names.stream)).state.messages)
            infos = await group_consumers(js, names.stream, names.durable)
            deliveries = sum(int(i.delivered.consumer_seq or 0) if i.delivered else 0 for i in infos)
        finally:
            await nc.close()
        naks = self.naks_of_the_dead
        for replica in self.replicas:
            naks += (await asyncio.to_thread(replica.metrics)).get("cqrs_projector_naks_total", 0.0)
        return Counts(events, deliveries - events, naks)


async def run(stack: FaultStack, partitions: int, seed: int) -> Counts:
    """1 replica, +2 (3), one killed (2), +1 (3), one killed (2), under a command load throughout."""
    rng = random.Random(seed)
    service = await stack.command_service(CQRS_STREAM_PARTITIONS=str(partitions))
    scenario = Scenario(stack, partitions)
    load = Load([service.address], seed=rng.randrange(1 << 30)).start()
    try:
        await scenario.add_replica()
        await load.progress(40, what="with one projector replica")
        await scenario.add_replica()
        await scenario.add_replica()
        await load.progress(rng.randint(30, 60), what="with three replicas")
        await scenario.kill_one(rng)
        await load.progress(rng.randint(20, 40), what="after a SIGKILL, two replicas")
        await scenario.add_replica()
        await load.progress(rng.randint(20, 40), what="with a replica added back, three")
        await scenario.kill_one(rng)
        await load.progress(rng.randint(20, 40), what="after a second SIGKILL, two replicas")
    finally:
        await load.stop()
    await assert_scenario_clean(stack, load)
    if partitions:

        async def shared_fairly() -> tuple[bool, str]:
            owned = await scenario.owned()
            return sum(owned) == partitions and max(owned) - min(owned) <= 1, f"owned per replica: {owned}"

        await wait_until(shared_fairly, what="every partition owned once, 4 by each survivor", timeout=30)
        # `cqrs status` over the survivors adds their partitions up, as an operator would read them
        screen = "\n".join(
            render_projectors([await asyncio.to_thread(scrape, r.metrics_url) for r in scenario.replicas])
        )
        assert f"partitions owned          {partitions} of {partitions}" in screen, screen
        assert screen.count("MongoDB up, serving, 4 partitions") == 2, screen
    return await scenario.counts()


async def test_partitioned_replicas_scale_1_3_2_with_kills_beside_the_shared_consumer() -> None:
    seed = random.randrange(1 << 30)
    async with fault_stack() as stack:
        partitioned = await run(stack, PARTITIONS, seed)
    async with fault_stack() as stack:
        shared = await run(stack, 0, seed)
    rows = [("partitioned (8)", partitioned), ("shared consumer", shared)]
    print(f"\nprojector replicas 1 -> 3 -> 2 with two SIGKILLs (seed {seed}):")
    for name, c in rows:
        print(
            f"  {name:16} {c.events:6d} events  redeliveries {c.per_thousand(c.redeliveries):6.1f} per 1,000"
            f"  naks {c.per_thousand(c.naks):6.1f} per 1,000"
        )
    # Each SIGKILL redelivers what its victim held (a batch per partition at most); handovers redeliver nothing.
    assert partitioned.redeliveries <= 2 * PARTITIONS * 50, f"seed {seed}: {partitioned}"
