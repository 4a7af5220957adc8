"""The customer fields on orders (`projector.registry.ORDER_CUSTOMER_FIELDS`), the fan-out: one of the two views
that join the aggregates (`projector.order_stats` writes the other, the order statistics on customers).

Every order of a customer carries `customer_name`, `customer_email` and `customer_version`, copied from the customer
document with `update_many({customer_id: C, customer_version: {$lt: v}})`, after the order and customer documents of
a batch: an order only ever moves to a *newer* customer version, so replays, redeliveries and replicas racing each
other never bring back an older name. The customer document is read *after* the batch's own writes: an order
inserted by one replica while another renames the customer is then covered by at least one of the two (each
writes, then reads the other's). A redelivered batch whose streams are ahead of their checkpoints writes it again;
a duplicate of a stream at its checkpoint writes none (the checkpoint says it is written already).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pymongo import UpdateMany
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError

from core.mongo_ids import find_in
from core.projections.customers import COLLECTION as CUSTOMERS_COLLECTION
from core.projections.orders import COLLECTION as ORDERS_COLLECTION
from projector.mongo_writer import MongoDocument, refused_indexes
from projector.registry import ORDER_CUSTOMER_FIELDS
from projector.view_sources import ViewSources, ViewWriter


@dataclass(frozen=True, slots=True)
class CustomerFields:
    """What an order shows of its customer, at the customer's version."""

    name: str
    email: str
    version: int

    def order_fields(self) -> dict[str, Any]:
        return {"customer_name": self.name, "customer_email": self.email, "customer_version": self.version}


class CustomerViews:
    """Writes the fan-out; every method raises `PyMongoError` if MongoDB fails."""

    def __init__(self, database: AsyncDatabase[MongoDocument]) -> None:
        self._orders = database[ORDERS_COLLECTION]
        self._customers = database[CUSTOMERS_COLLECTION]

    def writers(self) -> dict[str, ViewWriter]:
        """The writer of the fan-out view, by view name (`projector.pipeline.view_writers`)."""

        async def fan_out(
            keys: Iterable[str], carried: Mapping[str, int], failed: set[str], _sources: ViewSources
        ) -> object:
            return await self.fan_out(keys, carried, failed)

        return {ORDER_CUSTOMER_FIELDS.name: fan_out}

    async def customer_fields(self, customer_ids: Iterable[str]) -> dict[str, CustomerFields]:
        """The current fields of the customers that are registered in the read model (a round trip per
        `IDS_PER_QUERY` of them)."""
        fields = {"name": 1, "email": 1, "version": 1}
        found = find_in(self._customers, customer_ids, fields, query={"version": {"$gte": 1}})
        return {
            str(doc["_id"]): CustomerFields(str(doc.get("name", "")), str(doc.get("email", "")), int(doc["version"]))
            async for doc in found
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
