"""The Order aggregate: given events, when a command, then events or an error (with its code and message)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest

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
from command_service.domain.order import (
    MAX_LINES_PER_ORDER,
    MAX_ORDER_TOTAL_MINOR,
    OrderState,
    OrderStatus,
    decide,
    evolve,
    fold,
)
from core.errors import AlreadyExists, FailedPrecondition, NotFound, ServiceError
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

ORDER_ID = "5d0c2a8e-3b7f-4e19-a6c4-9f1e2d3c4b5a"
OTHER_ORDER_ID = "77c1e0f2-1a2b-4c3d-8e9f-001122334455"
HOME = Address(
    recipient="Ada Lovelace",
    line1="12 St James's Square",
    line2="",
    city="London",
    postal_code="SW1Y 4JH",
    country="GB",
)
OFFICE = Address(
    recipient="Ada Lovelace",
    line1="1 Main Street",
    line2="Floor 3",
    city="Dublin",
    postal_code="D02 X285",
    country="IE",
)
MAX_PRICE = 100_000_000_000


def created() -> OrderCreated:
    return OrderCreated(order_id=ORDER_ID, customer_id="cust-42", currency="EUR", shipping_address=HOME)


def added(sku: str = "SKU-1", quantity: int = 2, price: int = 1299, name: str = "Coffee beans") -> OrderItemAdded:
    return OrderItemAdded(sku=sku, name=name, quantity=quantity, unit_price_minor=price)


def given(*events: Event) -> OrderState | None:
    return fold(events)


def then_error(state: OrderState | None, command: OrderCommand, error: type[ServiceError], *fragments: str) -> str:
    """Asserts that `command` fails with `error` and that its message names every fragment."""
    with pytest.raises(error) as caught:
        decide(state, command)
    assert type(caught.value) is error
    for fragment in fragments:
        assert fragment in caught.value.message
    return caught.value.message


DRAFT_WITH_LINE = (created(), added())
PLACED = (*DRAFT_WITH_LINE, OrderPlaced())
CANCELLED_DRAFT = (created(), OrderCancelled(reason="changed my mind"))
CANCELLED_PLACED = (*PLACED, OrderCancelled(reason="out of stock"))
DELETED = (*DRAFT_WITH_LINE, OrderDeleted())

NOT_DRAFT = pytest.mark.parametrize(
    ("history", "status"),
    [(PLACED, "PLACED"), (CANCELLED_DRAFT, "CANCELLED"), (CANCELLED_PLACED, "CANCELLED")],
    ids=["placed", "cancelled-draft", "cancelled-placed"],
)

COMMANDS_ON_EXISTING_ORDERS: list[OrderCommand] = [
    AddOrderItem(order_id=ORDER_ID, sku="SKU-2", name="Mug", quantity=1, unit_price_minor=900),
    RemoveOrderItem(order_id=ORDER_ID, sku="SKU-1"),
    ChangeItemQuantity(order_id=ORDER_ID, sku="SKU-1", quantity=5),
    ChangeShippingAddress(order_id=ORDER_ID, shipping_address=OFFICE),
    PlaceOrder(order_id=ORDER_ID),
    CancelOrder(order_id=ORDER_ID, reason="no longer needed"),
    DeleteOrder(order_id=ORDER_ID),
]
EACH_COMMAND_ON_EXISTING = pytest.mark.parametrize(
    "command", COMMANDS_ON_EXISTING_ORDERS, ids=lambda c: type(c).__name__
)


# --- CreateOrder ------------------------------------------------------------------------------------------------


def test_create_order_opens_a_draft() -> None:
    command = CreateOrder(order_id=ORDER_ID, customer_id="cust-42", currency="EUR", shipping_address=HOME)
    assert decide(None, command) == [created()]


@pytest.mark.parametrize("history", [(created(),), PLACED, DELETED], ids=["draft", "placed", "deleted"])
def test_create_order_on_an_existing_stream_already_exists(history: tuple[Event, ...]) -> None:
    command = CreateOrder(order_id=ORDER_ID, customer_id="cust-42", currency="EUR", shipping_address=HOME)
    then_error(given(*history), command, AlreadyExists, f"order {ORDER_ID} already exists")


# --- the order must exist ----------------------------------------------------------------------------------------


@EACH_COMMAND_ON_EXISTING
def test_commands_on_an_unknown_order_are_not_found(command: OrderCommand) -> None:
    then_error(None, command, NotFound, f"order {ORDER_ID} does not exist")


@EACH_COMMAND_ON_EXISTING
def test_commands_on_a_deleted_order_are_not_found(command: OrderCommand) -> None:
    then_error(given(*DELETED), command, NotFound, f"order {ORDER_ID} was deleted")


def test_a_state_of_another_order_is_a_programming_error_not_a_caller_error() -> None:
    with pytest.raises(ValueError, match=r"state of order .* for a command on order"):
        decide(given(created()), PlaceOrder(order_id=OTHER_ORDER_ID))


# --- AddOrderItem -----------------------------------------------------------------------------------------------


def test_add_item_to_a_draft() -> None:
    command = AddOrderItem(order_id=ORDER_ID, sku="SKU-1", name="Coffee beans", quantity=2, unit_price_minor=1299)
    assert decide(given(created()), command) == [added()]


def test_add_a_free_item() -> None:
    command = AddOrderItem(order_id=ORDER_ID, sku="GIFT", name="Sticker", quantity=1, unit_price_minor=0)
    assert decide(given(*DRAFT_WITH_LINE), command) == [added("GIFT", 1, 0, "Sticker")]


def test_add_item_with_a_sku_already_in_the_order_points_to_change_item_quantity() -> None:
    command = AddOrderItem(order_id=ORDER_ID, sku="SKU-1", name="Coffee beans", quantity=1, unit_price_minor=1299)
    then_error(given(*DRAFT_WITH_LINE), command, AlreadyExists, ORDER_ID, "'SKU-1'", "use ChangeItemQuantity")


def test_add_item_after_the_sku_was_removed_is_fine() -> None:
    state = given(*DRAFT_WITH_LINE, OrderItemRemoved(sku="SKU-1"))
    command = AddOrderItem(order_id=ORDER_ID, sku="SKU-1", name="Coffee beans", quantity=4, unit_price_minor=1199)
    assert decide(state, command) == [added("SKU-1", 4, 1199)]


@NOT_DRAFT
def test_add_item_only_while_draft(history: tuple[Event, ...], status: str) -> None:
    command = AddOrderItem(order_id=ORDER_ID, sku="SKU-2", name="Mug", quantity=1, unit_price_minor=900)
    message = then_error(given(*history), command, FailedPrecondition)
    assert message == f"order {ORDER_ID} is {status}; lines can only change while it is DRAFT"


def lines(count: int, price: int = 100) -> list[Event]:
    return [added(f"SKU-{n}", 1, price) for n in range(count)]


def test_add_item_up_to_the_line_limit() -> None:
    state = given(created(), *lines(MAX_LINES_PER_ORDER - 1))
    command = AddOrderItem(order_id=ORDER_ID, sku="LAST", name="Last", quantity=1, unit_price_minor=1)
    assert decide(state, command) == [added("LAST", 1, 1, "Last")]


def test_add_item_beyond_the_line_limit_fails() -> None:
    state = given(created(), *lines(MAX_LINES_PER_ORDER))
    assert MAX_LINES_PER_ORDER == 100
    command = AddOrderItem(order_id=ORDER_ID, sku="ONE-MORE", name="More", quantity=1, unit_price_minor=1)
    then_error(state, command, FailedPrecondition, ORDER_ID, "already has 100 lines", "'ONE-MORE'")


def test_order_total_may_reach_the_limit_exactly() -> None:
    # 10 lines of 10_000 x 10**10 = 10**15, the limit.
    state = given(created(), *[added(f"SKU-{n}", 10_000, 10**10) for n in range(9)])
    command = AddOrderItem(order_id=ORDER_ID, sku="SKU-9", name="n", quantity=10_000, unit_price_minor=10**10)
    events = decide(state, command)
    assert fold(events, state).total_minor == MAX_ORDER_TOTAL_MINOR  # type: ignore[union-attr]


def test_add_item_beyond_the_total_limit_fails() -> None:
    state = given(created(), added("BIG", 10_000, MAX_PRICE - 1))  # 10**15 - 10_000
    command = AddOrderItem(order_id=ORDER_ID, sku="PENNY", name="Penny", quantity=1, unit_price_minor=10_001)
    then_error(state, command, FailedPrecondition, ORDER_ID, f"above the limit of {MAX_ORDER_TOTAL_MINOR}", "EUR")


# --- RemoveOrderItem --------------------------------------------------------------------------------------------


def test_remove_item() -> None:
    command = RemoveOrderItem(order_id=ORDER_ID, sku="SKU-1")
    assert decide(given(*DRAFT_WITH_LINE), command) == [OrderItemRemoved(sku="SKU-1")]


def test_remove_a_sku_not_in_the_order_is_not_found() -> None:
    command = RemoveOrderItem(order_id=ORDER_ID, sku="SKU-404")
    message = then_error(given(*DRAFT_WITH_LINE), command, NotFound)
    assert message == f"order {ORDER_ID} has no line for sku 'SKU-404'"


@NOT_DRAFT
def test_remove_item_only_while_draft(history: tuple[Event, ...], status: str) -> None:
    command = RemoveOrderItem(order_id=ORDER_ID, sku="SKU-1")
    then_error(given(*history), command, FailedPrecondition, f"is {status}; lines can only change while it is DRAFT")


# --- ChangeItemQuantity -----------------------------------------------------------------------------------------


def test_change_item_quantity() -> None:
    command = ChangeItemQuantity(order_id=ORDER_ID, sku="SKU-1", quantity=5)
    assert decide(given(*DRAFT_WITH_LINE), command) == [OrderItemQuantityChanged(sku="SKU-1", quantity=5)]


def test_changing_to_the_same_quantity_changes_nothing() -> None:
    command = ChangeItemQuantity(order_id=ORDER_ID, sku="SKU-1", quantity=2)
    assert decide(given(*DRAFT_WITH_LINE), command) == []


def test_change_quantity_of_a_sku_not_in_the_order_is_not_found() -> None:
    command = ChangeItemQuantity(order_id=ORDER_ID, sku="SKU-404", quantity=1)
    then_error(given(*DRAFT_WITH_LINE), command, NotFound, ORDER_ID, "no line for sku 'SKU-404'")


@NOT_DRAFT
def test_change_quantity_only_while_draft(history: tuple[Event, ...], status: str) -> None:
    # Even a no-op is refused: the caller should learn that the order is frozen.
    for quantity in (5, 2):
        command = ChangeItemQuantity(order_id=ORDER_ID, sku="SKU-1", quantity=quantity)
        then_error(given(*history), command, FailedPrecondition, ORDER_ID, f"is {status}")


def test_change_quantity_beyond_the_total_limit_fails() -> None:
    state = given(created(), added("BIG", 5_000, MAX_PRICE), added("SMALL", 1, 1))
    command = ChangeItemQuantity(order_id=ORDER_ID, sku="BIG", quantity=10_000)
    then_error(state, command, FailedPrecondition, f"would total {10**15 + 1} minor units of EUR")


def test_lowering_a_quantity_of_an_order_at_the_limit_is_fine() -> None:
    state = given(created(), added("BIG", 10_000, MAX_PRICE))
    command = ChangeItemQuantity(order_id=ORDER_ID, sku="BIG", quantity=9_999)
    assert decide(state, command) == [OrderItemQuantityChanged(sku="BIG", quantity=9_999)]


# --- ChangeShippingAddress --------------------------------------------------------------------------------------


def test_change_shipping_address() -> None:
    command = ChangeShippingAddress(order_id=ORDER_ID, shipping_address=OFFICE)
    assert decide(given(created()), command) == [OrderShippingAddressChanged(shipping_address=OFFICE)]


def test_changing_to_the_same_address_changes_nothing() -> None:
    same = dataclasses.replace(HOME)
    assert decide(given(created()), ChangeShippingAddress(order_id=ORDER_ID, shipping_address=same)) == []


@NOT_DRAFT
def test_change_address_only_while_draft(history: tuple[Event, ...], status: str) -> None:
    command = ChangeShippingAddress(order_id=ORDER_ID, shipping_address=OFFICE)
    message = then_error(given(*history), command, FailedPrecondition)
    assert message == f"order {ORDER_ID} is {status}; the shipping address can only change while it is DRAFT"


# --- PlaceOrder -------------------------------------------------------------------------------------------------


def test_place_order() -> None:
    assert decide(given(*DRAFT_WITH_LINE), PlaceOrder(order_id=ORDER_ID)) == [OrderPlaced()]


@pytest.mark.parametrize(
    "history",
    [(created(),), (created(), added(), OrderItemRemoved(sku="SKU-1"))],
    ids=["never-had-lines", "all-lines-removed"],
)
def test_place_an_order_without_lines_fails(history: tuple[Event, ...]) -> None:
    message = then_error(given(*history), PlaceOrder(order_id=ORDER_ID), FailedPrecondition)
    assert message == f"order {ORDER_ID} has no lines; add at least one item before placing it"


@NOT_DRAFT
def test_place_only_a_draft(history: tuple[Event, ...], status: str) -> None:
    message = then_error(given(*history), PlaceOrder(order_id=ORDER_ID), FailedPrecondition)
    assert message == f"order {ORDER_ID} is {status}; only a DRAFT order can be placed"


# --- CancelOrder ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("history", [(created(),), DRAFT_WITH_LINE, PLACED], ids=["empty", "draft", "placed"])
def test_cancel_a_draft_or_placed_order(history: tuple[Event, ...]) -> None:
    command = CancelOrder(order_id=ORDER_ID, reason="no longer needed")
    assert decide(given(*history), command) == [OrderCancelled(reason="no longer needed")]


@pytest.mark.parametrize("history", [CANCELLED_DRAFT, CANCELLED_PLACED], ids=["from-draft", "from-placed"])
def test_cancel_a_cancelled_order_fails(history: tuple[Event, ...]) -> None:
    message = then_error(given(*history), CancelOrder(order_id=ORDER_ID, reason="again"), FailedPrecondition)
    assert message == f"order {ORDER_ID} is already CANCELLED"


# --- DeleteOrder ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "history",
    [(created(),), DRAFT_WITH_LINE, PLACED, CANCELLED_DRAFT, CANCELLED_PLACED],
    ids=["empty", "draft", "placed", "cancelled-draft", "cancelled-placed"],
)
def test_delete_works_in_any_status(history: tuple[Event, ...]) -> None:
    assert decide(given(*history), DeleteOrder(order_id=ORDER_ID)) == [OrderDeleted()]


def test_delete_twice_is_not_found() -> None:
    then_error(given(*DELETED), DeleteOrder(order_id=ORDER_ID), NotFound, f"order {ORDER_ID} was deleted")


# --- evolve and fold --------------------------------------------------------------------------------------------


def test_evolve_builds_the_state_event_by_event() -> None:
    state = evolve(None, created())
    assert state == OrderState(
        order_id=ORDER_ID,
        customer_id="cust-42",
        currency="EUR",
        shipping_address=HOME,
        lines=(),
        status=OrderStatus.DRAFT,
        deleted=False,
        version=1,
    )
    state = evolve(state, added("A", 2, 150))
    state = evolve(state, added("B", 1, 1000))
    state = evolve(state, added("C", 3, 5))
    state = evolve(state, OrderItemQuantityChanged(sku="A", quantity=4))
    state = evolve(state, OrderItemRemoved(sku="B"))
    state = evolve(state, OrderShippingAddressChanged(shipping_address=OFFICE))
    assert state.lines == (OrderLine("A", "Coffee beans", 4, 150), OrderLine("C", "Coffee beans", 3, 5))
    assert state.total_minor == 4 * 150 + 3 * 5
    assert state.shipping_address == OFFICE
    assert state.version == 7
    state = evolve(state, OrderPlaced())
    assert (state.status, state.version) == (OrderStatus.PLACED, 8)
    state = evolve(state, OrderCancelled(reason="x"))
    assert (state.status, state.deleted) == (OrderStatus.CANCELLED, False)
    state = evolve(state, OrderDeleted())
    assert (state.status, state.deleted, state.version) == (OrderStatus.CANCELLED, True, 10)


def test_lines_keep_insertion_order_and_a_re_added_sku_goes_last() -> None:
    state = given(created(), added("A"), added("B"), added("C"), OrderItemRemoved(sku="A"), added("A", 9))
    assert state is not None
    assert [line.sku for line in state.lines] == ["B", "C", "A"]
    assert state.line_for("A") == OrderLine("A", "Coffee beans", 9, 1299)
    assert state.line_for("Z") is None


def test_total_is_exact_integer_minor_units() -> None:
    state = given(created(), added("A", 3, 333), added("B", 10_000, MAX_PRICE))
    assert state is not None
    assert state.total_minor == 999 + 10**15
    assert isinstance(state.total_minor, int)
    assert given(created()).total_minor == 0  # type: ignore[union-attr]


def test_status_is_a_str_enum() -> None:
    assert OrderStatus.PLACED == "PLACED"
    assert f"{OrderStatus.DRAFT}" == "DRAFT"
    assert [s.value for s in OrderStatus] == ["DRAFT", "PLACED", "CANCELLED"]


def test_fold_of_nothing_is_none() -> None:
    assert fold([]) is None


def test_fold_equals_evolving_one_by_one_and_can_resume_from_a_snapshot() -> None:
    history = [created(), added("A"), added("B"), OrderItemQuantityChanged(sku="B", quantity=7), OrderPlaced()]
    state: OrderState | None = None
    for event in history:
        state = evolve(state, event)
    assert fold(history) == state
    assert fold(history[2:], fold(history[:2])) == state
    assert fold(iter(history)) == state


def test_evolve_does_not_change_the_state_it_was_given() -> None:
    before = given(*DRAFT_WITH_LINE)
    assert before is not None
    snapshot = dataclasses.replace(before)
    evolve(before, OrderItemRemoved(sku="SKU-1"))
    assert before == snapshot
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.version = 99  # type: ignore[misc]


@dataclass(frozen=True)
class _NotAnOrderEvent(Event):
    """An event type the Order aggregate has no rule for (deliberately not registered)."""


@pytest.mark.parametrize(
    ("history", "event", "expected"),
    [
        ((), added(), "OrderItemAdded cannot apply before OrderCreated"),
        ((), OrderPlaced(), "OrderPlaced cannot apply before OrderCreated"),
        ((created(),), created(), f"OrderCreated cannot apply: order {ORDER_ID} already exists"),
        (DRAFT_WITH_LINE, added(), "has sku 'SKU-1'"),
        (DRAFT_WITH_LINE, OrderItemRemoved(sku="NOPE"), "OrderItemRemoved cannot apply: order .* 'NOPE'"),
        (DRAFT_WITH_LINE, OrderItemQuantityChanged(sku="NOPE", quantity=1), "no line for sku 'NOPE'"),
        (DELETED, OrderPlaced(), "OrderPlaced cannot apply: order .* was deleted"),
        (DELETED, OrderDeleted(), "was deleted"),
        ((created(),), _NotAnOrderEvent(), "no rule for _NotAnOrderEvent"),
    ],
)
def test_evolve_refuses_events_that_cannot_apply(history: tuple[Event, ...], event: Event, expected: str) -> None:
    with pytest.raises(ValueError, match=expected):
        evolve(given(*history), event)


def run(commands: list[OrderCommand]) -> tuple[OrderState | None, list[Event]]:
    """Plays commands the way a handler does: decide on the current state, then evolve by the new events."""
    state: OrderState | None = None
    history: list[Event] = []
    for command in commands:
        events = decide(state, command)
        history.extend(events)
        state = fold(events, state)
    return state, history


def test_decided_events_always_apply_and_fold_to_the_same_state() -> None:
    state, history = run(
        [
            CreateOrder(order_id=ORDER_ID, customer_id="cust-42", currency="JPY", shipping_address=HOME),
            AddOrderItem(order_id=ORDER_ID, sku="TEA", name="Sencha", quantity=2, unit_price_minor=1800),
            AddOrderItem(order_id=ORDER_ID, sku="POT", name="Kyusu", quantity=1, unit_price_minor=6500),
            ChangeItemQuantity(order_id=ORDER_ID, sku="TEA", quantity=3),
            ChangeItemQuantity(order_id=ORDER_ID, sku="TEA", quantity=3),  # no-op: no event
            ChangeShippingAddress(order_id=ORDER_ID, shipping_address=OFFICE),
            ChangeShippingAddress(order_id=ORDER_ID, shipping_address=OFFICE),  # no-op: no event
            RemoveOrderItem(order_id=ORDER_ID, sku="POT"),
            PlaceOrder(order_id=ORDER_ID),
            CancelOrder(order_id=ORDER_ID, reason="payment failed"),
            DeleteOrder(order_id=ORDER_ID),
        ]
    )
    assert [type(e).__name__ for e in history] == [
        "OrderCreated",
        "OrderItemAdded",
        "OrderItemAdded",
        "OrderItemQuantityChanged",
        "OrderShippingAddressChanged",
        "OrderItemRemoved",
        "OrderPlaced",
        "OrderCancelled",
        "OrderDeleted",
    ]
    assert state == fold(history)
    assert state is not None
    assert state.version == len(history) == 9
    assert state.lines == (OrderLine("TEA", "Sencha", 3, 1800),)
    assert state.total_minor == 5400
    assert (state.status, state.deleted, state.currency) == (OrderStatus.CANCELLED, True, "JPY")
