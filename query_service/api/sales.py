"""GetSalesReport: its request checks and its response, for the OrderQueryService table (`api/orders.py`)."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from typing import Any, Final

from cqrs.orders.v1 import consistency_pb2
from cqrs.orders.v1 import query_service_pb2 as pb

from core.errors import FieldViolation, InvalidArgument
from core.projections.sales import average_minor
from query_service.sales_report import SalesQuery, SalesReport, SalesReportReader

MAX_DAYS: Final = 366  # a year, leap or not, in one request
DEFAULT_TOP_N: Final = 10
MAX_TOP_N: Final = 100
_DATE: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_CURRENCY: Final = re.compile(r"[A-Z]{3}")
_TOTALS: Final = ("placed_orders", "cancelled_orders", "placed_revenue_minor", "cancelled_revenue_minor")


def _date(raw: str, field: str, violations: list[FieldViolation]) -> dt.date | None:
    if not raw:
        violations.append(FieldViolation(field, "is required: a UTC date as YYYY-MM-DD, e.g. 2026-01-31"))
        return None
    # `date.fromisoformat` alone would also take "20260131" and week dates; the API promises one spelling.
    if _DATE.fullmatch(raw):
        try:
            return dt.date.fromisoformat(raw)
        except ValueError:
            pass
    violations.append(FieldViolation(field, "must be a calendar date as YYYY-MM-DD, e.g. 2026-01-31"))
    return None


def parse_sales_report_request(request: pb.GetSalesReportRequest) -> SalesQuery:
    """The validated range, currency and list length of a GetSalesReport request; all field errors at once."""
    violations: list[FieldViolation] = []
    first = _date(request.from_date, "from_date", violations)
    last = _date(request.to_date, "to_date", violations)
    if first is not None and last is not None:
        days = (last - first).days + 1
        if days < 1:
            violations.append(FieldViolation("to_date", f"must not be before from_date ({first.isoformat()})"))
        elif days > MAX_DAYS:
            violations.append(
                FieldViolation("to_date", f"the range covers {days} days; at most {MAX_DAYS} are allowed")
            )
    if request.currency and not _CURRENCY.fullmatch(request.currency):
        violations.append(
            FieldViolation("currency", "must be an ISO 4217 code of three upper-case letters, e.g. EUR (or empty)")
        )
    if not 0 <= request.top_n <= MAX_TOP_N:
        violations.append(
            FieldViolation("top_n", f"must be between 0 and {MAX_TOP_N} (0: the default, {DEFAULT_TOP_N})")
        )
    if violations:
        raise InvalidArgument(violations)
    assert first is not None and last is not None
    return SalesQuery(first.isoformat(), last.isoformat(), request.currency, request.top_n or DEFAULT_TOP_N)


def _int(doc: Mapping[str, Any], name: str) -> int:
    return int(doc.get(name) or 0)


def day_from_document(doc: Mapping[str, Any]) -> pb.SalesReportDay:
    return pb.SalesReportDay(
        date=str(doc["day"]),
        currency=str(doc["currency"]),
        placed_orders=_int(doc, "placed_orders"),
        cancelled_orders=_int(doc, "cancelled_orders"),
        placed_revenue_minor=_int(doc, "placed_revenue_minor"),
        cancelled_revenue_minor=_int(doc, "cancelled_revenue_minor"),
        net_revenue_minor=_int(doc, "net_revenue_minor"),
        average_order_value_minor=_int(doc, "average_order_value_minor"),
    )


def _sku(item: Mapping[str, Any]) -> pb.SkuSales:
    return pb.SkuSales(
        sku=str(item.get("sku") or ""),
        net_quantity=_int(item, "net_quantity"),
        net_revenue_minor=_int(item, "net_revenue_minor"),
        placed_quantity=_int(item, "placed_quantity"),
        cancelled_quantity=_int(item, "cancelled_quantity"),
    )


def currency_totals(days: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, int]]:
    """Each currency's sums over the day documents (pure)."""
    totals: dict[str, dict[str, int]] = {}
    for doc in days:
        sums = totals.setdefault(str(doc["currency"]), dict.fromkeys(_TOTALS, 0))
        for name in _TOTALS:
            sums[name] += _int(doc, name)
    return totals


def response_of(report: SalesReport, consistency: consistency_pb2.ReadConsistency) -> pb.GetSalesReportResponse:
    response = pb.GetSalesReportResponse(days=[day_from_document(d) for d in report.days], consistency=consistency)
    for currency, sums in sorted(currency_totals(report.days).items()):
        response.currencies.append(
            pb.SalesReportCurrency(
                currency=currency,
                **sums,
                net_revenue_minor=sums["placed_revenue_minor"] - sums["cancelled_revenue_minor"],
                average_order_value_minor=average_minor(sums["placed_revenue_minor"], sums["placed_orders"]),
                top_by_quantity=[_sku(i) for i in report.top_by_quantity.get(currency, [])],
                top_by_revenue=[_sku(i) for i in report.top_by_revenue.get(currency, [])],
            )
        )
    return response


async def read_sales_report(
    reader: SalesReportReader, query: SalesQuery, consistency: consistency_pb2.ReadConsistency
) -> pb.GetSalesReportResponse:
    return response_of(await reader.report(query), consistency)
