"""Parked streams: a stream whose next event cannot be applied waits, in order, without holding JetStream slots.

A park is the `parked` sub-document of the stream's `checkpoints` document (so the one `find` a batch makes on
the checkpoints also says which of its streams are parked): `{park_id, kind, reason, version, event_type,
schema_version, stream_seq, subject, num_delivered, parked_at}`; `version` is the first version that waits.

Every message of a parked stream (the blocking one and all later ones) is copied into `parked_events` and then
acknowledged, so a parked stream holds no `max_ack_pending` slot however long it waits. The copies serve the
projector's own resumption (a newer build that understands the event, the missing version of a gap arriving);
an operator's `cqrs dead-letters retry` reads the stream from PostgreSQL instead, which is the source of truth.

Races with a resumption are settled by re-reading: a batch that copied a message checks that the park is still
there before acknowledging it (else it naks the message, which is then applied normally); a resumption that
removed the park looks for copies made meanwhile and applies them too. A replica whose batch read the stream's
state just before another parked it applies its events directly: a gap can so be filled without a held copy of the
missing version, and the resumption then goes by the checkpoint having reached the park's version.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from bson.binary import Binary
from pymongo import ASCENDING, IndexModel, ReplaceOne, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from core.mongo_ids import find_in
from projector.checkpoints import COLLECTION as CHECKPOINTS
from projector.mongo_writer import MongoDocument, duplicate_key_indexes
from projector.planning import Delivery, Poison, delivered, stream_seq

PARKED_EVENTS = "parked_events"
# Matches the parked streams' checkpoints through the sparse index on `parked.kind` (every park has a kind). A
# filter on `parked` itself would scan every checkpoint: one per stream, read every resume interval.
PARKED: Final[MongoDocument] = {"parked.kind": {"$exists": True}}
SKIPPED_EVENTS = "skipped_events"


@dataclass(frozen=True, slots=True)
class Park:
    """Why and where a stream waits."""

    stream_id: str
    stream_type: str
    kind: str
    reason: str
    version: int | None
    event_type: str = ""
    schema_version: int | None = None
    stream_seq: int | None = None
    subject: str = ""
    num_delivered: int = 1
    park_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    parked_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_document(self) -> MongoDocument:
        return {
            "park_id": self.park_id,
            "kind": self.kind,
            "reason": self.reason,
            "version": self.version,
            "event_type": self.event_type,
            "schema_version": self.schema_version,
            "stream_seq": self.stream_seq,
            "subject": self.subject,
            "num_delivered": self.num_delivered,
            "parked_at": self.parked_at,
        }

    @classmethod
    def from_checkpoint(cls, doc: Mapping[str, Any]) -> Park:
        p = doc["parked"]
        return cls(
            stream_id=str(doc["_id"]),
            stream_type=str(doc.get("stream_type", "")),
            kind=str(p.get("kind", "")),
            reason=str(p.get("reason", "")),
            version=p.get("version"),
            event_type=str(p.get("event_type") or ""),
            schema_version=p.get("schema_version"),
            stream_seq=p.get("stream_seq"),
            subject=str(p.get("subject") or ""),
            num_delivered=int(p.get("num_delivered") or 1),
            park_id=str(p["park_id"]),
            parked_at=p["parked_at"],
        )


@dataclass(frozen=True, slots=True)
class StreamState:
    """What the `checkpoints` collection says about one stream."""

    checkpoint: int
    park: Park | None


@dataclass(frozen=True, slots=True)
class HeldEvent:
    """A copy of a message of a parked stream (`version` None: its body could not be read)."""

    stream_id: str
    version: int | None
    data: bytes
    subject: str = ""
    headers: Mapping[str, str] | None = None
    stream_seq: int | None = None

    @property
    def key(self) -> str:
        return (
            f"{self.stream_id}/v{self.version:012d}"
            if self.version is not None
            else f"{self.stream_id}/seq{self.stream_seq}"
        )

    def to_document(self, held_at: datetime) -> MongoDocument:
        try:
            data: str | Binary = self.data.decode("utf-8")
        except UnicodeDecodeError:
            data = Binary(self.data)
        return {
            "_id": self.key,
            "stream_id": self.stream_id,
            "version": self.version,
            "data": data,
            "subject": self.subject,
            "headers": dict(self.headers or {}),
            "stream_seq": self.stream_seq,
            "held_at": held_at,
        }

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> HeldEvent:
        data = doc["data"]
        return cls(
            stream_id=str(doc["stream_id"]),
            version=doc.get("version"),
            data=data.encode() if isinstance(data, str) else bytes(data),
            subject=str(doc.get("subject") or ""),
            headers=dict(doc.get("headers") or {}),
            stream_seq=doc.get("stream_seq"),
        )


class ParkStore:
    """Parks, held copies and skip records in MongoDB; every method raises `PyMongoError` when MongoDB fails."""

    def __init__(self, database: AsyncDatabase[MongoDocument]) -> None:
        self._checkpoints = database[CHECKPOINTS]
        self._held = database[PARKED_EVENTS]
        self._skipped = database[SKIPPED_EVENTS]

    async def ensure_indexes(self) -> None:
        await self._checkpoints.create_indexes([IndexModel([("parked.kind", ASCENDING)], sparse=True)])
        await self._held.create_indexes([IndexModel([("stream_id", ASCENDING), ("version", ASCENDING)])])

    async def states(self, stream_ids: Iterable[str]) -> dict[str, StreamState]:
        """Checkpoint version and park of each stream that has a checkpoint document, in one round trip per
        `IDS_PER_QUERY` streams."""
        return {
            str(doc["_id"]): StreamState(
                int(doc.get("version") or 0), Park.from_checkpoint(doc) if doc.get("parked") else None
            )
            async for doc in find_in(self._checkpoints, stream_ids, {"version": 1, "stream_type": 1, "parked": 1})
        }

    async def get(self, stream_id: str) -> Park | None:
        doc = await self._checkpoints.find_one({"_id": stream_id, "parked": {"$exists": True}})
        return None if doc is None else Park.from_checkpoint(doc)

    async def park(self, parks: Sequence[Park]) -> None:
        """Parks these streams; a stream already parked keeps its first park (the earliest blocking event)."""
        if not parks:
            return
        ops = [
            UpdateOne(
                {"_id": p.stream_id, "parked": {"$exists": False}},
                {
                    "$set": {"parked": p.to_document()},
                    "$setOnInsert": {"stream_type": p.stream_type, "version": 0, "position": 0},
                },
                upsert=True,
            )
            for p in parks
        ]
        try:
            await self._checkpoints.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            duplicate_key_indexes(exc)  # already parked (the filter missed, the insert collided): keep that park

    async def hold(self, events: Sequence[HeldEvent]) -> None:
        """Stores copies of messages of parked streams (idempotent: keyed by stream and version)."""
        if not events:
            return
        now = datetime.now(UTC)
        ops = [ReplaceOne({"_id": e.key}, e.to_document(now), upsert=True) for e in events]
        try:
            await self._held.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            retry = [ops[index] for index in duplicate_key_indexes(exc)]  # two replicas holding the same copy
            if retry:
                await self._held.bulk_write(retry, ordered=False)

    async def parked_ids(self, stream_ids: Iterable[str]) -> set[str]:
        parked = find_in(self._checkpoints, stream_ids, {"_id": 1}, query={"parked": {"$exists": True}})
        return {str(doc["_id"]) async for doc in parked}

    async def unpark(self, parks: Mapping[str, str]) -> set[str]:
        """Removes these parks (stream id -> park id), not newer ones; returns the streams left without a park. One
        round trip, two when a park changed meanwhile: then the streams parked anew are told apart by a read (a
        park another resumption removed first counts as removed: the caller's follow-ups are harmless repeats)."""
        if not parks:
            return set()
        ops = [
            UpdateOne({"_id": sid, "parked.park_id": park_id}, {"$unset": {"parked": ""}})
            for sid, park_id in sorted(parks.items())
        ]
        result = await self._checkpoints.bulk_write(ops, ordered=False)
        if result.modified_count == len(ops):
            return set(parks)
        return set(parks) - await self.parked_ids(parks)

    async def update_reason(self, park: Park, reason: str, kind: str, version: int | None) -> None:
        await self._checkpoints.update_one(
            {"_id": park.stream_id, "parked.park_id": park.park_id},
            {"$set": {"parked.reason": reason, "parked.kind": kind, "parked.version": version}},
        )

    async def held(self, stream_id: str) -> list[HeldEvent]:
        """The copies held for a stream, in version order (unreadable ones last)."""
        return (await self.held_of([stream_id])).get(stream_id, [])

    async def held_of(self, stream_ids: Iterable[str]) -> dict[str, list[HeldEvent]]:
        """The copies held for each of these streams (those with none are left out), in version order (unreadable
        ones last); one round trip per `IDS_PER_QUERY` streams."""
        by_stream: dict[str, list[HeldEvent]] = {}
        async for doc in find_in(self._held, stream_ids, field="stream_id"):
            event = HeldEvent.from_document(doc)
            by_stream.setdefault(event.stream_id, []).append(event)
        for events in by_stream.values():
            events.sort(key=lambda e: (e.version is None, e.version or 0))
        return by_stream

    async def count_held(self, stream_id: str) -> int:
        return await self._held.count_documents({"stream_id": stream_id})

    async def drop_resumed(self, through_versions: Mapping[str, int]) -> None:
        """For each resumed stream, deletes its copies up to the version it reached (applied now) and those without
        a version; one round trip, with a condition per distinct version (streams resumed together mostly reach the
        same few), not per stream."""
        if not through_versions:
            return
        by_version: dict[int, list[str]] = {}
        for sid, version in sorted(through_versions.items()):
            by_version.setdefault(version, []).append(sid)
        conditions: list[MongoDocument] = [
            {"stream_id": {"$in": sids}, "version": {"$lte": version}} for version, sids in sorted(by_version.items())
        ]
        conditions.append({"version": None})
        # The streams first, so that the (stream_id, version) index finds the copies without a scan.
        await self._held.delete_many({"stream_id": {"$in": sorted(through_versions)}, "$or": conditions})

    async def parks(self, kinds: Iterable[str] | None = None) -> list[Park]:
        query: MongoDocument = {"parked.kind": {"$in": sorted(kinds)}} if kinds is not None else dict(PARKED)
        cursor = self._checkpoints.find(query).sort([("parked.parked_at", ASCENDING)])
        return [Park.from_checkpoint(doc) async for doc in cursor]

    async def count_by_kind(self) -> dict[str, int]:
        cursor = await self._checkpoints.aggregate(
            [{"$match": PARKED}, {"$group": {"_id": "$parked.kind", "n": {"$sum": 1}}}]
        )
        return {str(row["_id"]): int(row["n"]) async for row in cursor}

    async def record_skip(self, park: Park, version: int, event_type: str, operator_note: str = "") -> None:
        """Remembers that an operator skipped this event (it was never applied to the read model)."""
        await self._skipped.replace_one(
            {"_id": f"{park.stream_id}/v{version:012d}"},
            {
                "stream_id": park.stream_id,
                "stream_type": park.stream_type,
                "version": version,
                "event_type": event_type,
                "kind": park.kind,
                "reason": park.reason,
                "note": operator_note,
                "skipped_at": datetime.now(UTC),
            },
            upsert=True,
        )

    async def skipped(self, stream_id: str) -> list[MongoDocument]:
        return await self._skipped.find({"stream_id": stream_id}).sort([("version", ASCENDING)]).to_list()


def earlier(version: int | None, than: int | None) -> bool:
    """Whether a park at `version` comes before one at `than` (None: an unreadable message, first of all)."""
    if version is None:
        return than is not None
    return than is not None and version < than


def park_of(failure: Poison) -> Park:
    """The park a failure puts its stream in."""
    rec = failure.recorded
    msg = failure.msg
    return Park(
        stream_id=str(failure.stream_id),
        stream_type=failure.stream_type or "",
        kind=failure.kind,
        reason=failure.reason,
        version=failure.version,
        event_type=rec.event_type if rec is not None else "",
        schema_version=rec.schema_version if rec is not None else None,
        stream_seq=stream_seq(msg),
        subject=msg.subject if msg is not None else "",
        num_delivered=delivered(msg),
    )


def held_copy(item: Delivery | Poison) -> HeldEvent | None:
    """The copy kept in `parked_events` of a message (or event) of a parked stream."""
    if isinstance(item, Delivery):
        rec = item.recorded
        msg = item.msg
        data = bytes(msg.data) if msg is not None else rec.to_json()
        subject = msg.subject if msg is not None else ""
        return HeldEvent(rec.stream_id, rec.version, data, subject, msg.headers if msg else None, stream_seq(msg))
    if item.stream_id is None:
        return None
    msg = item.msg
    if msg is not None:
        return HeldEvent(item.stream_id, item.version, bytes(msg.data), msg.subject, msg.headers, stream_seq(msg))
    if item.recorded is not None:
        return HeldEvent(item.stream_id, item.version, item.recorded.to_json())
    return None
