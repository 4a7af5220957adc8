"""Derived documents checked against their own side's sources: hot keys that never hold still under load.

A busy customer's order statistics, today's sales report and the customer fields copied onto orders change with
every batch that touches them, so on a busy system no comparison that reads them twice (the rebuild's shadow
comparison, verify's re-checks) may see them caught up: the projector jumps past the state compared against
between two reads. Such a document is still checkable: it is a function of other documents of its own read model
(the orders of the customer or of the day, the order's customer), which are checked one by one. So the document is
read, then its sources right after, and this release's fold of those sources (the projector's own code) must equal
it; a batch landing between the two reads only makes that attempt inconclusive, and it is tried again. A document
that equals its sources' fold is right for them: what is left to check is the sources themselves.

The sales report of a busy day would seldom hold still while its day's orders are read (a read that grows with
them), and with projector replicas at different points its uncounted facts are any, not the latest: it is read
between its orders' checkpoints and the orders, and each of its sums must lie between the fold of the facts the
checkpoints say it counts and that plus the others (`cqrsctl.verify.report_bounds`).

Only differences in a view's own fields are taken (`view_of`): a customer whose registration fields differ is the
customer stream's business, which this cannot settle. Users: `cqrsctl.rebuild.hot_keys` (both sides of a
comparison), `cqrsctl.verify` (the live side, when a derived document's difference outlasts the settle time).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from pymongo.asynchronous.database import AsyncDatabase

from core.mongo_ids import find_by_ids
from core.order_events import ORDER_STREAM_TYPE
from core.projections.customers import COLLECTION as CUSTOMERS_COLLECTION
from core.projections.orders import COLLECTION as ORDERS_COLLECTION
from core.projections.sales import SALES_COLLECTION, SalesKey, parse_key
from core.read_model import CHECKPOINTS_COLLECTION
from cqrsctl.verify.compare import diff_documents
from cqrsctl.verify.report_bounds import ReportBounds
from projector.order_stats import counted_orders, order_stats_from_groups, order_stats_groups
from projector.registry import CUSTOMER_ORDER_STATS, ORDER_CUSTOMER_FIELDS, SALES_REPORT

Doc = dict[str, Any]
Database = AsyncDatabase[Doc]

# How long one view's documents are tried on one side, and the pause between two attempts: a side is caught between
# two of its batches within a few tries. One attempt reads what a document is computed from, which grows with the
# customer's orders or the day's (about 0.3 s per 1,000 orders on the MongoDB-wire test server, idle): on a busy
# system a key with many sources may not hold within this time, and stays a difference.
SECONDS_PER_VIEW: Final = 5.0
PAUSE_SECONDS: Final = 0.05

# How far a projector's clock (a checkpoint's `updated_at`) may be behind the clock that dated the facts.
CLOCK_SKEW_MARGIN: Final = timedelta(hours=1)
# What of an order its sales facts are made of, and its version (to tell whether its checkpoint covers them).
_FACT_FIELDS: Final = dict.fromkeys(
    ("currency", "placed_at", "cancelled_at", "total_minor", "lines.sku", "lines.quantity", "lines.line_total_minor",
     "version"),
    1,
)  # fmt: skip

# Whether a field path of a collection's documents is left out of the comparison (`--ignore-field`).
Ignores = Callable[[str, str], bool]
# The ids of one collection's documents that equal this release's fold of their sources, read right after them.
SideCheck = Callable[[Database, Sequence[str], Ignores], Awaitable[set[str]]]


@dataclass(frozen=True, slots=True)
class DerivedCheck:
    collection: str
    fields: frozenset[str]  # the view's fields there: a difference only in these is the view's
    owns_collection: bool  # whole documents are the view's (a missing one too)
    check: SideCheck


def _differs(collection: str, stored: Mapping[str, Any] | None, folded: Mapping[str, Any] | None,
             ignored: Ignores, ranges: Mapping[str, tuple[int, int]] | None = None) -> bool:  # fmt: skip
    if stored is None or folded is None:
        return (stored is None) != (folded is None)
    return any(not ignored(collection, d.path) for d in diff_documents(folded, stored, ranges))


async def _by_id(database: Database, collection: str, ids: Iterable[str], fields: Iterable[str]) -> dict[str, Doc]:
    return await find_by_ids(database[collection], ids, dict.fromkeys(fields, 1))


async def _order_stats(database: Database, ids: Sequence[str], ignored: Ignores) -> set[str]:
    """The customers whose statistics are the projector's recompute from their orders as stored right after."""
    stored = await _by_id(database, CUSTOMERS_COLLECTION, ids, ["order_stats"])
    present = [customer_id for customer_id in ids if customer_id in stored]
    sizes = {customer_id: counted_orders(stored[customer_id].get("order_stats")) for customer_id in present}
    groups = await order_stats_groups(database[ORDERS_COLLECTION], present, sizes)
    folded = order_stats_from_groups(present, groups)
    return {
        customer_id for customer_id in present
        if not _differs(CUSTOMERS_COLLECTION, {"order_stats": stored[customer_id].get("order_stats")},
                        {"order_stats": folded[customer_id].stats}, ignored)
    }  # fmt: skip


_CUSTOMER_FIELDS: Final = {"customer_name": "name", "customer_email": "email", "customer_version": "version"}


async def _customer_fields(database: Database, ids: Sequence[str], ignored: Ignores) -> set[str]:
    """The orders whose copied customer fields are those of their customer's document as stored right after."""
    orders = await _by_id(database, ORDERS_COLLECTION, ids, ["customer_id", *_CUSTOMER_FIELDS])
    customer_ids = {str(order.get("customer_id")) for order in orders.values()}
    customers = await _by_id(database, CUSTOMERS_COLLECTION, customer_ids, _CUSTOMER_FIELDS.values())
    held: set[str] = set()
    for order_id, order in orders.items():
        customer = customers.get(str(order.get("customer_id")))
        copied = {field: order.get(field) for field in _CUSTOMER_FIELDS}
        source = {field: (customer or {}).get(name) for field, name in _CUSTOMER_FIELDS.items()}
        if customer is not None and not _differs(ORDERS_COLLECTION, copied, source, ignored):
            held.add(order_id)
    return held


async def _sales_reports(database: Database, ids: Sequence[str], ignored: Ignores) -> set[str]:
    """The report documents right for the orders placed or cancelled on their day in their currency: read after
    those orders' checkpoints and before the orders, each additive figure between the fold of the facts the
    checkpoints say it counts and that plus the others (`cqrsctl.verify.report_bounds`), the rest following from
    its own sums; a report with no such certain fact may be missing (its facts are all in flight)."""
    held: set[str] = set()
    for key_id in ids:
        key = parse_key(key_id)
        if key is not None and await _report_held(database, key, ignored):
            held.add(key_id)
    return held


async def _report_held(database: Database, key: SalesKey, ignored: Ignores) -> bool:
    start, end = key.window()
    # Read before the report: the facts at or below these were rolled up into it. Only checkpoints written since the
    # day began (less a margin for the projectors' clocks) can cover a fact of the day; one missed only widens the
    # bounds. One pass over the checkpoints, where reading them by the day's order ids would take a read of those
    # orders more (and on the MongoDB-wire test server an `_id: {$in}` scans as much).
    since = start - CLOCK_SKEW_MARGIN
    cursor = database[CHECKPOINTS_COLLECTION].find(
        {"stream_type": ORDER_STREAM_TYPE, "updated_at": {"$gte": since}}, {"version": 1}
    )
    checkpoints = {str(doc["_id"]): int(doc.get("version") or 0) async for doc in cursor}
    report = await database[SALES_COLLECTION].find_one({"_id": key.id})
    window = {"$gte": start, "$lt": end}
    of_the_day = {"currency": key.currency, "$or": [{"placed_at": window}, {"cancelled_at": window}]}
    bounds = ReportBounds(key)
    async for order in database[ORDERS_COLLECTION].find(of_the_day, _FACT_FIELDS):
        bounds.add(order, checkpoints.get(str(order["_id"]), 0))
    if report is None:
        return bounds.certain_facts == 0
    expected, ranges = bounds.expected(report)
    return not _differs(SALES_COLLECTION, report, expected, ignored, ranges)


# One per derived view of `projector.registry.VIEWS`, by its name (a test checks none is missing).
DERIVED_CHECKS: Final = {
    CUSTOMER_ORDER_STATS.name: DerivedCheck(CUSTOMER_ORDER_STATS.collection, CUSTOMER_ORDER_STATS.fields, False,
                                            _order_stats),
    ORDER_CUSTOMER_FIELDS.name: DerivedCheck(ORDER_CUSTOMER_FIELDS.collection, ORDER_CUSTOMER_FIELDS.fields, False,
                                             _customer_fields),
    SALES_REPORT.name: DerivedCheck(SALES_REPORT.collection, SALES_REPORT.fields, True, _sales_reports),
}  # fmt: skip


def view_of(collection: str, paths: Iterable[str], both_present: bool) -> str | None:
    """The derived view (its name) a difference lies entirely in, if any: in a collection a view owns, any; else
    one between two documents in the view's fields only (`paths`, dotted)."""
    fields = list(paths)
    for name, view in DERIVED_CHECKS.items():
        if view.collection != collection:
            continue
        if view.owns_collection:
            return name
        if both_present and fields and all(path.partition(".")[0] in view.fields for path in fields):
            return name
    return None


async def held_on_own_sources(
    view: str, database: Database, ids: Sequence[str], ignored: Ignores,
    *, seconds: float = SECONDS_PER_VIEW, pause: float = PAUSE_SECONDS,
) -> set[str]:  # fmt: skip
    """The ids of `view`'s documents in `database` that equalled their sources' fold at one attempt or another,
    attempts made for up to `seconds` (at least one)."""
    check = DERIVED_CHECKS[view].check
    deadline = time.monotonic() + seconds
    held: set[str] = set()
    left = list(ids)
    while left:
        held |= await check(database, left, ignored)
        left = [doc_id for doc_id in left if doc_id not in held]
        if time.monotonic() + pause >= deadline:
            break
        await asyncio.sleep(pause)
    return held
