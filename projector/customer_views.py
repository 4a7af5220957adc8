"""The writers of the views that join the two aggregates (declared in `projector.registry.VIEWS`): customer
fields on orders, and order statistics on customers.

Both are written after the order and customer documents of a batch, and both are idempotent, so a redelivered
batch (even one made only of duplicates) simply writes them again:

* **Fan-out.** Every order of a customer carries `customer_name`, `customer_email` and `customer_version`, copied
  from the customer document with `update_many({customer_id: C, customer_version: {$lt: v}})`: an order only ever
  moves to a *newer* customer version, so replays, redeliveries and replicas racing each other never bring back an
  older name. The customer document is read *after* the batch's own writes: an order inserted by one replica while
  another renames the customer is then covered by at least one of the two (each writes, then reads the other's).
* **Order statistics.** Recomputed from scratch for every customer touched by an order event, with one aggregation
  over `orders`, never accumulated, so applying a batch twice cannot count twice. Two replicas may compute the
  statistics of one customer concurrently from different snapshots; `order_stats_version`, the sum of the versions
  of all the customer's orders (tombstones included), grows with every order event, and a write only replaces
  statistics computed from an older state. The aggregation that ran last after the last order write sees the
  highest sum, so it wins.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pymongo import UpdateMany, UpdateOne
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from core.projections import Document
from core.projections.customers import COLLECTION as CUSTOMERS_COLLECTION
from core.projections.customers import empty_order_stats
from core.projections.orders import COLLECTION as ORDERS_COLLECTION
from core.read_model import ORDER_STATUS_COUNTERS
from projector.mongo_writer import DUPLICATE_KEY, MongoDocument
from projector.registry import CUSTOMER_ORDER_STATS, ORDER_CUSTOMER_FIELDS

# One counter per order status, from the read-model contract.
STATUS_COUNTERS: dict[str, str] = {str(status): counter for status, counter in ORDER_STATUS_COUNTERS.items()}


@dataclass(frozen=True, slots=True)
class CustomerFields:
    """What an order shows of its customer, at the customer's version."""

    name: str
    email: str
    version: int

    def order_fields(self) -> dict[str, Any]:
        return {"customer_name": self.name, "customer_email": self.email, "customer_version": self.version}


@dataclass(frozen=True, slots=True)
class OrderStats:
    stats: dict[str, Any]
    source_version: int  # sum of the versions of every order of the customer, deleted ones included


def order_stats_from_groups(customer_ids: Iterable[str], groups: Iterable[Mapping[str, Any]]) -> dict[str, OrderStats]:
    """Builds each customer's statistics from the `$group` rows of `ORDER_STATS_PIPELINE` (pure).

    A customer without rows (no orders) gets empty statistics at source version 0.
    """
    counts: dict[str, dict[str, int]] = {}
    totals: dict[str, dict[str, int]] = {}
    source: dict[str, int] = {}
    for row in groups:
        key = row["_id"]
        customer_id = str(key["customer_id"])
        source[customer_id] = source.get(customer_id, 0) + int(row["versions"])
        if key.get("deleted"):
            continue  # a tombstone counts for the source version only
        counter = STATUS_COUNTERS.get(str(key.get("status")))
        if counter is None:
            continue
        per_status = counts.setdefault(customer_id, {})
        per_status[counter] = per_status.get(counter, 0) + int(row["orders"])
        if counter == "placed_orders":
            currency = str(key["currency"])
            per_currency = totals.setdefault(customer_id, {})
            per_currency[currency] = per_currency.get(currency, 0) + int(row["total_minor"])
    result: dict[str, OrderStats] = {}
    for customer_id in customer_ids:
        stats = empty_order_stats()
        stats.update(counts.get(customer_id, {}))
        stats["placed_totals"] = [
            {"currency": currency, "total_minor": total}
            for currency, total in sorted(totals.get(customer_id, {}).items())
        ]
        result[customer_id] = OrderStats(stats, source.get(customer_id, 0))
    return result


def order_stats_pipeline(customer_ids: list[str]) -> list[MongoDocument]:
    """One `$group` row per customer, status, currency and deleted flag: order count, total, sum of versions."""
    return [
        {"$match": {"customer_id": {"$in": customer_ids}}},
        {
            "$group": {
                "_id": {
                    "customer_id": "$customer_id",
                    "status": "$status",
                    "currency": "$currency",
                    "deleted": "$deleted",
                },
                "orders": {"$sum": 1},
                "total_minor": {"$sum": "$total_minor"},
                "versions": {"$sum": "$version"},
            }
        },
    ]


# A view writer: (keys to recompute, versions the triggering documents already carry, refused keys to record,
# documents of the batch by stream id, which a writer may use instead of reading them back).
ViewWriter = Callable[[Iterable[str], Mapping[str, int], set[str], Mapping[str, Document]], Awaitable[object]]


class CustomerViews:
    """Writes the fan-out and the order statistics; every method raises `PyMongoError` if MongoDB fails."""

    def __init__(self, database: AsyncDatabase[MongoDocument]) -> None:
        self._orders = database[ORDERS_COLLECTION]
        self._customers = database[CUSTOMERS_COLLECTION]

    def writers(self) -> dict[str, ViewWriter]:
        """The writer of each view in `projector.registry.VIEWS`, by view name (a test checks none is missing)."""

        async def order_stats(
            keys: Iterable[str], _carried: Mapping[str, int], failed: set[str], _docs: Mapping[str, Document]
        ) -> object:
            return await self.recompute_order_stats(keys, failed)

        async def fan_out(
            keys: Iterable[str], carried: Mapping[str, int], failed: set[str], _docs: Mapping[str, Document]
        ) -> object:
            return await self.fan_out(keys, carried, failed)

        return {ORDER_CUSTOMER_FIELDS.name: fan_out, CUSTOMER_ORDER_STATS.name: order_stats}

    async def customer_fields(self, customer_ids: Iterable[str]) -> dict[str, CustomerFields]:
        """The current fields of the customers that are registered in the read model, in one round trip."""
        ids = sorted(set(customer_ids))
        if not ids:
            return {}
        cursor = self._customers.find(
            {"_id": {"$in": ids}, "version": {"$gte": 1}}, {"name": 1, "email": 1, "version": 1}
        )
        return {
            str(doc["_id"]): CustomerFields(str(doc.get("name", "")), str(doc.get("email", "")), int(doc["version"]))
            async for doc in cursor
        }

    async def fan_out(
        self, customer_ids: Iterable[str], carried: Mapping[str, int] | None = None, failed: set[str] | None = None
    ) -> dict[str, int]:
        """Brings every order of these customers up to the customer's current version; returns those versions.

        `carried[c]`: the orders that need customer `c` here already carry its version `carried[c]` (new orders
        prefilled in this batch), so `c` needs no update unless it has moved past that version since.
        `failed`: where to record customers whose write was refused (instead of raising for them).
        """
        carried = carried or {}
        fields = await self.customer_fields(customer_ids)
        todo = [
            (customer_id, customer)
            for customer_id, customer in sorted(fields.items())
            if customer.version > carried.get(customer_id, 0)
        ]
        ops = [
            UpdateMany(
                {"customer_id": customer_id, "customer_version": {"$lt": customer.version}},
                {"$set": customer.order_fields()},
            )
            for customer_id, customer in todo
        ]
        if ops:
            try:
                await self._orders.bulk_write(ops, ordered=False)
            except BulkWriteError as exc:
                for index in refused_indexes(exc, failed):
                    assert failed is not None
                    failed.add(todo[index][0])
        return {customer_id: customer.version for customer_id, customer in fields.items()}

    async def recompute_order_stats(
        self, customer_ids: Iterable[str], failed: set[str] | None = None
    ) -> dict[str, OrderStats]:
        """Recomputes and stores the order statistics of these customers (one aggregation, one bulk write).

        `failed`: where to record customers whose write was refused (instead of raising for them).
        """
        ids = sorted(set(customer_ids))
        if not ids:
            return {}
        cursor = await self._orders.aggregate(order_stats_pipeline(ids))
        stats = order_stats_from_groups(ids, [row async for row in cursor])
        order = list(stats)
        try:
            await self._customers.bulk_write(
                [self._stats_update(c, stats[c], upsert=True) for c in order], ordered=False
            )
        except BulkWriteError as exc:
            # The filter missed: statistics at least as new are stored (fine), or a concurrent upsert created the
            # document first; repeating as a plain update settles which.
            retry = [order[index] for index in refused_indexes(exc, failed, retry_duplicates=True)]
            duplicates = {order[index] for index in duplicate_indexes(exc)}
            if failed is not None:
                failed.update(set(retry) - duplicates)
            retry = [c for c in retry if c in duplicates]
            if retry:
                try:
                    await self._customers.bulk_write(
                        [self._stats_update(c, stats[c], upsert=False) for c in retry], ordered=False
                    )
                except BulkWriteError as again:
                    for index in refused_indexes(again, failed):
                        assert failed is not None
                        failed.add(retry[index])
        return stats

    @staticmethod
    def _stats_update(customer_id: str, stats: OrderStats, *, upsert: bool) -> UpdateOne:
        return UpdateOne(
            {"_id": customer_id, "order_stats_version": {"$not": {"$gte": stats.source_version}}},
            {"$set": {"order_stats": stats.stats, "order_stats_version": stats.source_version}},
            upsert=upsert,
        )


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
