"""Partition ownership of one projector replica: hold a fair share of the stream's partitions, consume each one
through its own worker, and hand partitions over cleanly when replicas join or leave.

Every `interval` the owner renews its leases and its member heartbeat, then follows `projector.ownership`'s plan:

* a partition to release: its worker is told to stop, finishes (writes and settles) the batch in hand, its pull
  subscription is closed, and only then is the lease freed: the next owner starts at the acknowledged position,
  so nothing is applied twice out of order and nothing is skipped;
* a partition to claim: the lease is taken (an atomic conditional upsert), then a worker starts on its durable
  consumer;
* a lease found taken by another replica (ours expired while this process was frozen): its worker stops.

A handover runs beside the loop, not in it: a batch in hand can take seconds on a busy MongoDB, and a loop that
waited for it would stop renewing the leases and the heartbeat of the partitions it keeps. They would expire, the
other replicas would take them and see this one as gone, and the group would hand partitions back and forth
instead of consuming. Until its lease is freed, a partition being handed over stays ours: renewed (its worker may
still be applying), neither claimed again nor counted in our share.

A worker applies a batch only while its `Fence` holds (the lease is unexpired by our clock, with a margin), so a
replica cut off from MongoDB stops consuming before another can take its partitions. The version guard keeps any
residual overlap harmless. A crashed replica's leases simply expire after the TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pymongo.errors import PyMongoError

from projector.leases import FREE, PartitionLeases
from projector.metrics import ProjectorMetrics
from projector.ownership import plan_ownership

log = logging.getLogger(__name__)

# Releasing a partition waits this long for its worker's batch in hand; then the worker is cancelled (its
# unsettled messages are redelivered after ack_wait, harmlessly).
WORKER_STOP_TIMEOUT_SECONDS = 10.0
# Freeing a lease, and leaving the group on the way out, are best effort: a lease not freed expires after its TTL.
RELEASE_TIMEOUT_SECONDS = 2.0
# What the ownership loop fails with if its plan ever claims a partition whose worker runs (a second worker would
# orphan the first); the fault scenarios look for it in the projectors' logs.
CLAIMED_WHILE_ITS_WORKER_RUNS = "is claimed again while its worker runs"
# In the ownership plan, the owner of a partition being handed over: neither ours to keep nor free to claim.
HANDING_OVER = "(handing over)"
# In the ownership plan, the owner of a partition the owners read called ours but whose lease another replica took
# before we could resume it (ours expired while the read was on its way): not ours, and not free.
TAKEN_SINCE_THE_READ = "(taken since the read)"


@dataclass
class Fence:
    """A worker's right to apply batches of its partition: until `expires_at - margin`, and until released."""

    margin: timedelta
    expires_at: datetime = FREE
    released: bool = False

    def holds(self) -> bool:
        """May the worker fetch another batch?"""
        return not self.released and self.valid()

    def valid(self) -> bool:
        """May the worker apply a batch it fetched? Released or not: the lease is freed only after it is done."""
        return datetime.now(UTC) < self.expires_at - self.margin


@dataclass
class Worker:
    partition: int
    fence: Fence
    task: asyncio.Task[None]
    close: Callable[[], Awaitable[None]]


@dataclass
class Handover:
    """A worker being stopped beside the loop; `frees_lease`: a release (the lease is ours until freed), not a
    lease already lost to another replica."""

    worker: Worker
    frees_lease: bool
    task: asyncio.Task[None] | None = None
    lease_expires: datetime = FREE  # when a lease left to expire (see `_stop_worker`) does


class WorkerNotStarted(Exception):
    """What a `StartWorker` raises when the partition's source cannot be opened now (JetStream without a quorum):
    the claim is undone, and the partition claimed again in a later round."""


# Starts consuming a partition under a fence: returns the running task and how to close the partition's source.
StartWorker = Callable[[int, Fence], Awaitable[tuple[asyncio.Task[None], Callable[[], Awaitable[None]]]]]


class PartitionOwner:
    """Keeps this replica's fair share of `partitions`, one worker per owned partition, until `stopping` is set."""

    def __init__(
        self,
        leases: PartitionLeases,
        partitions: int,
        start_worker: StartWorker,
        metrics: ProjectorMetrics,
        stopping: asyncio.Event,
        *,
        lease_seconds: float,
        mongo_ready: Callable[[], Awaitable[bool]],
        mongo_failed: Callable[[BaseException], None],
        every_round: Callable[[], Awaitable[None]],
    ) -> None:
        self._leases = leases
        self._partitions = partitions
        self._start_worker = start_worker
        self._metrics = metrics
        self._stopping = stopping
        self._interval = lease_seconds / 3
        self._margin = timedelta(seconds=lease_seconds / 5)
        self._mongo_ready = mongo_ready
        self._mongo_failed = mongo_failed
        self._every_round = every_round
        self.workers: dict[int, Worker] = {}
        # Partitions whose worker is stopping (see the module docstring).
        self._handovers: dict[int, Handover] = {}
        self._handover_failure: BaseException | None = None

    @property
    def owned(self) -> list[int]:
        return sorted(self.workers)

    async def run(self) -> None:
        """The ownership loop; on the way out (stop, or an error for the supervisor) every worker finishes its batch
        and every lease is freed."""
        loop = asyncio.get_running_loop()
        indexed = False
        try:
            while not self._stopping.is_set():
                if not await self._mongo_ready():  # backs off while MongoDB is down
                    continue
                started = loop.time()
                try:
                    if not indexed:
                        await self._leases.ensure_indexes()
                        indexed = True
                    await self._rebalance()
                except PyMongoError as exc:
                    # Workers keep their partitions until their fences expire; the next round renews or loses them.
                    self._mongo_failed(exc)
                except WorkerNotStarted as exc:
                    # The round stops claiming (each claim would wait as long for JetStream); the workers running
                    # keep their partitions, renewed as usual.
                    log.warning("%s; claimed again in a later round", exc)
                self._metrics.partitions_owned.set(len(self.workers))
                self._raise_if_a_worker_failed()
                # Rounds start every interval, however long the last one took (a slow MongoDB must not space out
                # the renewals).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), timeout=started + self._interval - loop.time())
        finally:
            await self._give_up_all()

    async def _rebalance(self) -> None:
        leases = self._leases
        # The leases first: they are what expires.
        leaving = [h for h in self._handovers.values() if h.frees_lease]
        held, expires = await leases.renew([*self.workers, *(h.worker.partition for h in leaving)])
        for handover in leaving:
            if handover.worker.partition not in held:
                continue
            if handover.frees_lease:
                handover.worker.fence.expires_at = expires  # its batch in hand stays fenced until the lease is freed
            else:  # its worker was given up on while this renewal was on its way: the lease now lasts until then
                handover.lease_expires = max(handover.lease_expires, expires)
        for partition in list(self.workers):
            if partition in held:
                self.workers[partition].fence.expires_at = expires
            else:
                log.warning("partition %d: lease lost to another replica; stopping its worker", partition)
                self._hand_over(partition, free_lease=False)
                self._metrics.partition_handovers.labels("lost").inc()
        members = await leases.heartbeat()
        await self._every_round()  # a replica with no partition still follows the active generation
        # A handover can end (its lease freed) while the owners are read, and the answer predate the release: such
        # a partition still reads as ours. Taken as one of ours from before a restart it would be claimed again
        # (its worker started twice, then handed over once more); in the plan, released a second time.
        handing_over = set(self._handovers)
        owners = await leases.owners()
        handing_over |= set(self._handovers)
        taken: set[int] = set()
        for partition, owner in owners.items():  # ours from before a restart of this loop: resume them
            if owner == leases.member and partition not in self.workers and partition not in handing_over:
                if not await self._claim(partition):
                    taken.add(partition)  # planned as ours it could be released, and it has no worker to stop
        in_plan = {
            p: HANDING_OVER if p in handing_over else TAKEN_SINCE_THE_READ if p in taken else owner
            for p, owner in owners.items()
        }
        # A partition with a worker is ours: its lease was renewed at the round's start, and a read that reached
        # MongoDB more than a TTL later (a saturated server) no longer lists it. Planned as free it would be
        # claimed again and get a second worker, the first orphaned. One the read shows taken by another replica
        # stays theirs: the next renewal finds it lost and stops its worker.
        for partition in self.workers:
            in_plan.setdefault(partition, leases.member)
        plan = plan_ownership(self._partitions, members, leases.member, in_plan)
        for partition in plan.release:
            self._hand_over(partition, free_lease=True, members=len(members))
        # In random order: a round stops at the first claim JetStream refuses (`WorkerNotStarted`), and in a fixed
        # order one partition that keeps being refused would keep every one after it unclaimed.
        for partition in random.sample(plan.claim, len(plan.claim)):
            if await self._claim(partition):
                log.info("partition %d claimed (%d live replicas)", partition, len(members))

    async def _claim(self, partition: int) -> bool:
        if partition in self.workers:  # a bug in the plan: a second worker would orphan the first
            raise RuntimeError(f"partition {partition} {CLAIMED_WHILE_ITS_WORKER_RUNS}")
        expires = await self._leases.claim(partition)
        if expires is None:
            return False
        fence = Fence(self._margin, expires)
        try:
            task, close = await self._start_worker(partition, fence)
        except BaseException:
            with contextlib.suppress(PyMongoError):
                await self._leases.release(partition)
            raise
        self.workers[partition] = Worker(partition, fence, task, close)
        self._metrics.partition_handovers.labels("claimed").inc()
        return True

    def _hand_over(self, partition: int, *, free_lease: bool, members: int = 0) -> None:
        """Stops the partition's worker beside the loop: it finishes its batch in hand, its source is closed, then
        (`free_lease`: a release, not a lease already lost) the lease is freed for the next owner."""
        worker = self.workers.pop(partition)
        worker.fence.released = True
        self._metrics.partitions_owned.set(len(self.workers))
        handover = self._handovers[partition] = Handover(worker, free_lease)
        handover.task = asyncio.create_task(
            self._handed_over(handover, members), name=f"projector partition {partition} handover"
        )
        handover.task.add_done_callback(self._handover_done)

    async def _handed_over(self, handover: Handover, members: int) -> None:
        worker, free_lease = handover.worker, handover.frees_lease
        if not await self._stop_worker(handover):
            if free_lease:
                log.warning("partition %d: its lease is left to expire, not freed", worker.partition)
                if not self._stopping.is_set():  # the partition stays out of our plan until then
                    await asyncio.sleep((handover.lease_expires - datetime.now(UTC)).total_seconds())
            return
        if not free_lease:
            return
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                await self._leases.release(worker.partition)
        except (PyMongoError, TimeoutError) as exc:
            log.warning(
                "partition %d: its lease could not be freed (%s); the next owner takes it once it expires",
                worker.partition,
                exc,
            )
            return
        self._metrics.partition_handovers.labels("released").inc()
        if members:
            log.info("partition %d released for a rebalance (%d live replicas)", worker.partition, members)

    def _handover_done(self, task: asyncio.Task[None]) -> None:
        for partition, handover in list(self._handovers.items()):
            if handover.task is task:
                del self._handovers[partition]
        if not task.cancelled() and task.exception() is not None:
            self._handover_failure = task.exception()

    async def _stop_worker(self, handover: Handover) -> bool:
        """Lets the worker finish its batch in hand (bounded), then closes its source; False when it had to be
        cancelled."""
        worker = handover.worker
        finished = True
        try:
            await asyncio.wait_for(asyncio.shield(worker.task), timeout=WORKER_STOP_TIMEOUT_SECONDS)
        except TimeoutError:
            log.warning(
                "partition %d: batch not finished within %.0fs; cancelling it",
                worker.partition,
                WORKER_STOP_TIMEOUT_SECONDS,
            )
            finished = False
            # Cancelling the worker does not stop the applier's write of a batch it already took: the lease is left
            # to expire instead of being freed (no longer renewed, and the partition not ours to claim until then),
            # so no other replica applies the partition beside that write; and a batch of it still waiting in the
            # applier is handed back, not applied (the applier checks the fence first).
            handover.frees_lease = False
            handover.lease_expires = worker.fence.expires_at
            worker.fence.expires_at = FREE
        except Exception:
            pass  # its failure is the supervisor's business when the loop raises it; here it is stopping anyway
        worker.task.cancel()
        with contextlib.suppress(BaseException):
            await worker.task
        await worker.close()
        return finished

    def _raise_if_a_worker_failed(self) -> None:
        if self._handover_failure is not None:
            raise RuntimeError("a partition handover failed") from self._handover_failure
        for worker in self.workers.values():
            if worker.task.done() and not worker.task.cancelled() and worker.task.exception() is not None:
                raise RuntimeError(f"partition {worker.partition}'s worker failed") from worker.task.exception()

    async def _give_up_all(self) -> None:
        """Every worker finishes its batch (all at once, not one after the other), every lease of ours is freed, and
        this member leaves the group."""
        for partition in list(self.workers):
            self._hand_over(partition, free_lease=True)
        await asyncio.gather(*(h.task for h in self._handovers.values() if h.task), return_exceptions=True)
        self._metrics.partitions_owned.set(0)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                await self._leases.leave()
