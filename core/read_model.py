"""The read-model contract: what the projector writes and the query service reads, declared once.

Collection names, the status values documents carry, and the indexes the queries need. The projector's
projections and the query service both import these, so a new status or collection cannot be known to one side
only (`tests/unit/test_read_model_contract.py` checks that every status maps to a proto value). Indexes are plain
`(field, 1)` key lists (ascending, generated names): whichever process creates them first, the other's
`create_indexes` is then a no-op, not a second set.

Document shapes (the projections' modules say how each field is derived):

* `orders`: `{_id, order_id, customer_id, status, currency, lines: [{sku, name, quantity, unit_price_minor,
  line_total_minor}], total_minor, shipping_address: {...}, cancel_reason, created_at, updated_at, placed_at,
  cancelled_at, version, position, deleted, customer_name, customer_email, customer_version, history: [...]}`;
  deleted orders stay as tombstones. `history` is the order's change log (`core/projections/orders.py`); reads of
  the current order leave it out.
* `customers`: `{_id, customer_id, name, email, status, registered_at, updated_at, version, position,
  order_stats: {draft_orders, placed_orders, cancelled_orders, placed_totals: [{currency, total_minor}]},
  order_stats_version, order_stats_seq, order_stats_increments}`; a document with statistics but no `version` is
  not a customer yet.
* `checkpoints`: `{_id: stream_id, version, position, ...}`: what read-your-writes waits on.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

ORDERS_COLLECTION: Final = "orders"
CUSTOMERS_COLLECTION: Final = "customers"
CHECKPOINTS_COLLECTION: Final = "checkpoints"
# The field of an order document holding its change log.
ORDER_HISTORY_FIELD: Final = "history"


class OrderStatus(StrEnum):
    DRAFT = "DRAFT"
    PLACED = "PLACED"
    CANCELLED = "CANCELLED"


# The customer statistics count orders by status, one counter per status named after it ("placed_orders"); the
# customer proto's `CustomerOrderStats` has a field of each name, and the query views copy them by name.
ORDER_STATUS_COUNTERS: Final[dict[OrderStatus, str]] = {s: f"{s.value.lower()}_orders" for s in OrderStatus}


class CustomerStatus(StrEnum):
    ACTIVE = "ACTIVE"
    DEACTIVATED = "DEACTIVATED"


IndexKeys = tuple[tuple[str, int], ...]


def _listing(*equality_fields: str) -> IndexKeys:
    # Equality fields first, then the sort keys: MongoDB walks the index (backwards for newest first) and never
    # sorts in memory.
    return tuple((name, 1) for name in ("deleted", *equality_fields, "created_at", "_id"))


# One listing index per ListOrders filter combination, and the customer fan-out's
# `update_many({customer_id, customer_version: {$lt: v}})`.
ORDER_INDEXES: Final[tuple[IndexKeys, ...]] = (
    _listing(),
    _listing("customer_id"),
    _listing("status"),
    _listing("customer_id", "status"),
    (("customer_id", 1), ("customer_version", 1)),
)

# Listing by name (keyset on name, _id, and an anchored name-prefix regex) and lookup by e-mail.
CUSTOMER_INDEXES: Final[tuple[IndexKeys, ...]] = (
    (("name", 1), ("_id", 1)),
    (("email", 1),),
)
