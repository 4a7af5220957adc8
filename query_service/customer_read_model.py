"""Reads of the `customers` read model in MongoDB and the indexes they need.

The projector owns the documents: `{_id: customer_id, customer_id, name, email, status: "ACTIVE"|"DEACTIVATED",
registered_at, updated_at, version, position, order_stats: {draft_orders, placed_orders, cancelled_orders,
placed_totals: [{currency, total_minor}]}}`. Order statistics may arrive before the customer's own events: such a
document holds only `order_stats`, has no `version`, and is not a customer yet (not found, not listed).
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final

from prometheus_client import CollectorRegistry
from pymongo import ASCENDING, AsyncMongoClient, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from core import read_model as contract
from core.dependency_metrics import dependency_metrics
from core.read_model import CUSTOMERS_COLLECTION
from query_service.paging import CustomerCursor, CustomerFilter
from query_service.read_model import Document, read_model_outage

CustomersCollection = AsyncCollection[Document]


BY_NAME: Final[list[tuple[str, int]]] = [("name", ASCENDING), ("_id", ASCENDING)]

# The read-model contract's indexes (core/read_model.py): `(name, _id)` serves the sort, the keyset condition and
# an anchored name-prefix regex; `email` the exact-email filter.
CUSTOMER_INDEXES: Final[list[IndexModel]] = [IndexModel(list(keys)) for keys in contract.CUSTOMER_INDEXES]

# Only documents the customer's own events have created; statistics-only documents have no version.
_CUSTOMER_FIELD: Final = "version"
_IS_CUSTOMER: Final[Document] = {_CUSTOMER_FIELD: {"$exists": True}}


def normalize_email(raw: str) -> str:
    """The stored form of an email: stripped, lower case, Unicode NFC.

    Must equal the command side's normalisation (command_service/domain/customer_validation.py), which a query
    service may not import: the services share only `core/` and the protos.
    """
    return unicodedata.normalize("NFC", raw.strip().lower())


class CustomerReadModel:
    """Queries on the `customers` collection; an unreachable MongoDB raises `DependencyUnavailable`."""

    def __init__(self, collection: CustomersCollection, registry: CollectorRegistry | None = None) -> None:
        self._customers = collection
        self._deps = dependency_metrics(registry)

    @classmethod
    def from_client(
        cls, client: AsyncMongoClient[Document], database: str, registry: CollectorRegistry | None = None
    ) -> CustomerReadModel:
        return cls(client[database][CUSTOMERS_COLLECTION], registry)

    @property
    def collection(self) -> CustomersCollection:
        return self._customers

    def use_database(self, database: AsyncDatabase[Document]) -> None:
        """Reads another generation of the read model from now on (queries in flight finish on the old one)."""
        self._customers = database[CUSTOMERS_COLLECTION]

    async def get(self, customer_id: str) -> Document | None:
        """The customer with this id, or None (also for a document that holds only order statistics).

        Read by `_id` alone, as an order is (`OrderReadModel.get`): MongoDB's fastest plan for one document.
        """
        with read_model_outage():
            async with self._deps.timed("mongodb", "get_customer"):
                doc = await self._customers.find_one({"_id": customer_id})
        return doc if doc is not None and _CUSTOMER_FIELD in doc else None

    async def list_page(self, filters: CustomerFilter, after: CustomerCursor | None, limit: int) -> list[Document]:
        """Up to `limit` customers matching `filters`, by name then id, strictly after `after` when given."""
        with read_model_outage():
            async with self._deps.timed("mongodb", "list_customers"):
                cursor = self._customers.find(customer_listing_query(filters, after)).sort(BY_NAME).limit(limit)
                return await cursor.to_list()


def customer_listing_query(filters: CustomerFilter, after: CustomerCursor | None) -> Document:
    """The MongoDB filter of one ListCustomers page.

    The name prefix becomes an anchored regex of the escaped prefix (no options): MongoDB turns exactly that form
    into index bounds on `name`, and escaping makes `.`/`*`/`(` in a name match literally. The keyset condition
    is a range on `name` plus an `$or` that breaks ties on `_id`.
    """
    query: Document = dict(_IS_CUSTOMER)
    name: Document = {}
    if filters.name_prefix:
        name["$regex"] = "^" + re.escape(filters.name_prefix)
    if filters.email:
        query["email"] = filters.email
    if after is not None:
        name["$gte"] = after.name
        query["$or"] = [{"name": {"$gt": after.name}}, {"_id": {"$gt": after.customer_id}}]
    if name:
        query["name"] = name
    return query
