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

How it is kept, idempotently and at a cost that does not grow with the day's sales: each fact is counted once, in
one of `SHARDS` *shard* documents of its day and currency (collection `sales_shards`, the shard chosen by the order
id), by a single-document update that adds the fact's figures and records the fact's tag (`<order id>:<kind>`) in
the shard's `counted` list, guarded by the tag not being there yet (`fact_update`). A redelivered batch, a replay
or a concurrent replica finds the tag and changes nothing. A batch counts only the facts of events above its
order's checkpoint (`fact_updates(above=...)`): the facts at or below it were counted before the checkpoint got
there. So a tag is needed only until its order's checkpoint covers it, and `projector.sales_tags` forgets it after
that: the `counted` lists hold the facts in flight, not every fact of the day. The report document of a day and
currency is then rolled up from its shards (`shard_rows` folded by `sales_documents`) and replaced, guarded by
`report_version`: the number of facts (placements plus cancellations) it summarises, which only grows, so a
roll-up from an older snapshot, by a replica that lost a race, never replaces a fuller report. A rebuild counts
the same facts and writes the same documents.

`cqrs verify` builds the same rows from the orders it folds from PostgreSQL (`order_rows`, `SalesRowGroups`) and
folds them with the same `sales_documents`: one fold, two sources of rows.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterable, Mapping
from typing import Any, Final, NamedTuple

from core.projections import Document
from core.read_model import ORDER_HISTORY_FIELD

SALES_COLLECTION: Final = "sales_daily"
SHARDS_COLLECTION: Final = "sales_shards"
# Shard documents per day and currency: a fact update and a roll-up touch one shard and read all of them; more
# shards keep each `counted` list shorter (orders of the day / SHARDS tags).
SHARDS: Final = 16
COUNTED_FIELD: Final = "counted"
PLACED: Final = "placed"
CANCELLED: Final = "cancelled"
KINDS: Final = (PLACED, CANCELLED)
REPORT_VERSION_FIELD: Final = "report_version"
# The event behind each kind of fact (its version, in the order's change log, is the fact's).
_FACT_EVENTS: Final = {"OrderPlaced": PLACED, "OrderCancelled": CANCELLED}

# The query service reads days by range; the roll-up reads the shards of a day.
REPORT_INDEXES: Final[tuple[tuple[tuple[str, int], ...], ...]] = ((("day", 1), ("currency", 1)),)
SHARD_INDEXES: Final[tuple[tuple[tuple[str, int], ...], ...]] = ((("day", 1), ("currency", 1)),)

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

# One row of summed facts: `{_id: {day, currency, kind, sku}, orders, quantity, revenue_minor}` (from the shards, or
# from order documents for verify).
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


def fact_instants(order: Mapping[str, Any]) -> list[tuple[str, dt.datetime]]:
    """(kind, instant) of each fact an order document contributes: its placement, then its cancellation if it was
    cancelled after being placed; nothing for a draft (cancelled or not)."""
    placed_at = order.get("placed_at")
    if not isinstance(placed_at, dt.datetime):
        return []
    facts = [(PLACED, placed_at)]
    cancelled_at = order.get("cancelled_at")
    if isinstance(cancelled_at, dt.datetime):
        facts.append((CANCELLED, cancelled_at))
    return facts


def facts_of(order: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(kind, day) of each fact an order document contributes (`fact_instants`, by UTC day)."""
    return [(kind, day_of(at)) for kind, at in fact_instants(order)]


def keys_of_order(order: Mapping[str, Any] | None) -> tuple[str, ...]:
    """The report documents (ids) an order document counts in."""
    if order is None:
        return ()
    currency = str(order.get("currency") or "")
    return tuple(sorted({SalesKey(day, currency).id for _, day in facts_of(order)}))


def report_keys(_stream_type: str, stream_id: str, doc: Document | None) -> tuple[str, ...]:
    """`DerivedView.keys_from` of the report: the order itself, when it has facts to count (its writer counts
    them and rolls up the days they count on)."""
    return (stream_id,) if doc is not None and facts_of(doc) else ()


def shard_of(order_id: str) -> int:
    """The shard an order's facts are counted in (stable across processes and releases)."""
    return int.from_bytes(hashlib.blake2b(order_id.encode(), digest_size=4).digest(), "big") % SHARDS


def shard_id(key: SalesKey, shard: int) -> str:
    return f"{key.id}/{shard:02d}"


def _sku_field(sku: str) -> str:
    # SKUs are free text ("." and "$" would be paths and operators): the shard's map is keyed by their hex form.
    return "x" + sku.encode().hex()


def fact_versions(order: Mapping[str, Any]) -> dict[str, int]:
    """The version of the event behind each kind of fact, from the order's change log (pure)."""
    versions: dict[str, int] = {}
    for entry in order.get(ORDER_HISTORY_FIELD) or ():
        kind = _FACT_EVENTS.get(str(entry.get("event_type")))
        if kind is not None:
            versions.setdefault(kind, int(entry.get("version") or 0))
    return versions


def fact_updates(order_id: str, order: Mapping[str, Any], above: int = 0) -> list[tuple[str, str, Document]]:
    """(shard id, fact tag, update) of each fact of an order document whose event's version is above `above` (its
    checkpoint: the facts at or below it are counted already); the update adds the fact's figures to the shard and
    records its tag; applied with the filter `{_id: shard id, counted: {$ne: tag}}` (pure). A fact whose event the
    change log does not show (a document without one) counts whatever `above` says, guarded by its tag alone."""
    currency = str(order.get("currency") or "")
    lines: dict[str, list[int]] = {}
    for line in order.get("lines") or ():
        sums = lines.setdefault(str(line["sku"]), [0, 0])
        sums[0] += int(line["quantity"])
        sums[1] += int(line["line_total_minor"])
    versions = fact_versions(order) if above > 0 else {}
    updates: list[tuple[str, str, Document]] = []
    for kind, day in facts_of(order):
        if versions.get(kind, above + 1) <= above:
            continue
        key = SalesKey(day, currency)
        tag = f"{order_id}:{kind}"
        increments: dict[str, int] = {f"{kind}_orders": 1, f"{kind}_revenue_minor": int(order.get("total_minor") or 0)}
        names: dict[str, Any] = {"day": day, "currency": currency}
        for sku, (quantity, revenue) in lines.items():
            field_name = _sku_field(sku)
            increments[f"skus.{field_name}.{kind}_quantity"] = quantity
            increments[f"skus.{field_name}.{kind}_revenue_minor"] = revenue
            names[f"skus.{field_name}.sku"] = sku
        update = {"$inc": increments, "$set": names, "$push": {COUNTED_FIELD: tag}}
        updates.append((shard_id(key, shard_of(order_id)), tag, update))
    return updates


def order_of_tag(tag: str) -> str:
    """The order id of a fact tag (`<order id>:<kind>`)."""
    return tag.rpartition(":")[0]


def shard_rows(shard: Mapping[str, Any]) -> list[Row]:
    """The rows a shard document sums (what `sales_documents` folds into its day's report) (pure)."""
    key = SalesKey(str(shard["day"]), str(shard["currency"]))
    rows: list[Row] = []
    for kind in KINDS:
        orders = int(shard.get(f"{kind}_orders") or 0)
        if orders:
            rows.append(_row(key, kind, None, orders, 0, int(shard.get(f"{kind}_revenue_minor") or 0)))
    for entry in (shard.get("skus") or {}).values():
        for kind in KINDS:
            quantity = int(entry.get(f"{kind}_quantity") or 0)
            revenue = int(entry.get(f"{kind}_revenue_minor") or 0)
            if quantity or revenue or f"{kind}_quantity" in entry:
                rows.append(_row(key, kind, str(entry["sku"]), 0, quantity, revenue))
    return rows


def _row(key: SalesKey, kind: str, sku: str | None, orders: int, quantity: int, revenue_minor: int) -> Row:
    return {
        "_id": {"day": key.day, "currency": key.currency, "kind": kind, "sku": sku},
        "orders": orders,
        "quantity": quantity,
        "revenue_minor": revenue_minor,
    }


def order_rows(order: Mapping[str, Any]) -> list[Row]:
    """The ungrouped rows one order document contributes, every fact's (pure)."""
    return [row for _, rows in fact_rows(order) for row in rows]


def fact_rows(order: Mapping[str, Any]) -> list[tuple[dt.datetime, list[Row]]]:
    """Each fact of an order document with its instant and its rows (pure)."""
    currency = str(order.get("currency") or "")
    facts: list[tuple[dt.datetime, list[Row]]] = []
    for kind, at in fact_instants(order):
        key = SalesKey(day_of(at), currency)
        rows = [_row(key, kind, None, 1, 0, int(order.get("total_minor") or 0))]
        for line in order.get("lines") or ():
            rows.append(_row(key, kind, str(line["sku"]), 0, int(line["quantity"]), int(line["line_total_minor"])))
        facts.append((at, rows))
    return facts


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
    """The rows of these order documents summed by day, currency, kind and SKU (pure); only those of `keys` if given."""
    groups = SalesRowGroups()
    for order in orders:
        groups.add(order_rows(order))
    return groups.rows(keys)


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
