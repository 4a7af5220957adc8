"""Reads of the sales report in MongoDB (documents written by the projector, shape in `core.projections.sales`).

A report over a range is two reads: the day documents without their SKU lists (one row each), and one
aggregation that adds up each SKU's net figures per currency and keeps the top N by quantity and by revenue
(`$topN`, MongoDB 5.2+). An unreachable MongoDB raises `DependencyUnavailable`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import CollectorRegistry
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase

from core.dependency_metrics import dependency_metrics
from core.projections.sales import SALES_COLLECTION
from query_service.read_model import Document, read_model_outage

# Ties are broken by the other figure, then by SKU, so a report is the same on every read.
BY_QUANTITY: Final[dict[str, int]] = {"net_quantity": -1, "net_revenue_minor": -1, "_id.sku": 1}
BY_REVENUE: Final[dict[str, int]] = {"net_revenue_minor": -1, "net_quantity": -1, "_id.sku": 1}
_SKU_OUTPUT: Final[dict[str, str]] = {
    "sku": "$_id.sku",
    "net_quantity": "$net_quantity",
    "net_revenue_minor": "$net_revenue_minor",
    "placed_quantity": "$placed_quantity",
    "cancelled_quantity": "$cancelled_quantity",
}


@dataclass(frozen=True, slots=True)
class SalesQuery:
    """A validated report request: days as `YYYY-MM-DD`, both included; currency "" means all."""

    from_day: str
    to_day: str
    currency: str
    top_n: int


@dataclass(slots=True)
class SalesReport:
    """The day documents (without SKUs), by day then currency, and per currency its top SKU lists."""

    days: list[Document] = field(default_factory=list)
    top_by_quantity: dict[str, list[Document]] = field(default_factory=dict)
    top_by_revenue: dict[str, list[Document]] = field(default_factory=dict)


def days_filter(query: SalesQuery) -> Document:
    """The report documents of the query's range (and currency): a prefix of the report's `(day, currency)`
    index."""
    selected: Document = {"day": {"$gte": query.from_day, "$lte": query.to_day}}
    if query.currency:
        selected["currency"] = query.currency
    return selected


def top_skus_pipeline(query: SalesQuery) -> list[Document]:
    """Per currency of the range: the top `query.top_n` SKUs by net quantity and by net revenue."""
    return [
        {"$match": days_filter(query)},
        {"$unwind": "$skus"},
        {
            "$group": {
                "_id": {"currency": "$currency", "sku": "$skus.sku"},
                "net_quantity": {"$sum": "$skus.net_quantity"},
                "net_revenue_minor": {"$sum": "$skus.net_revenue_minor"},
                "placed_quantity": {"$sum": "$skus.placed_quantity"},
                "cancelled_quantity": {"$sum": "$skus.cancelled_quantity"},
            }
        },
        {
            "$group": {
                "_id": "$_id.currency",
                "by_quantity": {"$topN": {"n": query.top_n, "sortBy": BY_QUANTITY, "output": _SKU_OUTPUT}},
                "by_revenue": {"$topN": {"n": query.top_n, "sortBy": BY_REVENUE, "output": _SKU_OUTPUT}},
            }
        },
    ]


class SalesReportReader:
    """Queries on the sales report collection."""

    def __init__(self, database: AsyncDatabase[Document], registry: CollectorRegistry | None = None) -> None:
        self._reports: AsyncCollection[Document] = database[SALES_COLLECTION]
        self._deps = dependency_metrics(registry)

    def use_database(self, database: AsyncDatabase[Document]) -> None:
        """Reads from `database` from now on (another generation of the read model, of the same shape)."""
        self._reports = database[SALES_COLLECTION]

    @property
    def collection(self) -> AsyncCollection[Document]:
        return self._reports

    async def report(self, query: SalesQuery) -> SalesReport:
        """The day rows and the top SKUs of the query's range."""
        reports = self._reports  # one generation for both reads, even if it is switched meanwhile
        with read_model_outage():
            async with self._deps.timed("mongodb", "sales_report"):
                cursor = reports.find(days_filter(query), {"skus": 0}).sort([("day", 1), ("currency", 1)])
                days = await cursor.to_list()
                tops = await (await reports.aggregate(top_skus_pipeline(query))).to_list()
        result = SalesReport(days=days)
        for top in tops:
            currency = str(top["_id"])
            result.top_by_quantity[currency] = _listed(top.get("by_quantity"))
            result.top_by_revenue[currency] = _listed(top.get("by_revenue"))
        return result


def _listed(value: Any) -> list[Document]:
    return [dict(item) for item in value] if isinstance(value, list) else []
