"""Shadow comparison of a rebuilt generation with the active read model, document by document.

Every document of each projection's collection is compared (both sides walked in `_id` order, so memory stays
bounded), or with `--sample N` a random sample of N per collection plus every document changed while the
generation was built. Fields named by `--ignore-field` (`field.path`, or `collection.field.path` for one
collection) do not count. The field comparison is verify's (`cqrsctl.verify.compare.diff_documents`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from core.mongo_ids import find_by_ids, id_chunks
from cqrsctl.verify.compare import diff_documents
from cqrsctl.verify.model import FieldDiff

log = logging.getLogger(__name__)

Doc = dict[str, Any]

DIFFERS: Final = "differs"
MISSING_IN_GENERATION: Final = "missing_in_generation"
MISSING_IN_LIVE: Final = "missing_in_live"


@dataclass(frozen=True, slots=True)
class Difference:
    collection: str
    doc_id: str
    kind: str  # DIFFERS, MISSING_IN_GENERATION or MISSING_IN_LIVE
    fields: tuple[FieldDiff, ...] = ()  # expected = the live value, actual = the generation's
    live_version: int | None = None
    generation_version: int | None = None
    # A view stamp (`customer_version` on orders, `order_stats_version` on customers) differs: fields copied from
    # other streams were written from different states of them (one side behind on those streams).
    stamps_differ: bool = False
    # Only the live read model is behind (its version or stamps lower, none higher): waiting for the projector
    # resolves it, catching the generation up further would only move the target.
    live_behind: bool = False

    @property
    def versions_differ(self) -> bool:
        """One side is behind the other (may resolve once both reflect the same events)."""
        return self.live_version != self.generation_version or self.stamps_differ


class IgnoredFields:
    """`--ignore-field` values: a dotted path, for every collection unless its first part names one of them."""

    def __init__(self, specs: Iterable[str], collections: Iterable[str]) -> None:
        names = set(collections)
        self.specs = tuple(dict.fromkeys(specs))
        self._everywhere: list[str] = []
        self._by_collection: dict[str, list[str]] = {}
        for spec in self.specs:
            head, _, rest = spec.partition(".")
            if head in names and rest:
                self._by_collection.setdefault(head, []).append(rest)
            else:
                self._everywhere.append(spec)

    def ignores(self, collection: str, path: str) -> bool:
        return any(
            path == ignored or path.startswith(ignored + ".")
            for ignored in (*self._everywhere, *self._by_collection.get(collection, ()))
        )


def _version(doc: Mapping[str, Any] | None) -> int | None:
    value = None if doc is None else doc.get("version")
    return value if isinstance(value, int) else None


def compare_documents(
    collection: str, doc_id: str, live: Doc | None, generation: Doc | None, ignored: IgnoredFields
) -> Difference | None:
    """How the generation's document differs from the live one (None: equal but for ignored fields)."""
    versions = (_version(live), _version(generation))
    if live is None and generation is None:
        return None
    if live is None:
        return Difference(collection, doc_id, MISSING_IN_LIVE, (), *versions, live_behind=True)
    if generation is None:
        return Difference(collection, doc_id, MISSING_IN_GENERATION, (), *versions)
    diffs = tuple(d for d in diff_documents(live, generation) if not ignored.ignores(collection, d.path))
    if not diffs:
        return None
    stamps = {key for key in (*live, *generation) if key.endswith("_version")} | {"version"}
    stamps_differ = any(live.get(key) != generation.get(key) for key in stamps - {"version"})
    order = [_compare_stamp(live.get(key), generation.get(key)) for key in stamps]
    live_behind = -1 in order and 1 not in order and None not in order
    return Difference(collection, doc_id, DIFFERS, diffs, *versions, stamps_differ, live_behind)


def _compare_stamp(live: Any, generation: Any) -> int | None:
    """-1: the live value is lower, 0: equal, 1: higher; None: not comparable (absent or not a number)."""
    if live == generation:
        return 0
    if isinstance(live, int) and isinstance(generation, int):
        return -1 if live < generation else 1
    return None


@dataclass(slots=True)
class ComparisonResult:
    documents_compared: int = 0
    differences: list[Difference] = field(default_factory=list)


async def _sorted(collection: AsyncCollection[Doc], size: int) -> AsyncIterator[Doc]:
    cursor = collection.find({"_id": {"$type": "string"}}).sort("_id", 1).batch_size(size)
    async for doc in cursor:
        yield doc


async def _next(docs: AsyncIterator[Doc]) -> Doc | None:
    return await anext(docs, None)


class ShadowComparer:
    """Compares the same collections of two databases: `live` (the active generation) and `generation`."""

    def __init__(
        self, live: AsyncDatabase[Doc], generation: AsyncDatabase[Doc], ignored: IgnoredFields, batch_size: int
    ) -> None:
        self._live = live
        self._gen = generation
        self._ignored = ignored
        self._size = batch_size

    async def full(self, collection: str, out: ComparisonResult) -> None:
        """Every document of `collection`: a merge of both sides in `_id` order."""
        live_docs, gen_docs = _sorted(self._live[collection], self._size), _sorted(self._gen[collection], self._size)
        live, gen = await _next(live_docs), await _next(gen_docs)
        while live is not None or gen is not None:
            live_id = None if live is None else str(live["_id"])
            gen_id = None if gen is None else str(gen["_id"])
            if gen_id is None or (live_id is not None and live_id < gen_id):
                pair: tuple[str, Doc | None, Doc | None] = (str(live_id), live, None)
                live = await _next(live_docs)
            elif live_id is None or gen_id < live_id:
                pair = (gen_id, None, gen)
                gen = await _next(gen_docs)
            else:
                pair = (live_id, live, gen)
                live, gen = await _next(live_docs), await _next(gen_docs)
            self._record(collection, *pair, out)

    async def sample(
        self, collection: str, size: int, changed_after: tuple[int, datetime], out: ComparisonResult
    ) -> None:
        """`size` random documents of each side, plus every document either side changed after
        (position, time) = `changed_after` (the generation's start)."""
        position, started_at = changed_after
        started = time.monotonic()
        ids: set[str] = set()
        changed = {"$or": [{"position": {"$gt": position}}, {"updated_at": {"$gte": started_at}}]}
        for database in (self._live, self._gen):
            sampled = await database[collection].aggregate([{"$sample": {"size": size}}, {"$project": {"_id": 1}}])
            ids.update([str(doc["_id"]) async for doc in sampled])
            ids.update([str(d["_id"]) async for d in database[collection].find(changed, {"_id": 1})])
        picked = time.monotonic()
        await self.by_ids(collection, sorted(ids), out)
        log.info("%s: %d documents picked (sampled, or changed during the rebuild) in %.1fs, read and compared in "
                 "%.1fs", collection, len(ids), picked - started, time.monotonic() - picked)  # fmt: skip

    async def by_ids(self, collection: str, ids: list[str], out: ComparisonResult) -> None:
        for chunk in id_chunks(ids):
            live = await find_by_ids(self._live[collection], chunk)
            gen = await find_by_ids(self._gen[collection], chunk)
            for doc_id in chunk:
                self._record(collection, doc_id, live.get(doc_id), gen.get(doc_id), out)

    def _record(self, collection: str, doc_id: str, live: Doc | None, gen: Doc | None, out: ComparisonResult) -> None:
        out.documents_compared += 1
        difference = compare_documents(collection, doc_id, live, gen, self._ignored)
        if difference is not None:
            out.differences.append(difference)
