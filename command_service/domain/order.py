"""The Order aggregate's write model: `decide` turns a command into events, `evolve` folds events into state.

Both are pure functions of their arguments (no I/O, no clock, no randomness), so the handlers can run the
load -> decide -> append loop as often as optimistic concurrency requires, and tests need no servers.
Money is integer minor units of the order's currency throughout.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final, assert_never

from command_service.domain.commands import (
    AddOrderItem,
    CancelOrder,
    ChangeItemQuantity,
    ChangeShippingAddress,
    CreateOrder,
    DeleteOrder,
    OrderCommand,
    PlaceOrder,
    RemoveOrderItem,
)
from core.errors import AlreadyExists, FailedPrecondition, NotFound
from core.events import Event
from core.order_events import (
    OrderCancelled,
    OrderCreated,
    OrderDeleted,
    OrderItemAdded,
    OrderItemQuantityChanged,
    OrderItemRemoved,
    OrderPlaced,
    OrderShippingAddressChanged,
)
from core.values import Address, OrderLine

MAX_LINES_PER_ORDER: Final = 100
# Far above any real order, far below int64 (the proto's `total_minor`) and exact in every JSON reader that
# parses numbers as doubles (2**53 ~ 9.007e15).
MAX_ORDER_TOTAL_MINOR: Final = 10**15


class OrderStatus(StrEnum):
    """Lifecycle of an order (deletion is a separate flag: a deleted order keeps its last status)."""

    DRAFT = "DRAFT"
    PLACED = "PLACED"
    CANCELLED = "CANCELLED"


@dataclass(frozen=True, slots=True)
class OrderState:
    """What the write model knows about one order after its events; `version` = number of events applied."""

    order_id: str
    customer_id: str
    currency: str
    shipping_address: Address
    lines: tuple[OrderLine, ...] = ()
    status: OrderStatus = OrderStatus.DRAFT
    deleted: bool = False
    version: int = 0

    @property
    def total_minor(self) -> int:
        """Sum of the line totals, in minor units of `currency`."""
        return sum(line.line_total_minor for line in self.lines)

    def line_for(self, sku: str) -> OrderLine | None:
        """The line of `sku`, or None when the order has none."""
        return next((line for line in self.lines if line.sku == sku), None)


# --- evolve: events -> state ------------------------------------------------------------------------------------


def evolve(state: OrderState | None, event: Event) -> OrderState:
    """Applies one event and returns the new state (version + 1).

    Raises ValueError when the event cannot apply to `state`: anything but OrderCreated before the order exists,
    OrderCreated on an existing order, any event after OrderDeleted, a line event for a missing line, a second
    line for one sku, or an event type the Order aggregate does not know. Status changes are recorded facts and
    apply as they are: `decide` is where the business rules live.
    """
    if isinstance(event, OrderCreated):
        if state is not None:
            raise ValueError(f"OrderCreated cannot apply: order {state.order_id} already exists")
        return OrderState(
            order_id=event.order_id,
            customer_id=event.customer_id,
            currency=event.currency,
            shipping_address=event.shipping_address,
            version=1,
        )
    name = type(event).__name__
    if state is None:
        raise ValueError(f"{name} cannot apply before OrderCreated")
    if state.deleted:
        raise ValueError(f"{name} cannot apply: order {state.order_id} was deleted")
    return replace(_apply(state, event), version=state.version + 1)


def fold(events: Iterable[Event], state: OrderState | None = None) -> OrderState | None:
    """Applies `events` in order onto `state` (None: the order does not exist yet); None when there are none."""
    for event in events:
        state = evolve(state, event)
    return state


def _apply(state: OrderState, event: Event) -> OrderState:
    match event:
        case OrderItemAdded():
            if state.line_for(event.sku) is not None:
                raise ValueError(f"OrderItemAdded cannot apply: order {state.order_id} has sku {event.sku!r}")
            line = OrderLine(event.sku, event.name, event.quantity, event.unit_price_minor)
            return replace(state, lines=(*state.lines, line))
        case OrderItemRemoved():
            _line_or_value_error(state, event.sku, "OrderItemRemoved")
            return replace(state, lines=tuple(line for line in state.lines if line.sku != event.sku))
        case OrderItemQuantityChanged():
            _line_or_value_error(state, event.sku, "OrderItemQuantityChanged")
            lines = tuple(
                replace(line, quantity=event.quantity) if line.sku == event.sku else line for line in state.lines
            )
            return replace(state, lines=lines)
        case OrderShippingAddressChanged():
            return replace(state, shipping_address=event.shipping_address)
        case OrderPlaced():
            return replace(state, status=OrderStatus.PLACED)
        case OrderCancelled():
            return replace(state, status=OrderStatus.CANCELLED)
        case OrderDeleted():
            return replace(state, deleted=True)
    raise ValueError(f"order {state.order_id}: the Order aggregate has no rule for {type(event).__name__}")


def _line_or_value_error(state: OrderState, sku: str, event_name: str) -> OrderLine:
    line = state.line_for(sku)
    if line is None:
        raise ValueError(f"{event_name} cannot apply: order {state.order_id} has no line for sku {sku!r}")
    return line


# --- decide: state + command -> events ----------------------------------------------------------------------------


def decide(state: OrderState | None, command: OrderCommand) -> list[Event]:
    """Returns the events `command` causes on `state` ([] when it changes nothing), or raises a core.errors error.

    The command's shape was validated once on the way in (`validation.validate`, called by the command runner for
    every request); here are the business rules: NotFound for a missing or deleted order or line, AlreadyExists
    for a second create or a second line of one sku, FailedPrecondition when the order's status or limits forbid
    the command.
    """
    if isinstance(command, CreateOrder):
        return _create(state, command)
    order = _existing(state, command.order_id)
    match command:
        case AddOrderItem():
            return _add_item(order, command)
        case RemoveOrderItem():
            return _remove_item(order, command)
        case ChangeItemQuantity():
            return _change_quantity(order, command)
        case ChangeShippingAddress():
            return _change_address(order, command)
        case PlaceOrder():
            return _place(order)
        case CancelOrder():
            return _cancel(order, command)
        case DeleteOrder():
            return [OrderDeleted()]
        case _:
            assert_never(command)


def _create(state: OrderState | None, command: CreateOrder) -> list[Event]:
    if state is not None:
        raise AlreadyExists(f"order {command.order_id} already exists")
    return [
        OrderCreated(
            order_id=command.order_id,
            customer_id=command.customer_id,
            currency=command.currency,
            shipping_address=command.shipping_address,
        )
    ]


def _existing(state: OrderState | None, order_id: str) -> OrderState:
    if state is None:
        raise NotFound(f"order {order_id} does not exist")
    if state.order_id != order_id:
        # A handler bug (it loaded another stream), not a caller error: must never be reported as NOT_FOUND.
        raise ValueError(f"decide got the state of order {state.order_id} for a command on order {order_id}")
    if state.deleted:
        raise NotFound(f"order {order_id} was deleted")
    return state


def _require_draft(order: OrderState, what: str) -> None:
    if order.status is not OrderStatus.DRAFT:
        raise FailedPrecondition(
            f"order {order.order_id} is {order.status}; {what} can only change while it is {OrderStatus.DRAFT}"
        )


def _require_line(order: OrderState, sku: str) -> OrderLine:
    line = order.line_for(sku)
    if line is None:
        raise NotFound(f"order {order.order_id} has no line for sku {sku!r}")
    return line


def _require_total_within_limit(order: OrderState, new_total: int) -> None:
    if new_total > MAX_ORDER_TOTAL_MINOR:
        raise FailedPrecondition(
            f"order {order.order_id} would total {new_total} minor units of {order.currency}, "
            f"above the limit of {MAX_ORDER_TOTAL_MINOR}"
        )


def _add_item(order: OrderState, command: AddOrderItem) -> list[Event]:
    _require_draft(order, "lines")
    if order.line_for(command.sku) is not None:
        raise AlreadyExists(
            f"order {order.order_id} already has a line for sku {command.sku!r}; "
            "use ChangeItemQuantity to change its quantity"
        )
    if len(order.lines) >= MAX_LINES_PER_ORDER:
        raise FailedPrecondition(
            f"order {order.order_id} already has {len(order.lines)} lines, the most an order may have; "
            f"cannot add sku {command.sku!r}"
        )
    _require_total_within_limit(order, order.total_minor + command.quantity * command.unit_price_minor)
    return [
        OrderItemAdded(
            sku=command.sku,
            name=command.name,
            quantity=command.quantity,
            unit_price_minor=command.unit_price_minor,
        )
    ]


def _remove_item(order: OrderState, command: RemoveOrderItem) -> list[Event]:
    _require_draft(order, "lines")
    _require_line(order, command.sku)
    return [OrderItemRemoved(sku=command.sku)]


def _change_quantity(order: OrderState, command: ChangeItemQuantity) -> list[Event]:
    _require_draft(order, "lines")
    line = _require_line(order, command.sku)
    if line.quantity == command.quantity:
        return []
    new_line_total = command.quantity * line.unit_price_minor
    _require_total_within_limit(order, order.total_minor - line.line_total_minor + new_line_total)
    return [OrderItemQuantityChanged(sku=command.sku, quantity=command.quantity)]


def _change_address(order: OrderState, command: ChangeShippingAddress) -> list[Event]:
    _require_draft(order, "the shipping address")
    if command.shipping_address == order.shipping_address:
        return []
    return [OrderShippingAddressChanged(shipping_address=command.shipping_address)]


def _place(order: OrderState) -> list[Event]:
    if order.status is not OrderStatus.DRAFT:
        raise FailedPrecondition(
            f"order {order.order_id} is {order.status}; only a {OrderStatus.DRAFT} order can be placed"
        )
    if not order.lines:
        raise FailedPrecondition(f"order {order.order_id} has no lines; add at least one item before placing it")
    return [OrderPlaced()]


def _cancel(order: OrderState, command: CancelOrder) -> list[Event]:
    if order.status is OrderStatus.CANCELLED:
        raise FailedPrecondition(f"order {order.order_id} is already {OrderStatus.CANCELLED}")
    return [OrderCancelled(reason=command.reason)]
