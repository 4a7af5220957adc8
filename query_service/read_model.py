"""Reads of the `orders` read model in MongoDB (PyMongo's native async API) and the indexes they need.

The projector owns the documents; this module only reads them. The document shape is:
`{_id: order_id, order_id, customer_id, status: "DRAFT"|"PLACED"|"CANCELLED", currency, lines: [...],
total_minor, shipping_address: {...}, cancel_reason, created_at, updated_at, placed_at, version, position,
deleted}`. Deleted orders stay as tombstones (`deleted: true`) and are never returned.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import CollectorRegistry
from pymongo import DESCENDING, AsyncMongoClient, IndexModel
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import ConnectionFailure, ExecutionTimeout, OperationFailure, PyMongoError, WTimeoutError

from core import mongo_round_trip
from core import read_model as contract
from core.dependency_metrics import dependency_metrics
from core.error_text import describe_error
from core.errors import DependencyUnavailable
from core.read_model import ORDER_HISTORY_FIELD, ORDERS_COLLECTION
from query_service.config import QuerySettings
from query_service.paging import Cursor, ListFilter

log = logging.getLogger(__name__)

Document = dict[str, Any]
OrdersCollection = AsyncCollection[Document]


# Newest first; `_id` breaks ties between orders created in the same millisecond, which makes the order total
# and therefore keyset pagination exact.
NEWEST_FIRST: Final[list[tuple[str, int]]] = [("created_at", DESCENDING), ("_id", DESCENDING)]


# Reads of the current order leave its change log out: it grows with every event and only the history and as-of
# reads need it.
WITHOUT_HISTORY: Final[dict[str, int]] = {ORDER_HISTORY_FIELD: 0}

# The read-model contract's indexes (core/read_model.py, the projector declares the same ones).
ORDER_INDEXES: Final[list[IndexModel]] = [IndexModel(list(keys)) for keys in contract.ORDER_INDEXES]

# MongoDB error codes for "an index with these keys/this name exists with other options": someone else (the
# projector, an operator) created an equivalent index under another name. Harmless for our queries.
_INDEX_CONFLICT_CODES: Final = frozenset({85, 86})  # IndexOptionsConflict, IndexKeySpecsConflict


async def ensure_order_indexes(collection: OrdersCollection) -> bool:
    """Creates the indexes the order queries need once the collection exists; False if it does not exist yet."""
    return await ensure_indexes(collection, ORDER_INDEXES)


async def ensure_indexes(collection: OrdersCollection, indexes: list[IndexModel]) -> bool:
    """Creates `indexes` once the collection exists; False if it does not exist yet.

    Idempotent, and tolerant of equivalent indexes made by others. The query service is a reader: it never
    creates the collection itself (the projector does, with its first write), so it cannot race the projector's
    implicit creation. That race is legal in MongoDB but deadlocks SecantusDB 0.7 with on-disk storage.
    """
    if not await collection.database.list_collection_names(filter={"name": collection.name}):
        return False
    try:
        await collection.create_indexes(indexes)
    except OperationFailure as exc:
        if exc.code not in _INDEX_CONFLICT_CODES:
            raise
        log.warning("read-model index already exists with other options, keeping it: %s", exc)
    return True


def is_mongo_unavailable(exc: BaseException) -> bool:
    """True if `exc` means "MongoDB cannot be reached or did not answer in time" (retryable, UNAVAILABLE)."""
    if isinstance(exc, ConnectionFailure | ExecutionTimeout | WTimeoutError | TimeoutError):
        return True  # ConnectionFailure covers AutoReconnect, NetworkTimeout, ServerSelectionTimeoutError
    return isinstance(exc, PyMongoError) and exc.timeout


READ_MODEL: Final = "read model (MongoDB)"  # what a caller is told is down (never where it runs)


@contextlib.contextmanager
def read_model_outage() -> Iterator[None]:
    """Translates a driver error that means "MongoDB is unreachable" into the project's `DependencyUnavailable`
    at the store boundary; the driver's text (hosts, ports, topology) becomes its `detail`, for the log only."""
    try:
        yield
    except Exception as exc:
        if not is_mongo_unavailable(exc):
            raise
        raise DependencyUnavailable(READ_MODEL, describe_error(exc)) from exc


def redact_mongo_url(url: str) -> str:
    """`scheme://hosts` of a MongoDB URL, with credentials, database and options removed (safe to log)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return "<unparsable MongoDB URL>"
    hosts = re.split(r"[/?]", rest.rpartition("@")[2], maxsplit=1)[0]
    return f"{scheme}://{hosts}"


def make_client(settings: QuerySettings, *, max_pool_size: int = 100, purpose: str = "") -> AsyncMongoClient[Document]:
    """A client whose every operation fails within the configured timeout when MongoDB is unreachable; at most
    `max_pool_size` connections (PyMongo's default); `purpose` is added to its application name.

    No I/O happens here: AsyncMongoClient connects on first use. Its round trips are awaited in the calling task
    (`core.mongo_round_trip`): most queries are one round trip.
    """
    mongo_round_trip.install()
    timeout_ms = settings.mongo_timeout_ms
    return AsyncMongoClient(
        settings.mongo_url,
        maxPoolSize=max_pool_size,
        serverSelectionTimeoutMS=timeout_ms,
        socketTimeoutMS=timeout_ms,
        timeoutMS=timeout_ms,
        # BSON dates are UTC; decode them as aware datetimes so nothing downstream guesses a time zone.
        tz_aware=True,
        appname=f"cqrs-query-service{'-' + purpose if purpose else ''}",
    )


class OrderReadModel:
    """Queries on the `orders` collection; an unreachable MongoDB raises `DependencyUnavailable`."""

    def __init__(self, collection: OrdersCollection, registry: CollectorRegistry | None = None) -> None:
        self._orders = collection
        self._deps = dependency_metrics(registry)

    @classmethod
    def from_client(
        cls, client: AsyncMongoClient[Document], database: str, registry: CollectorRegistry | None = None
    ) -> OrderReadModel:
        return cls(client[database][ORDERS_COLLECTION], registry)

    @property
    def collection(self) -> OrdersCollection:
        return self._orders

    def use_database(self, database: AsyncDatabase[Document]) -> None:
        """Reads another generation of the read model from now on (queries in flight finish on the old one)."""
        self._orders = database[ORDERS_COLLECTION]

    async def get(self, order_id: str) -> Document | None:
        """The live (not deleted) order with this id, or None.

        Read by `_id` alone and a tombstone dropped here: a filter on nothing but `_id` is MongoDB's fastest plan
        for one document, and cost the MongoDB-wire server about 0.7x the CPU of the same read filtered on `deleted`.
        """
        with read_model_outage():
            async with self._deps.timed("mongodb", "get_order"):
                doc = await self._orders.find_one({"_id": order_id}, WITHOUT_HISTORY)
        return None if doc is None or doc.get("deleted") is True else doc

    async def get_including_deleted(self, order_id: str) -> Document | None:
        """The order document with this id, a tombstone (`deleted: true`) included, or None."""
        with read_model_outage():
            async with self._deps.timed("mongodb", "get_order"):
                return await self._orders.find_one({"_id": order_id}, WITHOUT_HISTORY)

    async def get_with_history(self, order_id: str) -> Document | None:
        """The order document with this id and its change log, a tombstone included, or None."""
        with read_model_outage():
            async with self._deps.timed("mongodb", "get_order_history"):
                return await self._orders.find_one({"_id": order_id})

    async def list_page(self, filters: ListFilter, after: Cursor | None, limit: int) -> list[Document]:
        """Up to `limit` live orders matching `filters`, newest first, strictly after `after` when given."""
        with read_model_outage():
            async with self._deps.timed("mongodb", "list_orders"):
                cursor = self._orders.find(listing_query(filters, after), WITHOUT_HISTORY)
                cursor = cursor.sort(NEWEST_FIRST).limit(limit)
                return await cursor.to_list()


def listing_query(filters: ListFilter, after: Cursor | None) -> Document:
    """The MongoDB filter of one ListOrders page.

    Equality on `deleted: false` (not `$ne: true`) so that the query is an index prefix and the sort needs no
    in-memory stage; the projector always writes the flag. The keyset condition is written as a range on
    `created_at` (tight index bounds) plus an `$or` that breaks ties on `_id`.
    """
    query: Document = {"deleted": False}
    if filters.customer_id:
        query["customer_id"] = filters.customer_id
    if filters.status is not None:
        query["status"] = filters.status
    if after is not None:
        created_at = after.created_at
        query["created_at"] = {"$lte": created_at}
        query["$or"] = [{"created_at": {"$lt": created_at}}, {"_id": {"$lt": after.order_id}}]
    return query
