"""The Customer aggregate's write model: `decide` turns a command into events, `evolve` folds events into state.

Pure functions (no I/O, no clock), like the Order aggregate. Email uniqueness across customers is not decided
here, since it needs every other customer: the event store enforces it with a reservation written in the same
transaction, and `email_claims` tells the handler which email to reserve and which to release.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import assert_never

from command_service.domain.customer_commands import (
    ChangeCustomerEmail,
    CustomerCommand,
    DeactivateCustomer,
    RegisterCustomer,
    RenameCustomer,
)
from command_service.domain.customer_validation import normalize_email, normalize_name
from core.customer_events import CustomerDeactivated, CustomerEmailChanged, CustomerRegistered, CustomerRenamed
from core.errors import AlreadyExists, FailedPrecondition, NotFound
from core.events import Event


class CustomerStatus(StrEnum):
    """Lifecycle of a customer; deactivation is final (there is no reactivation command)."""

    ACTIVE = "ACTIVE"
    DEACTIVATED = "DEACTIVATED"


@dataclass(frozen=True, slots=True)
class CustomerState:
    """What the write model knows about one customer after its events; `version` = number of events applied."""

    customer_id: str
    name: str
    email: str
    status: CustomerStatus = CustomerStatus.ACTIVE
    version: int = 0

    @property
    def is_active(self) -> bool:
        """True until the customer is deactivated."""
        return self.status is CustomerStatus.ACTIVE


# --- evolve: events -> state ------------------------------------------------------------------------------------


def evolve(state: CustomerState | None, event: Event) -> CustomerState:
    """Applies one event and returns the new state (version + 1).

    Raises ValueError when the event cannot apply to `state`: anything but CustomerRegistered before the customer
    exists, CustomerRegistered on an existing customer, any event after CustomerDeactivated (decide never emits
    one, so such a stream is corrupt), or an event type the Customer aggregate does not know.
    """
    if isinstance(event, CustomerRegistered):
        if state is not None:
            raise ValueError(f"CustomerRegistered cannot apply: customer {state.customer_id} already exists")
        return CustomerState(customer_id=event.customer_id, name=event.name, email=event.email, version=1)
    name = type(event).__name__
    if state is None:
        raise ValueError(f"{name} cannot apply before CustomerRegistered")
    if not state.is_active:
        raise ValueError(f"{name} cannot apply: customer {state.customer_id} is deactivated")
    return replace(_apply(state, event), version=state.version + 1)


def fold(events: Iterable[Event], state: CustomerState | None = None) -> CustomerState | None:
    """Applies `events` in order onto `state` (None: the customer does not exist yet); None when there are none."""
    for event in events:
        state = evolve(state, event)
    return state


def _apply(state: CustomerState, event: Event) -> CustomerState:
    match event:
        case CustomerRenamed():
            return replace(state, name=event.name)
        case CustomerEmailChanged():
            return replace(state, email=event.email)
        case CustomerDeactivated():
            return replace(state, status=CustomerStatus.DEACTIVATED)
    raise ValueError(f"customer {state.customer_id}: the Customer aggregate has no rule for {type(event).__name__}")


# --- decide: state + command -> events ----------------------------------------------------------------------------


def decide(state: CustomerState | None, command: CustomerCommand) -> list[Event]:
    """Returns the events `command` causes on `state` ([] when it changes nothing), or raises a core.errors error.

    The command's shape was validated once on the way in (`customer_validation.validate_customer`, called by the
    command runner for every request); here: AlreadyExists for a second registration, NotFound for
    any other command on a missing customer, FailedPrecondition for any change to a deactivated customer.
    Names and emails in the events are normalised (name stripped; email stripped, lower case, NFC).
    """
    if isinstance(command, RegisterCustomer):
        return _register(state, command)
    customer = _existing(state, command.customer_id)
    if not customer.is_active:
        raise FailedPrecondition(
            f"customer {customer.customer_id} is deactivated; a deactivated customer cannot be changed"
        )
    match command:
        case RenameCustomer():
            name = normalize_name(command.name)
            return [] if name == customer.name else [CustomerRenamed(name=name)]
        case ChangeCustomerEmail():
            email = normalize_email(command.email)
            return [] if email == customer.email else [CustomerEmailChanged(email=email)]
        case DeactivateCustomer():
            return [CustomerDeactivated()]
        case _:
            assert_never(command)


def _register(state: CustomerState | None, command: RegisterCustomer) -> list[Event]:
    if state is not None:
        raise AlreadyExists(f"customer {command.customer_id} already exists")
    return [
        CustomerRegistered(
            customer_id=command.customer_id,
            name=normalize_name(command.name),
            email=normalize_email(command.email),
        )
    ]


def _existing(state: CustomerState | None, customer_id: str) -> CustomerState:
    if state is None:
        raise NotFound(f"customer {customer_id} not found")
    if state.customer_id != customer_id:
        # A handler bug (it loaded another stream), not a caller error: must never be reported as NOT_FOUND.
        raise ValueError(f"decide got the state of customer {state.customer_id} for a command on {customer_id}")
    return state


# --- email reservations -----------------------------------------------------------------------------------------


def email_claims(state_before: CustomerState | None, events: list[Event]) -> tuple[str | None, str | None]:
    """(email to reserve, email to release) for `events` that `decide` returned on `state_before`.

    Register reserves its email; an email change reserves the new one and releases the old one; every other
    outcome (including deactivation, which keeps the email reserved) touches no reservation.
    """
    reserve: str | None = None
    release: str | None = None
    for event in events:
        match event:
            case CustomerRegistered():
                reserve = event.email
            case CustomerEmailChanged():
                reserve = event.email
                # Only an email held before these events is released; one reserved by them is simply replaced.
                if release is None and state_before is not None:
                    release = state_before.email
    return reserve, release
