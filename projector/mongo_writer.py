"""Loads and writes read-model documents in batches, guarded by the document version.

The local MongoDB-wire server does about 1,400 bulk upserts/s but only 450 single updates/s, so a batch of events
becomes one `find` and one unordered `bulk_write`. Each write is conditional on the version that was read:

* a new document (none was read, or one without `version`: a customer document holding only order statistics) is
  `UpdateOne({_id, version: {$exists: false}}, upsert=True)`: if someone else created the versioned document
  meanwhile, the filter misses, the upsert tries to insert the same `_id` and fails with a duplicate key;
* an existing one is `UpdateOne({_id, version: old}, upsert=True)`: if the document moved to another version
  meanwhile, the same happens.

Either way a lost race surfaces as a per-operation duplicate-key error, never as a silent overwrite.

The update `$set`s the projection's own fields only. The `foreign_fields` another writer keeps current (an
order's customer name, a customer's order statistics) go into `$setOnInsert`: written when the document is
created, never overwritten afterwards, so neither writer can clobber the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, IndexModel, UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from core.mongo_ids import find_by_ids
from core.projections import Document, Projection

DUPLICATE_KEY = 11000
MongoDocument = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Change:
    """The new document of one entity, to be written only if the stored one is still at `expected_version`."""

    doc_id: str
    expected_version: int | None  # None: no document existed when it was read; 0: one without `version`
    new_doc: Document


@dataclass(slots=True)
class WriteOutcome:
    """Ids whose write did not happen: `conflicts` lost a race (re-evaluate soon), `failed` hit another error."""

    conflicts: set[str] = field(default_factory=set)
    failed: dict[str, str] = field(default_factory=dict)


class ReadModelWriter:
    """Version-guarded batch access to one projection's collection."""

    def __init__(self, database: AsyncDatabase[MongoDocument], projection: Projection) -> None:
        self._database = database
        self._collection = database[projection.collection]
        self._projection = projection

    @property
    def collection(self) -> AsyncCollection[MongoDocument]:
        return self._collection

    async def ensure_indexes(self) -> None:
        """Creates the projection's indexes; idempotent (an existing identical index is left alone)."""
        models = [
            IndexModel([(key, ASCENDING if order >= 0 else -1) for key, order in keys])
            for keys in self._projection.indexes
        ]
        if models:
            await self._collection.create_indexes(models)

    async def ping(self) -> None:
        await self._database.command("ping")

    async def load(self, doc_ids: Iterable[str]) -> dict[str, Document]:
        """The current documents of `doc_ids` (absent ids have no document), in one round trip per
        `IDS_PER_QUERY` ids."""
        return await find_by_ids(self._collection, doc_ids)

    async def skip_to(self, doc_id: str, expected: int, version: int, position: int, at: datetime) -> bool:
        """Moves a document from `expected` to `version` without changing its content (an operator's skip)."""
        result = await self._collection.update_one(
            {"_id": doc_id, "version": expected}, {"$set": {"version": version, "position": position, "updated_at": at}}
        )
        return result.modified_count == 1

    async def write(self, changes: Sequence[Change]) -> WriteOutcome:
        """Writes all changes in one unordered bulk write.

        Per-document races and errors come back in the outcome; transient errors (the server is unreachable, a
        write concern failed) raise `pymongo.errors.PyMongoError` and nothing may be assumed written.
        """
        outcome = WriteOutcome()
        if not changes:
            return outcome
        ops = [write_operation(self._projection, change) for change in changes]
        try:
            await self._collection.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            details = exc.details
            if details.get("writeConcernErrors"):
                raise
            for error in details.get("writeErrors", []):
                doc_id = changes[int(error["index"])].doc_id
                if error.get("code") == DUPLICATE_KEY:
                    outcome.conflicts.add(doc_id)
                else:
                    outcome.failed[doc_id] = f"code {error.get('code')}: {error.get('errmsg', '')}"
        return outcome


def duplicate_key_indexes(exc: BulkWriteError) -> list[int]:
    """The indexes of the operations that failed with a duplicate key; re-raises `exc` for any other failure.

    An upsert racing another upsert of the same `_id` loses with a duplicate key; repeating it (as an update of
    the document that now exists) is the right answer for writes that are idempotent or guarded by their filter.
    """
    details = exc.details
    errors = details.get("writeErrors", [])
    if details.get("writeConcernErrors") or any(error.get("code") != DUPLICATE_KEY for error in errors):
        raise exc
    return [int(error["index"]) for error in errors]


def write_operation(projection: Projection, change: Change) -> UpdateOne:
    """The version-guarded update of one change (see the module docstring)."""
    foreign = projection.foreign_fields
    own = {k: v for k, v in change.new_doc.items() if k != "_id" and k not in foreign}
    if not change.expected_version:
        on_insert = {k: v for k, v in change.new_doc.items() if k in foreign}
        update: MongoDocument = {"$set": own}
        if on_insert:
            update["$setOnInsert"] = on_insert
        return UpdateOne({"_id": change.doc_id, "version": {"$exists": False}}, update, upsert=True)
    return UpdateOne({"_id": change.doc_id, "version": change.expected_version}, {"$set": own}, upsert=True)


def duplicate_indexes(exc: BulkWriteError) -> list[int]:
    """The indexes of the operations that failed with a duplicate key (an upsert that lost to a stored `_id`)."""
    return [int(e["index"]) for e in exc.details.get("writeErrors", []) if e.get("code") == DUPLICATE_KEY]


def refused_indexes(exc: BulkWriteError, failed: set[str] | None, *, retry_duplicates: bool = False) -> list[int]:
    """The indexes of the operations the server refused (a validator, a unique index, ...).

    Re-raises `exc` when the failure is not per operation (a write concern error) or when the caller records no
    failures (`failed` is None) and an operation failed for another reason than a duplicate key that
    `retry_duplicates` allows to repeat.
    """
    details = exc.details
    if details.get("writeConcernErrors"):
        raise exc
    errors = details.get("writeErrors", [])
    if failed is None:
        if not retry_duplicates or any(e.get("code") != DUPLICATE_KEY for e in errors):
            raise exc
    return [int(e["index"]) for e in errors]
