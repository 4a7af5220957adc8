"""Reading documents by a list of ids (`$in`) in short lists.

`{"_id": {"$in": ids}}` is how a batch reads its documents, and on MongoDB a long list costs little more per
document than a short one (an index bounds lookup per id). The MongoDB-wire server of the local stack
(SecantusDB) matches each document it finds against the list one element at a time, so a query costs
ids x documents found: 2,048 checkpoints read 2,000 ids at a time took 4.4 s there, 64 at a time 0.2 s, 32 at a
time 0.19 s (docs/performance.md, "Short `$in` lists"). Lists of at most `IDS_PER_QUERY` keep that server at its
per-document cost; on MongoDB the extra round trips (one per 64 documents) are small beside the documents.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any, Final

from pymongo.asynchronous.collection import AsyncCollection

IDS_PER_QUERY: Final = 64


def id_chunks(ids: Iterable[str], size: int = IDS_PER_QUERY) -> list[list[str]]:
    """The distinct ids, sorted, in lists of at most `size`."""
    wanted = sorted(set(ids))
    return [wanted[start : start + size] for start in range(0, len(wanted), size)]


async def find_in(
    collection: AsyncCollection[dict[str, Any]],
    ids: Iterable[str],
    projection: Mapping[str, Any] | None = None,
    *,
    field: str = "_id",
    query: Mapping[str, Any] | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """The documents whose `field` (default `_id`) is one of `ids` and that match `query`, read `IDS_PER_QUERY`
    ids per query, one query after another."""
    for chunk in id_chunks(ids):
        async for doc in collection.find({field: {"$in": chunk}, **(query or {})}, projection):
            yield doc


async def find_by_ids(
    collection: AsyncCollection[dict[str, Any]],
    ids: Iterable[str],
    projection: Mapping[str, Any] | None = None,
    *,
    query: Mapping[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """`_id` -> document of those of `ids` that exist (and match `query`)."""
    return {str(doc["_id"]): doc async for doc in find_in(collection, ids, projection, query=query)}
