"""Messages that name no stream at all (an unreadable body on a subject that is not an aggregate's) are recorded
here and terminated on JetStream: there is no stream to park (see `projector.parking` for everything else).

`_id` is the JetStream stream sequence, so recording the same message again (a redelivery after a crash between
the write and the `term`) overwrites instead of duplicating.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from bson.binary import Binary
from nats.aio.msg import Msg
from pymongo import ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase

from projector.planning import delivered, stream_seq

COLLECTION = "dead_letters"
MongoDocument = dict[str, Any]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    stream: str
    stream_seq: int
    subject: str
    reason: str
    data: bytes
    headers: Mapping[str, str] | None
    num_delivered: int

    @classmethod
    def of(cls, msg: Msg, reason: str, stream: str) -> DeadLetter:
        """The dead letter of a JetStream message that names no stream."""
        return cls(
            stream=stream,
            stream_seq=stream_seq(msg) or 0,
            subject=msg.subject,
            reason=reason,
            data=bytes(msg.data),
            headers=msg.headers,
            num_delivered=delivered(msg),
        )

    def to_document(self, received_at: datetime) -> MongoDocument:
        try:
            data: str | Binary = self.data.decode("utf-8")
        except UnicodeDecodeError:
            data = Binary(self.data)
        return {
            "_id": self.stream_seq,
            "stream": self.stream,
            "subject": self.subject,
            "stream_seq": self.stream_seq,
            "reason": self.reason,
            "data": data,
            "headers": dict(self.headers or {}),
            "num_delivered": self.num_delivered,
            "received_at": received_at,
        }


class DeadLetterWriter:
    def __init__(self, database: AsyncDatabase[MongoDocument], collection: str = COLLECTION) -> None:
        self._collection = database[collection]

    async def write(self, letters: Sequence[DeadLetter]) -> None:
        """Records the letters in one bulk write; raises `PyMongoError` if that is not possible right now."""
        if not letters:
            return
        now = datetime.now(UTC)
        ops = [ReplaceOne({"_id": letter.stream_seq}, letter.to_document(now), upsert=True) for letter in letters]
        await self._collection.bulk_write(ops, ordered=False)
