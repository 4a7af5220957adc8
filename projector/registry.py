"""The one registry of the read model, shared by the projector, `cqrs verify` and `cqrs dead-letters`: all wiring
is in this file.

* `PROJECTIONS`: one per stream type, each a table of pure `on_<event>` handlers writing its own collection.
  Orders come first: a batch writes order documents before the views derived from them.
* `VIEWS`: the cross-model views and reports, each declaring the events after which it is recomputed. Their
  writers are `projector.pipeline.view_writers()` (`customer_views`, `order_stats`, `sales_views`); `cqrs verify`
  computes the same fields from PostgreSQL.

`registry_problems()` lists what a new event type or view missed (a test asserts it finds nothing).
"""

from __future__ import annotations

from core.events import known_event_types
from core.order_events import OrderCancelled, OrderCreated, OrderDeleted, OrderPlaced
from core.projections import EVERY_EVENT, DerivedView, Projection
from core.projections.customers import CUSTOMERS, STATS_FIELDS
from core.projections.orders import CUSTOMER_FIELDS, ORDERS
from core.projections.sales import FIELDS as SALES_FIELDS
from core.projections.sales import SALES_COLLECTION, report_keys

PROJECTIONS: tuple[Projection, ...] = (ORDERS, CUSTOMERS)

# Every order shows its customer's name and e-mail: copied when the order is created, and again after any
# customer event.
ORDER_CUSTOMER_FIELDS = DerivedView(
    name="order_customer_fields",
    collection=ORDERS.collection,
    fields=CUSTOMER_FIELDS,
    triggers={ORDERS.stream_type: frozenset({OrderCreated.event_type}), CUSTOMERS.stream_type: EVERY_EVENT},
    key_fields={ORDERS.stream_type: "customer_id", CUSTOMERS.stream_type: None},
    stamp_field="customer_version",
)

# Every customer shows counts of its orders by status and the totals of its placed orders: recomputed after the
# order events that change an order's status, existence or (for a placed order) total. Order events that only
# touch lines and addresses of draft orders change no statistic (a test checks every handler against this set).
CUSTOMER_ORDER_STATS = DerivedView(
    name="customer_order_stats",
    collection=CUSTOMERS.collection,
    fields=STATS_FIELDS,
    triggers={
        ORDERS.stream_type: frozenset(e.event_type for e in (OrderCreated, OrderPlaced, OrderCancelled, OrderDeleted))
    },
    key_fields={ORDERS.stream_type: "customer_id"},
)

# Sales per UTC day and currency (`core.projections.sales`): the documents of the days an order was placed and
# cancelled on, recomputed after those two events. Nothing else changes what the report reads of an order: lines
# change only in drafts, and a deletion does not undo a sale (a test checks every handler against this set).
SALES_REPORT = DerivedView(
    name="sales_report",
    collection=SALES_COLLECTION,
    fields=SALES_FIELDS,
    triggers={ORDERS.stream_type: frozenset(e.event_type for e in (OrderPlaced, OrderCancelled))},
    key_fields={},
    owns_collection=True,
    keys_from=report_keys,
    version=1,
)

VIEWS: tuple[DerivedView, ...] = (ORDER_CUSTOMER_FIELDS, CUSTOMER_ORDER_STATS, SALES_REPORT)


def registry_versions(
    projections: tuple[Projection, ...] = PROJECTIONS, views: tuple[DerivedView, ...] = VIEWS
) -> dict[str, int]:
    """Each projection's and view's name with its version: what a generation of the read model records it was
    built with (`cqrs rebuild --if-needed` rebuilds when the active generation's record differs)."""
    return {**{p.name: p.version for p in projections}, **{v.name: v.version for v in views}}


def projection_for(stream_type: str) -> Projection | None:
    return next((p for p in PROJECTIONS if p.stream_type == stream_type), None)


def registry_problems(
    projections: tuple[Projection, ...] = PROJECTIONS, views: tuple[DerivedView, ...] = VIEWS
) -> list[str]:
    """What the registry misses or gets wrong, in words (empty when consistent):

    every registered event type is handled by exactly one projection, every view's trigger names an event its
    stream type's projection handles, and every view's fields are declared foreign by the projection it writes
    (so the projection's own writes never overwrite them), or the view owns a collection no projection writes.
    """
    problems: list[str] = []
    handled: dict[str, list[str]] = {}
    for projection in projections:
        for event_type in projection.handlers:
            handled.setdefault(event_type, []).append(projection.name)
    for event_type in sorted(known_event_types()):
        owners = handled.get(event_type, [])
        if len(owners) != 1:
            where = ", ".join(owners) or "no projection"
            problems.append(f"event type {event_type} is handled by {where} (exactly one projection must handle it)")
    by_type = {p.stream_type: p for p in projections}
    by_collection = {p.collection: p for p in projections}
    for view in views:
        for stream_type, events in view.triggers.items():
            source = by_type.get(stream_type)
            if source is None:
                problems.append(
                    f"view {view.name} is triggered by stream type {stream_type!r}, which has no projection"
                )
                continue
            if stream_type not in view.key_fields and view.keys_from is None:
                problems.append(f"view {view.name} does not say how a {stream_type} document names its key")
            for event_type in sorted(events - EVERY_EVENT):
                if event_type not in source.handlers:
                    problems.append(f"view {view.name} is triggered by {event_type}, which {source.name} ignores")
        target = by_collection.get(view.collection)
        if view.owns_collection:
            if target is not None:
                problems.append(f"view {view.name} owns {view.collection!r}, which projection {target.name} writes")
        elif target is None:
            problems.append(f"view {view.name} writes {view.collection!r}, which no projection owns")
        elif not view.fields <= target.foreign_fields:
            missing = ", ".join(sorted(view.fields - target.foreign_fields))
            problems.append(
                f"projection {target.name} does not declare the fields of view {view.name} foreign: {missing}"
            )
    return problems
