"""`--repair`: rewrites the documents that differ from PostgreSQL, never racing the projector backwards.

A document is replaced only while its stored version is at most the computed one (or it has none; for a sales
report, its `report_version`): if the projector moved it past the computed version meanwhile, the guarded upsert
misses, tries to insert the same `_id` and fails with a duplicate key, and the document is left alone (reported as
skipped). A document without
events is deleted only if it still is at the version verify saw.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cqrsctl.verify.model import Document, ExpectedDoc, Finding, FindingKind, Repair

# Replacements in flight at once (the MongoDB-wire server is slow with single writes; keep it busy, not swamped).
CONCURRENCY = 16


def version_guard(stream_id: str, version: int | None) -> dict[str, Any]:
    """Matches the document only while its version is at most `version` (None: while it has no version)."""
    if version is None:
        return {"_id": stream_id, "version": {"$exists": False}}
    return {"_id": stream_id, "$or": [{"version": {"$lte": version}}, {"version": {"$exists": False}}]}


def replace_guard(stream_id: str, expected: ExpectedDoc) -> dict[str, Any]:
    """Matches the document while it is not ahead of `expected` (by its `guard_field`, else by version)."""
    name = expected.guard_field
    if name is None:
        return version_guard(stream_id, expected.version)
    return {"_id": stream_id, "$or": [{name: {"$lte": expected.doc[name]}}, {name: {"$exists": False}}]}


def _point(expected: ExpectedDoc) -> str:
    if expected.version is not None:
        return f"version {expected.version}"
    if expected.guard_field is not None:
        return f"{expected.guard_field} {expected.doc.get(expected.guard_field)}"
    return "order statistics"


async def repair_documents(database: AsyncDatabase[Document], findings: list[Finding]) -> list[Repair]:
    """Applies the repairable findings (one per document) and says what was done to each."""
    todo: dict[tuple[str, str], Finding] = {}
    for finding in findings:
        if finding.repairable and finding.collection is not None:
            todo.setdefault((finding.collection, finding.stream_id), finding)
    semaphore = asyncio.Semaphore(CONCURRENCY)

    async def one(finding: Finding) -> Repair:
        async with semaphore:
            return await _repair(database, finding)

    return list(await asyncio.gather(*(one(f) for f in todo.values())))


async def _repair(database: AsyncDatabase[Document], finding: Finding) -> Repair:
    assert finding.collection is not None
    collection = database[finding.collection]
    stream_id = finding.stream_id
    if finding.kind is FindingKind.ORPHAN_DOCUMENT:
        guard: dict[str, Any] = {"_id": stream_id}
        guard["version"] = finding.stored_version if finding.stored_version is not None else {"$exists": False}
        deleted = await collection.delete_one(guard)
        if deleted.deleted_count:
            return Repair(finding.collection, stream_id, "deleted", "no events in PostgreSQL")
        return Repair(finding.collection, stream_id, "skipped", "the document changed since it was checked")
    expected = finding.expected
    if expected is None:
        return Repair(finding.collection, stream_id, "skipped", "nothing to write")
    try:
        result = await collection.replace_one(replace_guard(stream_id, expected), expected.doc, upsert=True)
    except DuplicateKeyError:
        return Repair(finding.collection, stream_id, "skipped", f"the stored document is newer than {_point(expected)}")
    version = _point(expected)
    if result.upserted_id is not None:
        return Repair(finding.collection, stream_id, "inserted", f"written from PostgreSQL at {version}")
    fields = ", ".join(d.path for d in finding.diffs[:8]) + (", ..." if len(finding.diffs) > 8 else "")
    return Repair(finding.collection, stream_id, "replaced", f"at {version}; fixed: {fields}")
