"""Forgets the sales facts' tags that no batch can need any more, so that shards stay small through the day.

A fact's tag (`<order id>:<kind>` in its shard's `counted` list, `core.projections.sales`) keeps a redelivered or
retried batch from counting the fact twice. A batch counts only the facts of events above its orders' checkpoints
as it read them, so once an order's checkpoint covers its document (every fact of the document counted, views
complete) no batch reading that checkpoint presents those facts again. What remains is a batch that read an older
checkpoint and is still running: the sales writer refuses to count on checkpoints read more than
`MAX_BATCH_AGE_SECONDS` ago, and a tag is forgotten only by a sweep at least `grace` seconds after the one that
found it covered (grace `MIN_TAG_GRACE_SECONDS`, twice that age).

Each tag is looked up (its order's checkpoint and document version: two reads by id, about 1.5 ms of the local
MongoDB-wire server's CPU per tag) by the first sweep that sees it, and again only while its checkpoint is behind.
Every projector replica sweeps (every `CQRS_PROJECTOR_SALES_TAG_SWEEP_SECONDS`); what they forget is the same, so
replicas only repeat each other's reads. A replica that restarts forgets what it found and waits a full grace
again. Tags of orders whose document is ahead of their checkpoint (a batch in flight, a crash before the
checkpoint, a parked stream) stay until the checkpoint catches up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pymongo.asynchronous.database import AsyncDatabase

from core.projections.orders import COLLECTION as ORDERS_COLLECTION
from core.projections.sales import COUNTED_FIELD, SHARDS_COLLECTION, order_of_tag
from projector.mongo_writer import MongoDocument
from projector.parking import ParkStore
from projector.sales_views import MIN_TAG_GRACE_SECONDS

# Bounds one sweep's work: ids per read, with a pause after each (the sweep is background work: the batches'
# requests get the server between its reads), and tags checked (a longer backlog, e.g. shards from before this
# sweeper, takes more sweeps).
_IDS_PER_READ = 50
_PAUSE_SECONDS = 0.02
MAX_CHECKS_PER_SWEEP = 5_000
MAX_HELD_PER_SWEEP = 100_000  # tags read (memory); shards from before this sweeper may hold far more
# Every this many sweeps, the shards of every day (the others: today's and yesterday's); at the default interval
# (30 s) every 10 minutes, longer than the grace, so what a full sweep finds the next one forgets.
FULL_SCAN_EVERY = 20
_FORGET_ATTEMPTS = 3


@dataclass(frozen=True, slots=True)
class Sweep:
    held: int  # tags in the shards at this sweep
    checked: int  # of them, looked up (the first sweep that sees a tag, until its checkpoint covers it)
    forgotten: int  # removed by this sweep (found covered by a sweep at least `grace` earlier)


class SalesTagSweeper:
    """`sweep()` forgets the tags that a sweep at least `grace` seconds earlier found covered by their orders'
    checkpoints. Raises `PyMongoError` if MongoDB fails (nothing is forgotten that was not seen covered then)."""

    def __init__(
        self,
        database: AsyncDatabase[MongoDocument],
        *,
        grace: float = MIN_TAG_GRACE_SECONDS,
        full_scan_every: int = FULL_SCAN_EVERY,
    ) -> None:
        """`grace` below `MIN_TAG_GRACE_SECONDS` only where no batch runs meanwhile (tests, benchmarks)."""
        self._shards = database[SHARDS_COLLECTION]
        self._orders = database[ORDERS_COLLECTION]
        self._parks = ParkStore(database)
        self._grace = grace
        # (shard id, tag) -> when a sweep found it covered (coverage is for good: checkpoints only move forward)
        self._covered: dict[tuple[str, str], float] = {}
        self._sweeps = 0
        self._full_scan_every = full_scan_every

    async def sweep(self) -> Sweep:
        """Today's and yesterday's shards (where facts land, by the events' recorded times); every
        `FULL_SCAN_EVERY`-th sweep, the first included, every shard (facts of older days come with replays and
        resumed streams)."""
        query: dict[str, object] = {}
        if self._sweeps % self._full_scan_every:
            query["day"] = {"$gte": (datetime.now(UTC) - timedelta(days=1)).date().isoformat()}
        self._sweeps += 1
        held: list[tuple[str, str]] = []
        read: set[str] = set()
        cursor = self._shards.find(query, {COUNTED_FIELD: 1})
        try:
            async for shard in cursor:
                read.add(str(shard["_id"]))
                held.extend((str(shard["_id"]), str(tag)) for tag in shard.get(COUNTED_FIELD) or ())
                if len(held) >= MAX_HELD_PER_SWEEP:
                    break  # the next sweeps read the others
        finally:
            await cursor.close()
        unknown = [item for item in held if item not in self._covered][:MAX_CHECKS_PER_SWEEP]
        covered = await self._covered_orders({order_of_tag(tag) for _, tag in unknown})
        found_at = time.monotonic()  # after the checkpoints were read: the grace counts from no earlier
        still_held = set(held)
        # Due: found covered by an earlier sweep, at least `grace` ago; the others wait.
        due = {item for item, at in self._covered.items() if item in still_held and found_at - at >= self._grace}
        forgotten = await self._forget(due)
        # What a shard this sweep read no longer holds is gone (forgotten here or by another replica).
        self._covered = {
            item: at
            for item, at in self._covered.items()
            if item not in due and (item in still_held or item[0] not in read)
        }
        self._covered.update((item, found_at) for item in unknown if order_of_tag(item[1]) in covered)
        return Sweep(len(held), len(unknown), forgotten)

    async def _covered_orders(self, order_ids: Iterable[str]) -> set[str]:
        """The orders whose checkpoint covers their document's version."""
        ids = sorted(order_ids)
        covered: set[str] = set()
        for start in range(0, len(ids), _IDS_PER_READ):
            chunk = ids[start : start + _IDS_PER_READ]
            states = await self._parks.states(chunk)
            async for doc in self._orders.find({"_id": {"$in": chunk}}, {"version": 1}):
                state = states.get(str(doc["_id"]))
                if state is not None and state.checkpoint >= int(doc.get("version") or 0) > 0:
                    covered.add(str(doc["_id"]))
            await asyncio.sleep(_PAUSE_SECONDS)
        return covered

    async def _forget(self, items: Iterable[tuple[str, str]]) -> int:
        """Removes the tags from their shards: each shard's list is read and set to what remains, guarded by the
        list read (a fact counted meanwhile makes the write miss, and the shard is read again). A `$pull` of many
        tags costs the MongoDB-wire server tags x list length."""
        by_shard: dict[str, set[str]] = {}
        for shard, tag in items:
            by_shard.setdefault(shard, set()).add(tag)
        forgotten = 0
        for shard_id, tags in by_shard.items():
            for _ in range(_FORGET_ATTEMPTS):
                stored = await self._shards.find_one({"_id": shard_id}, {COUNTED_FIELD: 1})
                current = [str(tag) for tag in stored.get(COUNTED_FIELD) or ()] if stored is not None else []
                remaining = [tag for tag in current if tag not in tags]
                if len(remaining) == len(current):
                    break
                result = await self._shards.update_one(
                    {"_id": shard_id, COUNTED_FIELD: current}, {"$set": {COUNTED_FIELD: remaining}}
                )
                if result.modified_count:
                    forgotten += len(current) - len(remaining)
                    break
        return forgotten
