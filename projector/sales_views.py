"""The writer of the sales report (`projector.registry.SALES_REPORT`, shapes and rules in `core.projections.sales`).

After a batch places or cancels orders, the report documents of the days and currencies those orders count in are
recomputed from the `orders` documents (one aggregation per chunk of keys) and replaced whole, never incremented:
a redelivered batch, a replay or a rebuild in other batch boundaries writes the same documents. A replacement is
guarded by `report_version` (the number of facts a document summarises, which only grows): a recomputation from
an older snapshot, by a replica that lost a race, never replaces a fuller report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pymongo import ASCENDING, IndexModel, ReplaceOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from core.projections import Document
from core.projections.orders import COLLECTION as ORDERS_COLLECTION
from core.projections.sales import (
    REPORT_INDEXES,
    REPORT_VERSION_FIELD,
    SALES_COLLECTION,
    SALES_ORDER_INDEXES,
    parse_key,
    sales_documents,
    sales_rows_pipeline,
)
from projector.customer_views import ViewWriter, duplicate_indexes, refused_indexes
from projector.mongo_writer import MongoDocument
from projector.registry import SALES_REPORT

# Keys per aggregation: bounds the `$or` of its `$match` (a rebuild's batch can span many days).
KEYS_PER_AGGREGATION = 64


def _index_models(indexes: Iterable[Iterable[tuple[str, int]]]) -> list[IndexModel]:
    return [IndexModel([(name, ASCENDING) for name, _ in keys]) for keys in indexes]


class SalesViews:
    """Recomputes and stores report documents; every method raises `PyMongoError` if MongoDB fails."""

    def __init__(self, database: AsyncDatabase[MongoDocument]) -> None:
        self._orders = database[ORDERS_COLLECTION]
        self._reports = database[SALES_COLLECTION]

    def writers(self) -> dict[str, ViewWriter]:
        """The writer of each report view in `projector.registry.VIEWS`, by view name."""

        async def report(keys: Iterable[str], _carried: Mapping[str, int], failed: set[str]) -> object:
            return await self.recompute(keys, failed)

        return {SALES_REPORT.name: report}

    async def ensure_indexes(self) -> None:
        """The recomputation's indexes on `orders` and the query service's on the report; idempotent."""
        await self._orders.create_indexes(_index_models(SALES_ORDER_INDEXES))
        await self._reports.create_indexes(_index_models(REPORT_INDEXES))

    async def recompute(self, key_ids: Iterable[str], failed: set[str] | None = None) -> dict[str, Document]:
        """Recomputes and stores the report documents of these keys (`"<day>/<currency>"`); returns them.

        A key no order counts in any more has nothing to write (its document, if any, is left alone: facts never
        disappear, so only a hand-made document can be in that state, and `cqrs verify` reports it).
        `failed`: where to record keys whose write MongoDB refused (instead of raising for them).
        """
        keys = sorted({key for key_id in key_ids if (key := parse_key(key_id)) is not None})
        rows: list[dict[str, Any]] = []
        for start in range(0, len(keys), KEYS_PER_AGGREGATION):
            cursor = await self._orders.aggregate(sales_rows_pipeline(keys[start : start + KEYS_PER_AGGREGATION]))
            rows.extend([row async for row in cursor])
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


__all__ = ["KEYS_PER_AGGREGATION", "SalesViews"]
