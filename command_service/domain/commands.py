"""Commands of the Order aggregate: what a caller asks for, in the imperative.

A command is plain data checked by `validation.validate` and judged by `order.decide`; it knows nothing about gRPC
(the API layer builds it from a request) and nothing about idempotency or concurrency (handlers deal with those).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from core.values import Address


@dataclass(frozen=True, slots=True)
class CreateOrder:
    """Opens a DRAFT order; `order_id` is a fresh UUID chosen by the caller (the API layer)."""

    order_id: str
    customer_id: str
    currency: str
    shipping_address: Address


@dataclass(frozen=True, slots=True)
class AddOrderItem:
    """Adds a line for a SKU that the order does not have yet."""

    order_id: str
    sku: str
    name: str
    quantity: int
    unit_price_minor: int


@dataclass(frozen=True, slots=True)
class RemoveOrderItem:
    """Removes the line of a SKU."""

    order_id: str
    sku: str


@dataclass(frozen=True, slots=True)
class ChangeItemQuantity:
    """Sets the quantity of an existing line (to remove a line use RemoveOrderItem)."""

    order_id: str
    sku: str
    quantity: int


@dataclass(frozen=True, slots=True)
class ChangeShippingAddress:
    """Replaces the shipping address of a DRAFT order."""

    order_id: str
    shipping_address: Address


@dataclass(frozen=True, slots=True)
class PlaceOrder:
    """Freezes a DRAFT order that has at least one line."""

    order_id: str


@dataclass(frozen=True, slots=True)
class CancelOrder:
    """Cancels a DRAFT or PLACED order, saying why."""

    order_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class DeleteOrder:
    """Deletes an order in any status; its events stay in the event store."""

    order_id: str


OrderCommand: TypeAlias = (
    CreateOrder
    | AddOrderItem
    | RemoveOrderItem
    | ChangeItemQuantity
    | ChangeShippingAddress
    | PlaceOrder
    | CancelOrder
    | DeleteOrder
)
"""Every command the Order aggregate accepts."""
