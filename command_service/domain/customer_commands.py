"""Commands of the Customer aggregate: what a caller asks for, in the imperative.

Plain data, checked by `customer_validation.validate_customer` and judged by `customer.decide`; like the Order
commands they know nothing about gRPC, idempotency or concurrency.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True, slots=True)
class RegisterCustomer:
    """Creates a customer; `customer_id` is a fresh UUID chosen by the caller (the API layer)."""

    customer_id: str
    name: str
    email: str


@dataclass(frozen=True, slots=True)
class RenameCustomer:
    """Changes the name of an active customer."""

    customer_id: str
    name: str


@dataclass(frozen=True, slots=True)
class ChangeCustomerEmail:
    """Changes the email of an active customer (uniqueness is enforced by the event store, not here)."""

    customer_id: str
    email: str


@dataclass(frozen=True, slots=True)
class DeactivateCustomer:
    """Deactivates a customer for good; its events and its email reservation stay."""

    customer_id: str


CustomerCommand: TypeAlias = RegisterCustomer | RenameCustomer | ChangeCustomerEmail | DeactivateCustomer
"""Every command the Customer aggregate accepts."""
