"""The `checkpoints` collection: how far each event stream is reflected in *every* read-model view.

One document per stream: `{_id: stream_id, stream_type, version, position, updated_at}`. The runner writes it last
in a batch, after the documents and everything derived from them (customer fan-out, order statistics), and before
the acks. A consistency token `(stream_id, version)` is reflected once `checkpoints[stream_id].version >= version`,
which is what read-your-writes waits for. `$max` makes the write monotonic: a replayed or late batch never moves a
checkpoint back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from pymongo import UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from core.read_model import CHECKPOINTS_COLLECTION
from projector.mongo_writer import MongoDocument, duplicate_key_indexes

COLLECTION = CHECKPOINTS_COLLECTION  # the read-model contract (core/read_model.py)


@dataclass(frozen=True, slots=True)
class Checkpoint:
    stream_type: str
    version: int
    position: int

    def later(self, other: Checkpoint | None) -> Checkpoint:
        """The later of the two checkpoints of one stream."""
        return self if other is None or self.version >= other.version else other


class CheckpointWriter:
    def __init__(self, database: AsyncDatabase[MongoDocument], collection: str = COLLECTION) -> None:
        self._collection = database[collection]

    async def write(self, checkpoints: Mapping[str, Checkpoint]) -> None:
        """Advances the checkpoints of these streams in one bulk write; raises `PyMongoError` on failure."""
        if not checkpoints:
            return
        now = datetime.now(UTC)
        ops = [
            UpdateOne(
                {"_id": stream_id},
                {
                    "$max": {"version": cp.version, "position": cp.position},
                    "$set": {"stream_type": cp.stream_type, "updated_at": now},
                },
                upsert=True,
            )
            for stream_id, cp in checkpoints.items()
        ]
        try:
            await self._collection.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            # Two replicas upserting the first checkpoint of a stream: the loser repeats it as an update.
            retry = [ops[index] for index in duplicate_key_indexes(exc)]
            if retry:
                await self._collection.bulk_write(retry, ordered=False)
