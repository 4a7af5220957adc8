"""The writer of the sales report (`projector.registry.SALES_REPORT`, shapes and rules in `core.projections.sales`).

After a batch places or cancels orders (the view's keys are the orders): each of their facts is counted once in
its day's shard document (an update guarded by the fact's tag: a redelivery, a replay or another replica counts
nothing twice), then the report documents of the days those facts fall on are rolled up from their shards and
replaced, guarded by `report_version`. The cost of a batch depends on its own orders and on `SHARDS`, not on the
day's orders: a batch counts only the facts of events above its orders' checkpoints, so a shard needs the tags of
the facts in flight only, and `projector.sales_tags` forgets the others (before that, every tag of the day stayed
and a batch cost about 1 us of server CPU more per fact of the day: 22 to 26 ms after 16,000 facts).

The facts of a batch that fall into one shard are counted by one update guarded by all their tags (`$nin`): one
write per shard instead of one per order. If any of those tags is there already (a redelivery) the update
misses, and the shard's facts are counted one by one, each guarded by its own tag, as before. The orders are
taken from the batch when it holds them (`docs`), else read back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from typing import Any, Final

from pymongo import ASCENDING, IndexModel, ReplaceOne, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from core.mongo_ids import find_by_ids
from core.projections import Document
from core.projections.orders import COLLECTION as ORDERS_COLLECTION
from core.projections.sales import (
    COUNTED_FIELD,
    REPORT_INDEXES,
    REPORT_VERSION_FIELD,
    SALES_COLLECTION,
    SHARD_INDEXES,
    SHARDS_COLLECTION,
    fact_updates,
    keys_of_order,
    parse_key,
    sales_documents,
    shard_rows,
)
from core.read_model import ORDER_HISTORY_FIELD
from projector.mongo_writer import MongoDocument, duplicate_indexes, refused_indexes
from projector.registry import SALES_REPORT
from projector.view_sources import ViewSources, ViewWriter

log = logging.getLogger(__name__)

# (order id, shard id, fact tag, update) of one fact to count.
Fact = tuple[str, str, str, Document]
# A batch counts facts only this soon after reading its checkpoints; `projector.sales_tags` keeps a tag at least
# `MIN_TAG_GRACE_SECONDS` after the checkpoint that covers it was seen, so no batch still counting on an older one
# can miss it.
MAX_BATCH_AGE_SECONDS: Final = 60.0
MIN_TAG_GRACE_SECONDS: Final = 2 * MAX_BATCH_AGE_SECONDS


def _index_models(indexes: Iterable[Iterable[tuple[str, int]]]) -> list[IndexModel]:
    return [IndexModel([(name, ASCENDING) for name, _ in keys]) for keys in indexes]


class SalesViews:
    """Counts facts and rolls up report documents; every method raises `PyMongoError` if MongoDB fails."""

    def __init__(self, database: AsyncDatabase[MongoDocument]) -> None:
        self._orders = database[ORDERS_COLLECTION]
        self._shards = database[SHARDS_COLLECTION]
        self._reports = database[SALES_COLLECTION]

    def writers(self) -> dict[str, ViewWriter]:
        """The writer of each report view in `projector.registry.VIEWS`, by view name."""

        async def report(
            keys: Iterable[str], _carried: Mapping[str, int], failed: set[str], sources: ViewSources
        ) -> object:
            if sources.loaded_at is not None and time.monotonic() - sources.loaded_at > MAX_BATCH_AGE_SECONDS:
                # Its checkpoints may be older than a tag's lifetime (`projector.sales_tags`): counted on them, a
                # fact whose tag is forgotten would count twice. Refused: the orders' streams are retried afresh.
                failed.update(keys)
                log.warning(
                    "sales facts not counted: the batch read its checkpoints over %ss ago", MAX_BATCH_AGE_SECONDS
                )
                return {}
            return await self.count(keys, failed, sources.docs, sources.checkpoints)

        return {SALES_REPORT.name: report}

    async def clear(self) -> None:
        """Forgets every counted fact and every report document: what a recomputation from the orders starts from
        (counted afresh, a fact whose tag a sweep forgot would count twice)."""
        await self._shards.delete_many({})
        await self._reports.delete_many({})

    async def ensure_indexes(self) -> None:
        """The roll-up's index on the shards and the query service's on the report; idempotent."""
        await self._shards.create_indexes(_index_models(SHARD_INDEXES))
        await self._reports.create_indexes(_index_models(REPORT_INDEXES))

    async def count(
        self,
        order_ids: Iterable[str],
        failed: set[str] | None = None,
        docs: Mapping[str, Document] | None = None,
        checkpoints: Mapping[str, int] | None = None,
    ) -> dict[str, Document]:
        """Counts the facts of these orders that are not counted yet, then rolls up the days they count on;
        returns the report documents written. `failed`: where to record the orders that count on a day whose
        report MongoDB refused (a refused fact raises: the batch is retried whole). `docs`: order documents as the
        caller just wrote or read them, by id, with their change logs (the others are read). `checkpoints`: the
        orders' checkpoint versions as the batch read them; only facts of events above them are counted (absent:
        every fact)."""
        ids = sorted(set(order_ids))
        if not ids:
            return {}
        docs = docs or {}
        above = checkpoints or {}
        orders = {order_id: docs[order_id] for order_id in ids if order_id in docs}
        missing = [order_id for order_id in ids if order_id not in orders]
        if missing:
            # The change log dates each fact; it is needed only above a checkpoint.
            needed = None if any(above.get(order_id, 0) > 0 for order_id in missing) else {ORDER_HISTORY_FIELD: 0}
            orders.update(await find_by_ids(self._orders, missing, needed))
        facts = [
            (order_id, *fact)
            for order_id, order in orders.items()
            for fact in fact_updates(order_id, order, above.get(order_id, 0))
        ]
        await self._count(facts)
        days = {order_id: set(keys_of_order(order)) for order_id, order in orders.items()}
        if failed is None:  # a refused report raises
            return await self.roll_up(set().union(*days.values()))
        refused: set[str] = set()
        reports = await self.roll_up(set().union(*days.values()), refused)
        failed.update(order_id for order_id, keys in days.items() if keys & refused)  # the view is keyed by order
        return reports

    async def _count(self, facts: list[Fact]) -> None:
        """One update per shard, guarded by the tags of all its facts. An upsert whose filter missed because a tag
        is there (or that lost a race to create the shard) collides with the stored `_id`: that shard's facts are
        then applied one by one as plain updates, where each fact's own tag decides. Anything else MongoDB
        refuses raises."""
        if not facts:
            return
        by_shard: dict[str, list[Fact]] = {}
        for fact in facts:
            by_shard.setdefault(fact[1], []).append(fact)
        groups = list(by_shard.values())
        try:
            await self._shards.bulk_write([_facts(group) for group in groups], ordered=False)
        except BulkWriteError as exc:
            refused_indexes(exc, None, retry_duplicates=True)  # raises unless every failure is a duplicate `_id`
            again = [fact for i in duplicate_indexes(exc) for fact in groups[i]]
            await self._shards.bulk_write([_fact(fact, upsert=False) for fact in again], ordered=False)

    async def roll_up(self, key_ids: Iterable[str], failed: set[str] | None = None) -> dict[str, Document]:
        """Rolls up and stores the report documents of these keys (`"<day>/<currency>"`) from their shards."""
        keys = sorted({key for key_id in key_ids if (key := parse_key(key_id)) is not None})
        if not keys:
            return {}
        wanted = {"$or": [{"day": key.day, "currency": key.currency} for key in keys]}
        rows = [row async for shard in self._shards.find(wanted, {COUNTED_FIELD: 0}) for row in shard_rows(shard)]
        reports = sales_documents(rows)
        await self._write(reports, failed)
        return reports

    async def _write(self, reports: Mapping[str, Document], failed: set[str] | None) -> None:
        order = sorted(reports)
        if not order:
            return
        try:
            await self._reports.bulk_write([_replacement(reports[k], upsert=True) for k in order], ordered=False)
        except BulkWriteError as exc:
            # A missed filter upserts and collides with the stored `_id`: either that document summarises more
            # facts (fine, it stays) or a concurrent upsert created it first; a plain replace settles which.
            refused = [order[i] for i in refused_indexes(exc, failed, retry_duplicates=True)]
            duplicates = {order[i] for i in duplicate_indexes(exc)}
            if failed is not None:
                failed.update(set(refused) - duplicates)
            retry = [k for k in refused if k in duplicates]
            if not retry:
                return
            try:
                await self._reports.bulk_write([_replacement(reports[k], upsert=False) for k in retry], ordered=False)
            except BulkWriteError as again:
                for index in refused_indexes(again, failed):
                    assert failed is not None
                    failed.add(retry[index])


def _replacement(report: Document, *, upsert: bool) -> ReplaceOne[MongoDocument]:
    """Replaces the stored report unless it summarises more facts than this one."""
    version = int(report[REPORT_VERSION_FIELD])
    return ReplaceOne({"_id": report["_id"], REPORT_VERSION_FIELD: {"$not": {"$gt": version}}}, report, upsert=upsert)


def _fact(fact: Fact, *, upsert: bool) -> UpdateOne:
    """Counts a fact in its shard unless its tag is there already."""
    _, shard, tag, update = fact
    return UpdateOne({"_id": shard, COUNTED_FIELD: {"$ne": tag}}, update, upsert=upsert)


def _facts(group: list[Fact]) -> UpdateOne:
    """Counts the facts of one shard (an upsert) unless any of their tags is there already."""
    if len(group) == 1:
        return _fact(group[0], upsert=True)
    tags = [tag for _, _, tag, _ in group]
    return UpdateOne({"_id": group[0][1], COUNTED_FIELD: {"$nin": tags}}, merge_fact_updates(group), upsert=True)


def merge_fact_updates(group: Iterable[Fact]) -> Document:
    """One update that does what the updates of these facts (of one shard) do one after the other: increments
    summed, names set, tags pushed in order (pure)."""
    increments: dict[str, int] = {}
    names: dict[str, Any] = {}
    tags: list[str] = []
    for _, _, _, update in group:
        for path, amount in update["$inc"].items():
            increments[path] = increments.get(path, 0) + int(amount)
        names.update(update["$set"])
        tags.append(update["$push"][COUNTED_FIELD])
    return {"$inc": increments, "$set": names, "$push": {COUNTED_FIELD: {"$each": tags}}}


__all__ = ["SalesViews", "merge_fact_updates"]
