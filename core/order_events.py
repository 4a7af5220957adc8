"""Events of the Order aggregate. Type names are permanent; see core.events for evolving a shape."""

from __future__ import annotations

from dataclasses import dataclass

from core.events import Event, register
from core.values import Address

ORDER_STREAM_TYPE = "order"


@register("OrderCreated")
@dataclass(frozen=True, slots=True)
class OrderCreated(Event):
    order_id: str
    customer_id: str
    currency: str
    shipping_address: Address


@register("OrderItemAdded")
@dataclass(frozen=True, slots=True)
class OrderItemAdded(Event):
    sku: str
    name: str
    quantity: int
    unit_price_minor: int


@register("OrderItemRemoved")
@dataclass(frozen=True, slots=True)
class OrderItemRemoved(Event):
    sku: str


@register("OrderItemQuantityChanged")
@dataclass(frozen=True, slots=True)
class OrderItemQuantityChanged(Event):
    sku: str
    quantity: int


@register("OrderShippingAddressChanged")
@dataclass(frozen=True, slots=True)
class OrderShippingAddressChanged(Event):
    shipping_address: Address


@register("OrderPlaced")
@dataclass(frozen=True, slots=True)
class OrderPlaced(Event):
    pass


@register("OrderCancelled")
@dataclass(frozen=True, slots=True)
class OrderCancelled(Event):
    reason: str


@register("OrderDeleted")
@dataclass(frozen=True, slots=True)
class OrderDeleted(Event):
    pass
