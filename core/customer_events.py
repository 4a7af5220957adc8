"""Events of the Customer aggregate. Type names are permanent; see core.events for evolving a shape."""

from __future__ import annotations

from dataclasses import dataclass

from core.events import Event, register

CUSTOMER_STREAM_TYPE = "customer"


@register("CustomerRegistered")
@dataclass(frozen=True, slots=True)
class CustomerRegistered(Event):
    customer_id: str
    name: str
    email: str  # normalised: trimmed, lower-case


@register("CustomerRenamed")
@dataclass(frozen=True, slots=True)
class CustomerRenamed(Event):
    name: str


@register("CustomerEmailChanged")
@dataclass(frozen=True, slots=True)
class CustomerEmailChanged(Event):
    email: str  # normalised


@register("CustomerDeactivated")
@dataclass(frozen=True, slots=True)
class CustomerDeactivated(Event):
    pass
