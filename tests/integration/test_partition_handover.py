"""Partition handovers between projector replicas, with the lease store in a real MongoDB.

The workers here are stand-ins for the projector's partition consumers (the ownership loop's own callback, no
server behind it): they run until their fence is released, then take as long as a batch in hand takes on a busy
MongoDB before they finish.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

import projector.partitions
from projector.leases import PartitionLeases
from projector.metrics import ProjectorMetrics
from projector.partitions import Fence, PartitionOwner, WorkerNotStarted
from tests.support import eventually

LEASE_SECONDS = 1.5
PARTITIONS = 8


@pytest.fixture
async def lease_store(mongo_url: str, unique_name: str) -> AsyncIterator[AsyncDatabase[dict[str, Any]]]:
    client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(mongo_url, tz_aware=True, timeoutMS=5000)
    try:
        yield client[unique_name]
        await client.drop_database(unique_name)
    finally:
        await client.close()


class Replica:
    """One projector replica's ownership loop; its workers take `finish_seconds` to finish once released."""

    def __init__(
        self,
        store: AsyncDatabase[dict[str, Any]],
        member: str,
        finish_seconds: float,
        leases: type[PartitionLeases] = PartitionLeases,
    ) -> None:
        self.started: list[int] = []  # partitions whose worker started (workers of one claim start in any order)
        self.fences: dict[int, Fence] = {}  # the fence each partition's last worker got
        self.cancelled: list[int] = []  # partitions whose worker was cancelled with its batch in hand
        self.unavailable: set[int] = set()  # partitions whose source cannot be opened (JetStream without a quorum)
        self.refused = 0  # worker starts refused so
        self.metrics = ProjectorMetrics()
        self.stopping = asyncio.Event()
        self._finish_seconds = finish_seconds
        self.owner = PartitionOwner(
            leases(store, "group", member, LEASE_SECONDS),
            PARTITIONS,
            self._start_worker,
            self.metrics,
            self.stopping,
            lease_seconds=LEASE_SECONDS,
            mongo_ready=_always,
            mongo_failed=_raise,
            every_round=_nothing,
        )
        self.task = asyncio.create_task(self.owner.run())

    async def _start_worker(
        self, partition: int, fence: Fence
    ) -> tuple[asyncio.Task[None], Callable[[], Awaitable[None]]]:
        async def consume() -> None:
            while not fence.released:  # noqa: ASYNC110  # a flag, checked between batches as the real workers do
                await asyncio.sleep(0.02)
            try:
                await asyncio.sleep(self._finish_seconds)  # the batch in hand
            except asyncio.CancelledError:
                self.cancelled.append(partition)
                raise

        if partition in self.unavailable:
            self.refused += 1
            raise WorkerNotStarted(f"partition {partition}: its source cannot be opened")
        self.started.append(partition)
        self.fences[partition] = fence
        return asyncio.create_task(consume()), _nothing

    def handovers(self, direction: str) -> float:
        labels = {"direction": direction}
        return self.metrics.registry.get_sample_value("cqrs_projector_partition_handovers_total", labels) or 0

    async def stop(self) -> None:
        self.stopping.set()
        await asyncio.wait_for(self.task, timeout=30)


async def _always() -> bool:
    return True


def _raise(exc: BaseException) -> None:
    raise exc


async def _nothing() -> None:
    return None


@contextlib.asynccontextmanager
async def joined_by_a_second_replica(store: AsyncDatabase[dict[str, Any]], first: Replica) -> AsyncIterator[Replica]:
    """Once `first` owns every partition a second replica joins; yields it when each owns half of them and two lease
    TTLs more have passed (time to lose or take one back). Stops both on the way out."""
    second: Replica | None = None
    try:

        async def first_owns_all() -> bool:
            return first.owner.owned == list(range(PARTITIONS))

        await eventually(first_owns_all, what="the only replica to own every partition")
        second = joined = Replica(store, "b", finish_seconds=0)

        async def shared() -> bool:
            return first.owner.owned == [0, 1, 2, 3] and joined.owner.owned == [4, 5, 6, 7]

        await eventually(shared, timeout=30, what="each replica to own half of the partitions")
        await asyncio.sleep(2 * LEASE_SECONDS)
        yield second
    finally:
        for replica in (second, first):
            if replica is not None:
                await replica.stop()


async def test_a_replica_handing_partitions_over_keeps_the_leases_of_those_it_keeps(
    lease_store: AsyncDatabase[dict[str, Any]],
) -> None:
    """A replica joins; the first one's batches in hand take three lease TTLs to finish. Handing four partitions
    over must not stop the first replica from renewing the four it keeps (and its heartbeat): fails if the newcomer
    ever takes one of those, or the first replica loses one."""
    first = Replica(lease_store, "a", finish_seconds=3 * LEASE_SECONDS)
    async with joined_by_a_second_replica(lease_store, first) as second:
        assert first.owner.owned == [0, 1, 2, 3] and second.owner.owned == [4, 5, 6, 7]
        assert sorted(second.started) == [4, 5, 6, 7], "the newcomer took a partition the first replica was keeping"
        assert sorted(first.started) == list(range(PARTITIONS)), "the first replica lost a partition and took it back"
        assert first.handovers("lost") == 0 and second.handovers("lost") == 0
        assert first.handovers("released") == 4


class OwnersReadBeforeAHandoverEnds(PartitionLeases):
    """A lease store whose `owners()` answer left the server before a handover in flight freed its lease and
    reaches the replica after it did (a loaded MongoDB, a busy event loop): the owners it returns are one release
    out of date. The test's replica sets `handing_over` to its owner's handovers in flight."""

    handing_over: Callable[[], set[int]] = staticmethod(set)

    async def owners(self) -> dict[int, str]:
        in_flight = self.handing_over()
        owners = await super().owners()
        while in_flight & self.handing_over():  # noqa: ASYNC110  # polls the owner under test, as a slow read waits
            await asyncio.sleep(0.01)
        return owners


async def test_a_partition_handed_over_during_a_read_of_the_owners_is_not_claimed_again(
    lease_store: AsyncDatabase[dict[str, Any]],
) -> None:
    """The owners read in a round can predate the release of a partition being handed over, and the handover can
    end while the read is in flight. The partition must not then look like one of ours from before a restart
    (claimed again, its worker started twice, then handed over once more): fails if the first replica starts any
    partition twice. (CI saw [0, 1, 2, 3, 4, 5, 6, 6, 7, 7] in the test above.)"""
    first = Replica(lease_store, "a", finish_seconds=0.7, leases=OwnersReadBeforeAHandoverEnds)  # over a round
    leases = first.owner._leases
    assert isinstance(leases, OwnersReadBeforeAHandoverEnds)
    leases.handing_over = lambda: set(first.owner._handovers)
    async with joined_by_a_second_replica(lease_store, first) as second:
        assert sorted(first.started) == list(range(PARTITIONS)), "the first replica claimed a partition it handed over"
        assert first.owner.owned == [0, 1, 2, 3] and sorted(second.started) == [4, 5, 6, 7]


class OneLeaseTakenAfterTheOwnersRead(PartitionLeases):
    """A lease store whose `owners()` answer is one claim out of date: right after the read, replica "b" takes
    partition 7 (our lease on it expired while the answer was on its way, as on a slow MongoDB), so resuming it
    fails."""

    async def owners(self) -> dict[int, str]:
        owners = await super().owners()
        await self._partitions.update_one(
            {"_id": self._id(7)}, {"$set": {"owner": "b", "expires_at": datetime.now(UTC) + timedelta(minutes=1)}}
        )
        return owners


async def test_a_partition_taken_by_another_replica_after_the_owners_read_is_not_planned_as_ours(
    lease_store: AsyncDatabase[dict[str, Any]],
) -> None:
    """A replica's ownership loop restarts while it holds every lease, a second replica is live, and one lease is
    taken by that replica between the read of the owners and its resumption. That partition is neither ours nor
    free: fails if the loop plans to release it (it has no worker: the loop died on a KeyError) or starts it."""
    now = datetime.now(UTC)
    await lease_store["projector_partitions"].insert_many(
        [
            {
                "_id": f"group/{p}",
                "group": "group",
                "partition": p,
                "owner": "a",
                "expires_at": now + timedelta(minutes=1),
            }
            for p in range(PARTITIONS)
        ]
    )
    await lease_store["projector_members"].insert_one(
        {"_id": "group/b", "group": "group", "member": "b", "expires_at": now + timedelta(minutes=1)}
    )
    replica = Replica(lease_store, "a", finish_seconds=0, leases=OneLeaseTakenAfterTheOwnersRead)
    try:

        async def kept_its_share() -> bool:
            assert not replica.task.done(), replica.task.exception()
            return replica.owner.owned == [0, 1, 2, 3]

        await eventually(kept_its_share, what="the restarted replica to keep its fair share of the partitions")
        await asyncio.sleep(2 * LEASE_SECONDS)  # more rounds: nothing changes
        assert not replica.task.done(), replica.task.exception()
        assert replica.owner.owned == [0, 1, 2, 3]
        assert sorted(replica.started) == [0, 1, 2, 3, 4, 5, 6], "partition 7 was started, or one twice"
        assert replica.handovers("released") == 3
    finally:
        await replica.stop()


class OwnersReadAfterTheLeasesExpire(PartitionLeases):
    """A lease store whose every third `owners()` read reaches the server more than a lease TTL after the round's
    renewal (a MongoDB saturated by queries): the read sees this replica's own leases expired, though nobody took
    them and its workers still run."""

    reads = 0

    async def owners(self) -> dict[int, str]:
        self.reads += 1
        if self.reads % 3 == 0:
            await asyncio.sleep(LEASE_SECONDS * 1.2)
        return await super().owners()


async def test_a_replica_whose_owners_read_sees_its_own_leases_expired_does_not_start_their_workers_again(
    lease_store: AsyncDatabase[dict[str, Any]],
) -> None:
    """A round slower than the lease TTL reads the replica's own leases as expired. The partitions whose workers it
    runs are still its own (renewed at the round's start, renewed again by the next one): fails if the plan counts
    them as free and claims them again, which starts a second worker on each partition and orphans the first
    (seen on the dev stack under a closed-loop query load: every partition "claimed" again, no lease lost)."""
    replica = Replica(lease_store, "a", finish_seconds=0, leases=OwnersReadAfterTheLeasesExpire)
    leases = replica.owner._leases
    assert isinstance(leases, OwnersReadAfterTheLeasesExpire)
    try:

        async def slow_reads_seen() -> bool:
            assert not replica.task.done(), replica.task.exception()
            return replica.owner.owned == list(range(PARTITIONS)) and leases.reads >= 7

        await eventually(slow_reads_seen, timeout=30, what="the replica to own every partition through two slow reads")
        assert sorted(replica.started) == list(range(PARTITIONS)), "a partition's worker was started twice"
        assert replica.handovers("claimed") == PARTITIONS and replica.handovers("lost") == 0
    finally:
        await replica.stop()


async def test_a_partition_whose_source_cannot_be_opened_is_claimed_later_and_the_others_keep_their_workers(
    lease_store: AsyncDatabase[dict[str, Any]],
) -> None:
    """JetStream without a quorum cannot open a partition's consumer: that claim is undone (its lease freed for any
    replica), the loop goes on renewing the partitions it runs, and claims the others once their sources open."""
    replica = Replica(lease_store, "a", finish_seconds=0)
    replica.unavailable = {3, 5}
    others = [0, 1, 2, 4, 6, 7]
    try:

        async def refused_again_and_again() -> bool:
            return replica.owner.owned == others and replica.refused >= 4

        await eventually(refused_again_and_again, timeout=30, what="the other partitions claimed, 3 and 5 refused")
        await asyncio.sleep(2 * LEASE_SECONDS)  # past a lease: the workers' partitions were renewed meanwhile
        assert not replica.task.done(), f"the ownership loop ended: {replica.task}"
        assert replica.owner.owned == others
        assert sorted(replica.started) == others, f"workers started more than once: {replica.started}"
        owners = await PartitionLeases(lease_store, "group", "probe", LEASE_SECONDS).owners()
        assert sorted(owners) == others and set(owners.values()) == {"a"}, owners

        replica.unavailable.clear()

        async def owns_all() -> bool:
            return replica.owner.owned == list(range(PARTITIONS))

        await eventually(owns_all, timeout=30, what="partitions 3 and 5 claimed once their sources open")
        assert sorted(replica.started) == list(range(PARTITIONS)), replica.started
    finally:
        await replica.stop()


async def test_a_stopping_replica_frees_every_lease_once_its_batches_finish_together(
    lease_store: AsyncDatabase[dict[str, Any]],
) -> None:
    """On the way out every worker finishes its batch at the same time, not one after the other (eight batches of
    1.5 s would take 12 s), and every lease is freed: fails if the stop is serial or leaves a lease held."""
    replica = Replica(lease_store, "a", finish_seconds=LEASE_SECONDS)

    async def owns_all() -> bool:
        return replica.owner.owned == list(range(PARTITIONS))

    await eventually(owns_all, what="the only replica to own every partition")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await replica.stop()
    assert loop.time() - started < 3 * LEASE_SECONDS
    held = await lease_store["projector_partitions"].count_documents({"owner": {"$ne": None}})
    assert held == 0
    assert await lease_store["projector_members"].count_documents({}) == 0
    assert replica.handovers("released") == PARTITIONS


async def test_a_partition_whose_batch_outlasts_the_handover_is_left_to_expire_not_freed(
    lease_store: AsyncDatabase[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Giving up on a worker whose batch takes too long cancels the worker, not the applier's write of that batch:
    freeing the lease then would let the next owner apply the partition beside it. The lease is left to expire
    (the next owner takes it only then), and a batch of it still waiting to be applied is handed back (its fence
    no longer valid)."""
    monkeypatch.setattr(projector.partitions, "WORKER_STOP_TIMEOUT_SECONDS", 0.3)
    first = Replica(lease_store, "a", finish_seconds=60)  # a batch in hand that never finishes
    async with joined_by_a_second_replica(lease_store, first) as second:
        given_up = sorted(first.cancelled)
        assert given_up == [4, 5, 6, 7], first.cancelled
        assert not any(first.fences[p].valid() for p in given_up)
        assert second.owner.owned == given_up and first.handovers("released") == 0
        assert second.handovers("claimed") == len(given_up)  # once each, when their leases had expired


async def test_the_lease_of_a_partition_given_up_on_stays_held_until_it_expires(
    lease_store: AsyncDatabase[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(projector.partitions, "WORKER_STOP_TIMEOUT_SECONDS", 0.3)
    first = Replica(lease_store, "a", finish_seconds=60)
    probe = PartitionLeases(lease_store, "group", "probe", LEASE_SECONDS)
    second: Replica | None = None
    try:

        async def first_owns_all() -> bool:
            return first.owner.owned == list(range(PARTITIONS))

        await eventually(first_owns_all, what="the only replica to own every partition")
        second = Replica(lease_store, "b", finish_seconds=0)

        async def given_up() -> bool:
            return len(first.cancelled) == PARTITIONS // 2

        await eventually(given_up, timeout=30, what="the first replica to give up on the workers it releases")
        owners = await probe.owners()
        assert all(owners.get(p) == "a" for p in first.cancelled), f"freed while its batch may be written: {owners}"
    finally:
        for replica in (second, first):
            if replica is not None:
                await replica.stop()
