"""Reading the stores in batches, each call with a timeout: PostgreSQL (events, outbox) and the MongoDB read model
(the JetStream stream: `cqrsctl.verify.stream_scanner`)."""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from command_service.event_store import recorded_event_from_row
from core.envelope import RecordedEvent
from core.mongo_ids import find_by_ids
from cqrsctl.verify.model import Document
from cqrsctl.verify.own_sources import held_on_own_sources
from projector.checkpoints import COLLECTION as CHECKPOINTS
from projector.dead_letters import COLLECTION as DEAD_LETTERS
from projector.parking import PARKED

_EVENT_COLUMNS = """position, event_id, stream_type, stream_id, version, event_type, schema_version,
                    payload::text AS payload, metadata::text AS metadata, recorded_at"""


@dataclass(frozen=True, slots=True)
class EventRef:
    """What identifies an event in the stream: enough to match a message against PostgreSQL."""

    position: int
    event_id: uuid.UUID
    stream_id: str
    version: int


@dataclass(frozen=True, slots=True)
class OutboxRow:
    position: int
    stream_id: str
    enqueued_at: datetime
    age_seconds: float


class EventStoreReader:
    """Read-only queries on the event store; keyset pagination on indexed columns only."""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    async def horizon(self) -> int:
        """The highest position committed so far (events above it are not checked against the stream)."""
        value = await self._pool.fetchval("SELECT coalesce(max(position), 0) FROM events", timeout=self._timeout)
        return int(value)

    async def byte_ordered(self) -> bool:
        """Whether the database sorts text by bytes (collation C/POSIX), as MongoDB sorts `_id` strings."""
        collation = await self._pool.fetchval(
            "SELECT datcollate FROM pg_database WHERE datname = current_database()", timeout=self._timeout
        )
        name = str(collation or "")
        return name in {"C", "POSIX"} or name.startswith("C.")

    async def stream_ids(
        self, after: str, limit: int, *, stream_types: Sequence[str], exclude: bool = False, bytewise: bool = False
    ) -> list[str]:
        """The next `limit` stream ids after `after` (the first event of each stream, via the unique index).

        `bytewise`: in byte order whatever the database's collation (then without the index's help), so that the
        batches line up with MongoDB's `_id` order.
        """
        condition = "<> ALL($2::text[])" if exclude else "= ANY($2::text[])"
        key = 'stream_id COLLATE "C"' if bytewise else "stream_id"
        rows = await self._pool.fetch(
            f"""SELECT stream_id FROM events
                 WHERE version = 1 AND {key} > $1 AND stream_type {condition}
                 ORDER BY {key} LIMIT $3""",
            after,
            list(stream_types),
            limit,
            timeout=self._timeout,
        )
        return [str(row["stream_id"]) for row in rows]

    async def events_of(self, stream_ids: Iterable[str]) -> dict[str, list[RecordedEvent]]:
        """Every event of these streams, each stream's in version order."""
        ids = sorted(set(stream_ids))
        if not ids:
            return {}
        rows = await self._pool.fetch(
            f"SELECT {_EVENT_COLUMNS} FROM events WHERE stream_id = ANY($1::text[]) ORDER BY stream_id, version",
            ids,
            timeout=self._timeout,
        )
        out: dict[str, list[RecordedEvent]] = {}
        for row in rows:
            out.setdefault(str(row["stream_id"]), []).append(recorded_event_from_row(row))
        return out

    async def linked(
        self, event_type: str, field: str, *, stream_ids: Iterable[str] = (), values: Iterable[str] = ()
    ) -> dict[str, str]:
        """stream id -> `payload[field]` of the streams' `event_type` events, chosen by stream id or by value.

        By value this scans the events of that type (no index on payload fields): used only for the handful of
        streams re-checked while settling.
        """
        ids, wanted = sorted(set(stream_ids)), sorted(set(values))
        if not ids and not wanted:
            return {}
        column = "stream_id" if ids else "payload->>$2"
        rows = await self._pool.fetch(
            f"""SELECT stream_id, payload->>$2 AS linked FROM events
                 WHERE event_type = $1 AND {column} = ANY($3::text[])""",
            event_type,
            field,
            ids or wanted,
            timeout=self._timeout,
        )
        return {str(row["stream_id"]): str(row["linked"]) for row in rows if row["linked"] is not None}

    async def streams_with_events_on(
        self, stream_type: str, event_types: Iterable[str], days: Iterable[str]
    ) -> set[str]:
        """The streams of `stream_type` with an event of `event_types` recorded on one of these UTC days
        (`YYYY-MM-DD`): the orders a sales report day may count.

        A scan of those event types (no index on `recorded_at`): used only for the report days re-checked while
        settling.
        """
        wanted = sorted({dt.date.fromisoformat(day) for day in days})
        if not wanted:
            return set()
        rows = await self._pool.fetch(
            """SELECT DISTINCT stream_id FROM events
                WHERE stream_type = $1 AND event_type = ANY($2::text[])
                  AND (recorded_at AT TIME ZONE 'UTC')::date = ANY($3::date[])""",
            stream_type,
            sorted(set(event_types)),
            wanted,
            timeout=self._timeout,
        )
        return {str(row["stream_id"]) for row in rows}

    async def existing_streams(self, stream_ids: Iterable[str]) -> set[str]:
        ids = sorted(set(stream_ids))
        if not ids:
            return set()
        rows = await self._pool.fetch(
            "SELECT DISTINCT stream_id FROM events WHERE stream_id = ANY($1::text[])", ids, timeout=self._timeout
        )
        return {str(row["stream_id"]) for row in rows}

    async def refs_at(self, positions: Iterable[int]) -> dict[int, EventRef]:
        wanted = sorted(set(positions))
        if not wanted:
            return {}
        rows = await self._pool.fetch(
            "SELECT position, event_id, stream_id, version FROM events WHERE position = ANY($1::bigint[])",
            wanted,
            timeout=self._timeout,
        )
        return {
            int(r["position"]): EventRef(int(r["position"]), r["event_id"], str(r["stream_id"]), int(r["version"]))
            for r in rows
        }

    async def unpublished(self, positions: Iterable[int]) -> list[tuple[int, str, int, datetime]]:
        """(position, stream id, version, recorded_at) of these events that are not in the outbox."""
        wanted = sorted(set(positions))
        if not wanted:
            return []
        rows = await self._pool.fetch(
            """SELECT e.position, e.stream_id, e.version, e.recorded_at FROM events e
                WHERE e.position = ANY($1::bigint[])
                  AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.position = e.position)
                ORDER BY e.position""",
            wanted,
            timeout=self._timeout,
        )
        return [(int(r["position"]), str(r["stream_id"]), int(r["version"]), r["recorded_at"]) for r in rows]

    async def in_outbox(self, positions: Iterable[int]) -> set[int]:
        wanted = sorted(set(positions))
        if not wanted:
            return set()
        rows = await self._pool.fetch(
            "SELECT position FROM outbox WHERE position = ANY($1::bigint[])", wanted, timeout=self._timeout
        )
        return {int(row["position"]) for row in rows}

    async def stale_outbox(self, older_than_seconds: float, limit: int) -> tuple[int, list[OutboxRow]]:
        """How many outbox rows are older than the threshold, and the oldest `limit` of them."""
        age = "extract(epoch FROM clock_timestamp() - enqueued_at)"
        count = await self._pool.fetchval(
            f"SELECT count(*) FROM outbox WHERE {age} > $1", older_than_seconds, timeout=self._timeout
        )
        rows = await self._pool.fetch(
            f"""SELECT position, stream_id, enqueued_at, {age}::float8 AS age FROM outbox
                 WHERE {age} > $1 ORDER BY position LIMIT $2""",
            older_than_seconds,
            limit,
            timeout=self._timeout,
        )
        return int(count), [
            OutboxRow(int(r["position"]), str(r["stream_id"]), r["enqueued_at"], float(r["age"])) for r in rows
        ]


class SortedReader:
    """Walks a collection in `_id` order with one cursor, handing out the documents up to a given id: the
    merge-join partner of a keyset over PostgreSQL's stream ids in the same (byte) order. One sorted scan costs
    far less than a lookup per batch on the MongoDB-wire test server (where `$in` and `_id` ranges scan)."""

    def __init__(self, collection: AsyncCollection[Document], query: Mapping[str, Any], size: int,
                 projection: Mapping[str, Any] | None = None) -> None:  # fmt: skip
        self._cursor = collection.find({"_id": {"$type": "string"}, **query}, projection).sort("_id", 1)
        self._cursor.batch_size(size)
        self._peek: Document | None = None
        self._done = False

    async def upto(self, last: str) -> dict[str, Document]:
        """The documents with `_id <= last` not handed out before, by id."""
        out: dict[str, Document] = {}
        while True:
            if self._peek is None:
                if self._done:
                    break
                try:
                    self._peek = await anext(self._cursor)
                except StopAsyncIteration:
                    self._done = True
                    break
            doc_id = str(self._peek["_id"])
            if doc_id > last:
                break
            out[doc_id] = self._peek
            self._peek = None
        return out

    async def close(self) -> None:
        await self._cursor.close()


def _ignore_nothing(_collection: str, _path: str) -> bool:
    return False


class ReadModelReader:
    """Reads documents and checkpoints by id, and walks a collection's ids in `_id` order."""

    def __init__(self, database: AsyncDatabase[Document]) -> None:
        self._db = database

    async def held_on_own_sources(self, view: str, ids: Sequence[str]) -> set[str]:
        """The documents of a derived view that equal this release's fold of their sources, read right after them
        (`cqrsctl.verify.own_sources`)."""
        return await held_on_own_sources(view, self._db, ids, _ignore_nothing)

    def sorted_reader(
        self, collection: str, size: int, query: Mapping[str, Any] | None = None,
        projection: Mapping[str, Any] | None = None,
    ) -> SortedReader:  # fmt: skip
        return SortedReader(self._db[collection], query or {}, size, projection)

    async def documents(
        self, collection: str, ids: Iterable[str], projection: Mapping[str, Any] | None = None
    ) -> dict[str, Document]:
        """The documents with these ids, in one round trip (usually).

        A batch's ids are neighbours in `_id` order, so one index range scan (`$gte` first, `$lte` last) fetches
        them; that is several times faster than `$in` on the MongoDB-wire test server and no slower on MongoDB.
        The range may hold other documents (dropped here); when it holds too many (ids that are not neighbours),
        the rest is fetched with `$in`.
        """
        wanted = sorted(set(ids))
        if not wanted:
            return {}
        limit = 2 * len(wanted) + 64
        cursor = (
            self._db[collection]
            .find({"_id": {"$gte": wanted[0], "$lte": wanted[-1]}}, projection)
            .sort("_id", 1)
            .limit(limit)
            .batch_size(limit)
        )
        found = [doc async for doc in cursor]
        keep = set(wanted)
        out = {str(doc["_id"]): doc for doc in found if doc["_id"] in keep}
        if len(found) == limit:
            rest = [i for i in wanted if i not in out and (not found or i > str(found[-1]["_id"]))]
            if rest:
                out.update(await find_by_ids(self._db[collection], rest, projection))
        return out

    async def checkpoints(self, ids: Iterable[str]) -> dict[str, int]:
        docs = await self.documents(CHECKPOINTS, ids, {"version": 1})
        return {stream_id: int(doc.get("version", 0)) for stream_id, doc in docs.items()}

    async def id_batches(self, collection: str, size: int) -> AsyncIterator[list[str]]:
        """Every string `_id` of the collection, `size` at a time, from one cursor (the server sends a batch per
        round trip). Unsorted: keyset pages (`$gt` + sort + limit) cost a sort of the rest of the collection per
        page on the MongoDB-wire test server."""
        cursor = self._db[collection].find({"_id": {"$type": "string"}}, {"_id": 1}).batch_size(size)
        batch: list[str] = []
        async for doc in cursor:
            batch.append(str(doc["_id"]))
            if len(batch) >= size:
                yield batch
                batch = []
        if batch:
            yield batch

    async def dead_letters(self, limit: int) -> tuple[int, list[Document]]:
        collection = self._db[DEAD_LETTERS]
        count = await collection.count_documents({})
        if not count:
            return 0, []
        cursor = collection.find({}, {"data": 0, "headers": 0}).sort("_id", 1).limit(limit)
        return count, [doc async for doc in cursor]

    async def parked_streams(self, limit: int) -> tuple[int, list[Document]]:
        """Checkpoints carrying a `parked` sub-document: streams the projector holds behind an event it cannot
        apply (newer projectors park streams instead of dead-lettering single messages)."""
        collection = self._db[CHECKPOINTS]
        count = await collection.count_documents(PARKED)
        if not count:
            return 0, []
        cursor = collection.find(PARKED, {"parked": 1, "version": 1}).sort("_id", 1).limit(limit)
        return count, [doc async for doc in cursor]
