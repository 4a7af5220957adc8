"""Partition leases and member heartbeats of a projector group, in MongoDB (the store the projector already uses).

One document per partition, `projector_partitions/{_id: "<group>/<k>", owner, expires_at}`, and one per live
replica, `projector_members/{_id: "<group>/<member>", expires_at}`, both in the base database (not a read-model
generation: ownership outlives cutovers). A claim is one conditional upsert: it matches only a free, expired or
already-own lease, and when another replica holds it the upsert's insert fails on the `_id` (DuplicateKeyError),
so two replicas never both win. Times are the replicas' clocks (UTC): they must agree to well within the TTL,
which NTP-synchronised nodes do.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

PARTITIONS = "projector_partitions"
MEMBERS = "projector_members"
FREE = datetime.fromtimestamp(0, UTC)


class PartitionLeases:
    """The lease store as one replica (`member`) of the group sees and changes it."""

    def __init__(self, base: AsyncDatabase[dict[str, Any]], group: str, member: str, ttl_seconds: float) -> None:
        self._partitions = base[PARTITIONS]
        self._members = base[MEMBERS]
        self.group = group
        self.member = member
        self._ttl = timedelta(seconds=ttl_seconds)

    def _id(self, partition: int) -> str:
        return f"{self.group}/{partition}"

    async def heartbeat(self) -> list[str]:
        """Marks this member alive for one TTL; returns every live member of the group (itself included)."""
        now = datetime.now(UTC)
        await self._members.update_one(
            {"_id": f"{self.group}/{self.member}"},
            {"$set": {"group": self.group, "member": self.member, "expires_at": now + self._ttl}},
            upsert=True,
        )
        docs = await self._members.find({"group": self.group, "expires_at": {"$gt": now}}, {"member": 1}).to_list()
        return sorted({str(d["member"]) for d in docs} | {self.member})

    async def owners(self) -> dict[int, str]:
        """Partition -> owner of every unexpired lease of the group."""
        now = datetime.now(UTC)
        docs = await self._partitions.find(
            {"group": self.group, "owner": {"$ne": None}, "expires_at": {"$gt": now}}, {"partition": 1, "owner": 1}
        ).to_list()
        return {int(d["partition"]): str(d["owner"]) for d in docs}

    async def claim(self, partition: int) -> datetime | None:
        """Takes the lease if it is free, expired or already ours; returns when it expires (None: held by another)."""
        now = datetime.now(UTC)
        expires = now + self._ttl
        try:
            await self._partitions.update_one(
                {
                    "_id": self._id(partition),
                    "$or": [{"owner": None}, {"owner": self.member}, {"expires_at": {"$lte": now}}],
                },
                {"$set": {"group": self.group, "partition": partition, "owner": self.member, "expires_at": expires}},
                upsert=True,
            )
        except DuplicateKeyError:
            return None  # another member holds an unexpired lease
        return expires

    async def renew(self, partitions: list[int]) -> tuple[set[int], datetime]:
        """Extends the leases still ours; returns those partitions and their new expiry (measured from before the
        write, so our view of the expiry is never later than the store's).

        A lease of ours that expired while MongoDB was unreachable is renewed too if nobody claimed it meanwhile:
        its owner is still us, so no other replica consumed the partition (our own batches stopped at expiry).
        """
        now = datetime.now(UTC)
        expires = now + self._ttl
        ids = [self._id(p) for p in partitions]
        if not ids:
            return set(), expires
        await self._partitions.update_many(
            {"_id": {"$in": ids}, "owner": self.member}, {"$set": {"expires_at": expires}}
        )
        held = await self._partitions.find({"_id": {"$in": ids}, "owner": self.member}, {"partition": 1}).to_list()
        return {int(d["partition"]) for d in held}, expires

    async def release(self, partition: int) -> None:
        """Frees our lease at once (after the partition's last batch is settled), for the next owner to claim."""
        await self._partitions.update_one(
            {"_id": self._id(partition), "owner": self.member}, {"$set": {"owner": None, "expires_at": FREE}}
        )

    async def leave(self) -> None:
        """This member is gone: the others rebalance without waiting for its heartbeat to expire."""
        await self._members.delete_one({"_id": f"{self.group}/{self.member}"})

    async def ensure_indexes(self) -> None:
        await self._partitions.create_index([("group", 1), ("expires_at", 1)])
        await self._members.create_index([("group", 1), ("expires_at", 1)])
