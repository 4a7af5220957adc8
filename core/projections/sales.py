"""The sales report: per UTC day and currency, what was sold and what was cancelled (pure: shapes, rows, fold).

Document shape (collection `sales_daily`, one document per day and currency, `_id` = `"<day>/<currency>"`)::

    {_id, day: "YYYY-MM-DD", currency,
     placed_orders, cancelled_orders, placed_revenue_minor, cancelled_revenue_minor, net_revenue_minor,
     average_order_value_minor,
     skus: [{sku, placed_quantity, cancelled_quantity, net_quantity,
             placed_revenue_minor, cancelled_revenue_minor, net_revenue_minor}],   (by sku)
     report_version}

What counts, and on which day (the UTC date of the event's `recorded_at`):

* **a placement** (`OrderPlaced`) counts on its day: one placed order, its total as placed revenue, each line's
  quantity and total for its SKU;
* **a cancellation of a placed order** (`OrderCancelled` after `OrderPlaced`) counts on *its* day, symmetric with
  the placement: one cancelled order, the same total as cancelled revenue, the same quantities and line totals as
  cancelled for each SKU. An order placed on D1 and cancelled on D2 is +total on D1 and -total on D2; the net
  figures of a range that holds both days come out at zero. Cancelling a draft counts nowhere (nothing was sold);
* **a deletion** changes nothing: it hides the order from order queries, it does not undo a sale (a sale that
  should not count is cancelled). Deleted orders stay in `orders` as tombstones, so the report still sees them;
* the average order value is the placed revenue divided by the placed orders of the day, rounded half up to a
  whole minor unit (0 on a day without placements). Money stays integer minor units throughout.

The report is never incremented: after a batch places or cancels orders, the documents of the days and
currencies those orders touch are recomputed from the `orders` documents with one aggregation
(`sales_rows_pipeline`, served by `SALES_ORDER_INDEXES`) and folded by `sales_documents`. Applying a batch twice, or
in other batch boundaries, therefore gives the same documents. `report_version` is the number of facts
(placements plus cancellations) a document summarises: a day's facts only ever grow, so a write replaces a
document only if it summarises at least as many, and two writers racing with different snapshots leave the
fuller one. It depends only on the facts, not on when they were counted, so a rebuild writes the same value.

`cqrs verify` builds the same rows from the orders it folds from PostgreSQL (`order_rows`, `SalesRowGroups`) and
folds them with the same `sales_documents`: one fold, two sources of rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, NamedTuple

from core.projections import Document

SALES_COLLECTION: Final = "sales_daily"
PLACED: Final = "placed"
CANCELLED: Final = "cancelled"
KINDS: Final = (PLACED, CANCELLED)
REPORT_VERSION_FIELD: Final = "report_version"

# The recomputation finds a day's orders by currency and time; the query service reads days by range.
SALES_ORDER_INDEXES: Final[tuple[tuple[tuple[str, int], ...], ...]] = (
    (("currency", 1), ("placed_at", 1)),
    (("currency", 1), ("cancelled_at", 1)),
)
REPORT_INDEXES: Final[tuple[tuple[tuple[str, int], ...], ...]] = ((("day", 1), ("currency", 1)),)

SKU_FIELDS: Final = (
    "sku", "placed_quantity", "cancelled_quantity", "net_quantity",
    "placed_revenue_minor", "cancelled_revenue_minor", "net_revenue_minor",
)  # fmt: skip
_SKU_SUMS: Final = ("placed_quantity", "cancelled_quantity", "placed_revenue_minor", "cancelled_revenue_minor")
FIELDS: Final = frozenset(
    {
        "_id", "day", "currency", "placed_orders", "cancelled_orders", "placed_revenue_minor",
        "cancelled_revenue_minor", "net_revenue_minor", "average_order_value_minor", "skus", REPORT_VERSION_FIELD,
    }
)  # fmt: skip

# One `$group` row of `sales_rows_pipeline`: `{_id: {day, currency, kind, sku}, orders, quantity, revenue_minor}`.
# The order row of a (day, currency, kind) has `sku: None` and counts orders and their totals; each SKU row adds
# up that SKU's lines (quantity and line totals; `orders` 0).
Row = dict[str, Any]


class SalesKey(NamedTuple):
    day: str  # YYYY-MM-DD, UTC
    currency: str

    @property
    def id(self) -> str:
        return f"{self.day}/{self.currency}"

    def window(self) -> tuple[dt.datetime, dt.datetime]:
        """The day as a half-open UTC interval [start, end)."""
        start = dt.datetime.combine(dt.date.fromisoformat(self.day), dt.time(), tzinfo=dt.UTC)
        return start, start + dt.timedelta(days=1)


def parse_key(key_id: str) -> SalesKey | None:
    """The key of a document id (None when it is not one: `YYYY-MM-DD/<currency>`)."""
    day, sep, currency = key_id.partition("/")
    if not sep or not currency:
        return None
    try:
        dt.date.fromisoformat(day)
    except ValueError:
        return None
    return SalesKey(day, currency) if len(day) == 10 else None


def day_of(at: dt.datetime) -> str:
    """The UTC calendar day of an instant, as stored (`YYYY-MM-DD`)."""
    return at.astimezone(dt.UTC).date().isoformat()


def facts_of(order: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(kind, day) of each fact an order document contributes: its placement, then its cancellation if it was
    cancelled after being placed; nothing for a draft (cancelled or not)."""
    placed_at = order.get("placed_at")
    if not isinstance(placed_at, dt.datetime):
        return []
    facts = [(PLACED, day_of(placed_at))]
    cancelled_at = order.get("cancelled_at")
    if isinstance(cancelled_at, dt.datetime):
        facts.append((CANCELLED, day_of(cancelled_at)))
    return facts


def keys_of_order(order: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The report documents (ids) an order document counts in."""
    if order is None:
        return ()
    currency = str(order.get("currency") or "")
    return tuple(sorted({SalesKey(day, currency).id for _, day in facts_of(order)}))


def report_keys(_stream_type: str, _stream_id: str, doc: Document | None) -> tuple[str, ...]:
    """`DerivedView.keys_from` of the report: the days (and currency) the order was placed and cancelled on."""
    return keys_of_order(doc)


def _row(key: SalesKey, kind: str, sku: str | None, orders: int, quantity: int, revenue_minor: int) -> Row:
    return {
        "_id": {"day": key.day, "currency": key.currency, "kind": kind, "sku": sku},
        "orders": orders,
        "quantity": quantity,
        "revenue_minor": revenue_minor,
    }


def order_rows(order: Mapping[str, Any]) -> list[Row]:
    """The ungrouped rows one order document contributes: what `sales_rows_pipeline` sums, per order (pure)."""
    currency = str(order.get("currency") or "")
    rows: list[Row] = []
    for kind, day in facts_of(order):
        key = SalesKey(day, currency)
        rows.append(_row(key, kind, None, 1, 0, int(order.get("total_minor") or 0)))
        for line in order.get("lines") or ():
            rows.append(_row(key, kind, str(line["sku"]), 0, int(line["quantity"]), int(line["line_total_minor"])))
    return rows


class SalesRowGroups:
    """Rows summed by `_id`, as the pipeline's `$group` would: for verify, fed with one order at a time."""

    def __init__(self) -> None:
        self._sums: dict[SalesKey, dict[tuple[str, str | None], list[int]]] = {}

    def add(self, rows: Iterable[Row]) -> None:
        for row in rows:
            group = row["_id"]
            key = SalesKey(str(group["day"]), str(group["currency"]))
            sums = self._sums.setdefault(key, {}).setdefault((str(group["kind"]), group["sku"]), [0, 0, 0])
            sums[0] += int(row["orders"])
            sums[1] += int(row["quantity"])
            sums[2] += int(row["revenue_minor"])

    def keys(self) -> list[SalesKey]:
        return sorted(self._sums)

    def rows(self, keys: Iterable[SalesKey] | None = None) -> list[Row]:
        wanted = self.keys() if keys is None else keys
        return [_row(key, kind, sku, *sums) for key in wanted for (kind, sku), sums in self._sums.get(key, {}).items()]


def rows_from_orders(orders: Iterable[Mapping[str, Any]], keys: Iterable[SalesKey] | None = None) -> list[Row]:
    """The `$group` rows of `sales_rows_pipeline(keys)` computed from order documents in Python (pure)."""
    groups = SalesRowGroups()
    for order in orders:
        groups.add(order_rows(order))
    return groups.rows(keys)


def _is_date(path: str) -> dict[str, Any]:
    return {"$eq": [{"$type": path}, "date"]}


def sales_rows_pipeline(keys: Sequence[SalesKey]) -> list[dict[str, Any]]:
    """The aggregation over `orders` that yields the rows (see `Row`) of these days and currencies.

    The first `$match` is one indexed range per key and fact (`SALES_ORDER_INDEXES`); each matched order then yields
    one entry per fact, dated, and only the facts of the keys asked for are kept (an order placed on an asked
    day may have been cancelled on another)."""
    if not keys:
        raise ValueError("no keys to aggregate")
    ranges: list[dict[str, Any]] = []
    for key in keys:
        start, end = key.window()
        ranges.append({"currency": key.currency, "placed_at": {"$gte": start, "$lt": end}})
        ranges.append(
            {"currency": key.currency, "cancelled_at": {"$gte": start, "$lt": end}, "placed_at": {"$type": "date"}}
        )
    facts = [{"kind": PLACED, "at": "$placed_at"}, {"kind": CANCELLED, "at": "$cancelled_at"}]
    order_item = {"sku": None, "orders": 1, "quantity": 0, "revenue_minor": "$total_minor"}
    line_item = {
        "sku": "$$this.sku", "orders": 0, "quantity": "$$this.quantity", "revenue_minor": "$$this.line_total_minor"
    }  # fmt: skip
    return [
        {"$match": {"$or": ranges}},
        {
            "$project": {
                "_id": 0, "currency": 1, "lines": 1, "total_minor": 1,
                "facts": {"$filter": {"input": facts, "cond": _is_date("$$this.at")}},
            }
        },
        {"$unwind": "$facts"},
        {
            "$project": {
                "currency": 1, "lines": 1, "total_minor": 1, "kind": "$facts.kind",
                "day": {"$dateToString": {"format": "%Y-%m-%d", "date": "$facts.at"}},
            }
        },
        {"$match": {"$or": [{"day": key.day, "currency": key.currency} for key in keys]}},
        {
            "$project": {
                "day": 1, "currency": 1, "kind": 1,
                "items": {"$concatArrays": [[order_item], {"$map": {"input": "$lines", "in": line_item}}]},
            }
        },
        {"$unwind": "$items"},
        {
            "$group": {
                "_id": {"day": "$day", "currency": "$currency", "kind": "$kind", "sku": "$items.sku"},
                "orders": {"$sum": "$items.orders"},
                "quantity": {"$sum": "$items.quantity"},
                "revenue_minor": {"$sum": "$items.revenue_minor"},
            }
        },
    ]  # fmt: skip


def average_minor(total_minor: int, count: int) -> int:
    """`total / count` rounded half up to a whole minor unit (0 when `count` is 0); integers only."""
    if count <= 0:
        return 0
    return (2 * total_minor + count) // (2 * count)


def _empty_report(key: SalesKey) -> Document:
    return {
        "_id": key.id,
        "day": key.day,
        "currency": key.currency,
        "placed_orders": 0,
        "cancelled_orders": 0,
        "placed_revenue_minor": 0,
        "cancelled_revenue_minor": 0,
    }


def sales_documents(rows: Iterable[Row]) -> dict[str, Document]:
    """The report documents, by id, of every day and currency the rows mention (pure; rows in any order)."""
    reports: dict[str, Document] = {}
    skus: dict[str, dict[str, dict[str, int]]] = {}
    for row in rows:
        group = row["_id"]
        kind = str(group["kind"])
        if kind not in KINDS:
            raise ValueError(f"unknown kind of sales fact {kind!r}")
        key = SalesKey(str(group["day"]), str(group["currency"]))
        report = reports.setdefault(key.id, _empty_report(key))
        sku = group.get("sku")
        if sku is None:
            report[f"{kind}_orders"] += int(row["orders"])
            report[f"{kind}_revenue_minor"] += int(row["revenue_minor"])
            continue
        entry = skus.setdefault(key.id, {}).setdefault(str(sku), dict.fromkeys(_SKU_SUMS, 0))
        entry[f"{kind}_quantity"] += int(row["quantity"])
        entry[f"{kind}_revenue_minor"] += int(row["revenue_minor"])
    for key_id, report in reports.items():
        placed, cancelled = report["placed_revenue_minor"], report["cancelled_revenue_minor"]
        report["net_revenue_minor"] = placed - cancelled
        report["average_order_value_minor"] = average_minor(placed, report["placed_orders"])
        report["skus"] = [_sku_entry(sku, entry) for sku, entry in sorted(skus.get(key_id, {}).items())]
        report[REPORT_VERSION_FIELD] = report["placed_orders"] + report["cancelled_orders"]
    return reports


def _sku_entry(sku: str, sums: dict[str, int]) -> Document:
    return {
        "sku": sku,
        "placed_quantity": sums["placed_quantity"],
        "cancelled_quantity": sums["cancelled_quantity"],
        "net_quantity": sums["placed_quantity"] - sums["cancelled_quantity"],
        "placed_revenue_minor": sums["placed_revenue_minor"],
        "cancelled_revenue_minor": sums["cancelled_revenue_minor"],
        "net_revenue_minor": sums["placed_revenue_minor"] - sums["cancelled_revenue_minor"],
    }
