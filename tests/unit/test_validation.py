"""Shape checks of commands: one FieldViolation per bad field, named by the proto request field path."""

from __future__ import annotations

import dataclasses
import re

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
from command_service.domain.customer_commands import (
    ChangeCustomerEmail,
    CustomerCommand,
    DeactivateCustomer,
    RegisterCustomer,
    RenameCustomer,
)
from command_service.domain.customer_validation import validate_customer
from command_service.domain.validation import (
    ADDRESS_FIELD_MAX_LENGTH,
    CANCEL_REASON_MAX_LENGTH,
    CUSTOMER_ID_MAX_LENGTH,
    ISO_3166_1_ALPHA_2_CODES,
    ISO_4217_CURRENCY_CODES,
    ITEM_NAME_MAX_LENGTH,
    POSTAL_CODE_MAX_LENGTH,
    QUANTITY_MAX,
    QUANTITY_MIN,
    SKU_MAX_LENGTH,
    UNIT_PRICE_MINOR_MAX,
    UNIT_PRICE_MINOR_MIN,
    validate,
)
from core.errors import FieldViolation, InvalidArgument
from core.values import Address

ORDER_ID = "0b7f3c1e-8d2a-4f5b-9c6d-1e2f3a4b5c6d"


def address(**changes: str) -> Address:
    base = Address(
        recipient="Ada Lovelace",
        line1="12 St James's Square",
        line2="",
        city="London",
        postal_code="SW1Y 4JH",
        country="GB",
    )
    return dataclasses.replace(base, **changes)


def create(**changes: object) -> CreateOrder:
    base = CreateOrder(order_id=ORDER_ID, customer_id="cust-42", currency="EUR", shipping_address=address())
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def add_item(**changes: object) -> AddOrderItem:
    base = AddOrderItem(order_id=ORDER_ID, sku="SKU-1", name="Coffee beans", quantity=2, unit_price_minor=1299)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def change_quantity(**changes: object) -> ChangeItemQuantity:
    base = ChangeItemQuantity(order_id=ORDER_ID, sku="SKU-1", quantity=3)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def cancel(**changes: object) -> CancelOrder:
    base = CancelOrder(order_id=ORDER_ID, reason="customer changed their mind")
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


VALID_COMMANDS: list[OrderCommand] = [
    create(),
    add_item(),
    RemoveOrderItem(order_id=ORDER_ID, sku="SKU-1"),
    change_quantity(),
    ChangeShippingAddress(order_id=ORDER_ID, shipping_address=address()),
    PlaceOrder(order_id=ORDER_ID),
    cancel(),
    DeleteOrder(order_id=ORDER_ID),
]


def violations(command: OrderCommand) -> dict[str, str]:
    """field path -> description of the InvalidArgument that `command` must raise."""
    with pytest.raises(InvalidArgument) as caught:
        validate(command)
    found = caught.value.violations
    assert all(isinstance(v, FieldViolation) for v in found)
    fields = [v.field for v in found]
    assert len(fields) == len(set(fields)), f"one violation per field, got {fields}"
    return {v.field: v.description for v in found}


def only_violation(command: OrderCommand, field: str) -> str:
    found = violations(command)
    assert list(found) == [field]
    return found[field]


# --- every command --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", VALID_COMMANDS, ids=lambda c: type(c).__name__)
def test_well_formed_commands_pass(command: OrderCommand) -> None:
    validate(command)


@pytest.mark.parametrize("command", VALID_COMMANDS, ids=lambda c: type(c).__name__)
def test_every_command_checks_order_id(command: OrderCommand) -> None:
    bad = dataclasses.replace(command, order_id="not-a-uuid")
    assert "UUID" in only_violation(bad, "order_id")


@pytest.mark.parametrize(
    ("order_id", "expected"),
    [
        ("", "is required"),
        (f" {ORDER_ID}", "leading or trailing whitespace"),
        (f"{ORDER_ID}\n", "leading or trailing whitespace"),
        ("1234", "must be a UUID such as"),
        (ORDER_ID + "0", "must be a UUID such as"),
        (ORDER_ID.upper(), f"canonical form (lowercase hex with hyphens): '{ORDER_ID}'"),
        (ORDER_ID.replace("-", ""), f"'{ORDER_ID}'"),
        ("{" + ORDER_ID + "}", f"'{ORDER_ID}'"),
        (f"urn:uuid:{ORDER_ID}", f"'{ORDER_ID}'"),
    ],
)
def test_order_id_must_be_a_canonical_uuid(order_id: str, expected: str) -> None:
    assert expected in only_violation(PlaceOrder(order_id=order_id), "order_id")


def test_order_id_of_another_type_is_reported_not_crashed_on() -> None:
    assert only_violation(PlaceOrder(order_id=None), "order_id") == "must be a string"  # type: ignore[arg-type]


# --- CreateOrder ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("customer_id", ["c", "cust-42", "tenant:7.user_9", "A" * CUSTOMER_ID_MAX_LENGTH])
def test_customer_id_accepts_allowed_characters_up_to_the_limit(customer_id: str) -> None:
    validate(create(customer_id=customer_id))


@pytest.mark.parametrize(
    ("customer_id", "expected"),
    [
        ("", "is required"),
        ("A" * (CUSTOMER_ID_MAX_LENGTH + 1), f"at most {CUSTOMER_ID_MAX_LENGTH} characters long (got 65)"),
        (" cust-42", "must not have leading or trailing whitespace"),
        ("cust-42 ", "must not have leading or trailing whitespace"),
        ("cust 42", "may only contain letters A-Z and a-z, digits and the characters . _ : -"),
        ("cust/42", "may only contain"),
        ("kunde-ä", "may only contain"),
        ("cust\x0042", "control characters (found U+0000 at position 4)"),
    ],
)
def test_customer_id_rules(customer_id: str, expected: str) -> None:
    assert expected in only_violation(create(customer_id=customer_id), "customer_id")


@pytest.mark.parametrize("currency", ["EUR", "USD", "JPY", "CHF", "XCG", "ZWG"])
def test_currency_accepts_active_iso_4217_codes(currency: str) -> None:
    validate(create(currency=currency))


def test_lower_case_currency_is_invalid_and_says_to_use_upper_case() -> None:
    description = only_violation(create(currency="eur"), "currency")
    assert "upper case" in description
    assert "'EUR'" in description


@pytest.mark.parametrize(
    ("currency", "expected"),
    [
        ("", "is required"),
        ("EURO", "must be an active ISO 4217 currency code"),
        ("ABC", "must be an active ISO 4217 currency code"),
        ("HRK", "must be an active ISO 4217 currency code"),  # withdrawn: Croatia uses the euro
        ("€", "must be an active ISO 4217 currency code"),
        (" EUR", "must be an active ISO 4217 currency code"),
    ],
)
def test_currency_rejects_anything_else(currency: str, expected: str) -> None:
    assert expected in only_violation(create(currency=currency), "currency")


def test_currency_list_holds_only_three_upper_case_letters() -> None:
    assert all(re.fullmatch(r"[A-Z]{3}", code) for code in ISO_4217_CURRENCY_CODES)
    assert {"EUR", "USD", "GBP", "JPY", "CHF", "CNY", "INR", "BRL"} <= ISO_4217_CURRENCY_CODES
    assert not {"DEM", "FRF", "HRK", "CUC", "VEF", "ZWL", "SLL"} & ISO_4217_CURRENCY_CODES


def test_country_list_is_the_249_official_alpha_2_codes() -> None:
    assert len(ISO_3166_1_ALPHA_2_CODES) == 249
    assert all(re.fullmatch(r"[A-Z]{2}", code) for code in ISO_3166_1_ALPHA_2_CODES)
    assert {"DE", "GB", "US", "FR", "JP", "SS", "BQ", "AX"} <= ISO_3166_1_ALPHA_2_CODES
    assert not {"UK", "EU", "XK", "YU", "AN"} & ISO_3166_1_ALPHA_2_CODES


# --- addresses (CreateOrder and ChangeShippingAddress) -------------------------------------------------------


def address_commands(addr: Address) -> list[OrderCommand]:
    return [create(shipping_address=addr), ChangeShippingAddress(order_id=ORDER_ID, shipping_address=addr)]


@pytest.mark.parametrize("field", ["recipient", "line1", "city", "postal_code", "country"])
def test_required_address_fields(field: str) -> None:
    for command in address_commands(address(**{field: ""})):
        assert only_violation(command, f"shipping_address.{field}") == "is required"


def test_line2_is_optional_but_limited() -> None:
    validate(create(shipping_address=address(line2="")))
    validate(create(shipping_address=address(line2="x" * ADDRESS_FIELD_MAX_LENGTH)))
    too_long = create(shipping_address=address(line2="x" * (ADDRESS_FIELD_MAX_LENGTH + 1)))
    assert "at most 200 characters" in only_violation(too_long, "shipping_address.line2")


@pytest.mark.parametrize("field", ["recipient", "line1", "line2", "city"])
def test_address_text_fields_are_limited_to_200_characters(field: str) -> None:
    validate(create(shipping_address=address(**{field: "x" * ADDRESS_FIELD_MAX_LENGTH})))
    command = create(shipping_address=address(**{field: "x" * (ADDRESS_FIELD_MAX_LENGTH + 1)}))
    assert only_violation(command, f"shipping_address.{field}") == "must be at most 200 characters long (got 201)"


def test_postal_code_is_limited_to_20_characters() -> None:
    validate(create(shipping_address=address(postal_code="9" * POSTAL_CODE_MAX_LENGTH)))
    command = create(shipping_address=address(postal_code="9" * (POSTAL_CODE_MAX_LENGTH + 1)))
    assert "at most 20 characters" in only_violation(command, "shipping_address.postal_code")


@pytest.mark.parametrize("field", ["recipient", "line1", "line2", "city", "postal_code"])
def test_address_fields_reject_control_characters_and_blank_text(field: str) -> None:
    with_tab = create(shipping_address=address(**{field: "a\tb"}))
    assert "control characters (found U+0009" in only_violation(with_tab, f"shipping_address.{field}")
    blank = create(shipping_address=address(**{field: "   "}))
    assert only_violation(blank, f"shipping_address.{field}") == "must not consist only of whitespace"


def test_address_text_may_be_any_printable_unicode() -> None:
    validate(create(shipping_address=address(recipient="Zoë Ñúñez-Østergård", city="München", country="DE")))


@pytest.mark.parametrize(
    ("country", "expected"),
    [
        ("de", "must be upper case: use 'DE'"),
        ("DEU", "must be an ISO 3166-1 alpha-2 country code"),
        ("UK", "must be an ISO 3166-1 alpha-2 country code"),
        ("XX", "must be an ISO 3166-1 alpha-2 country code"),
    ],
)
def test_country_must_be_an_iso_3166_alpha_2_code(country: str, expected: str) -> None:
    for command in address_commands(address(country=country)):
        assert expected in only_violation(command, "shipping_address.country")


def test_missing_address_is_one_violation() -> None:
    command = create(shipping_address=None)
    assert only_violation(command, "shipping_address") == "is required"


# --- items ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sku", ["S", "SKU-1", "abc.DEF_123-x", "9" * SKU_MAX_LENGTH])
def test_sku_accepts_allowed_characters_up_to_the_limit(sku: str) -> None:
    validate(add_item(sku=sku))
    validate(RemoveOrderItem(order_id=ORDER_ID, sku=sku))
    validate(change_quantity(sku=sku))


@pytest.mark.parametrize(
    ("sku", "expected"),
    [
        ("", "is required"),
        ("9" * (SKU_MAX_LENGTH + 1), "at most 64 characters long (got 65)"),
        (" SKU-1", "must not have leading or trailing whitespace"),
        ("SKU-1\t", "must not have leading or trailing whitespace"),
        ("SKU:1", "may only contain letters A-Z and a-z, digits and the characters . _ -"),
        ("SKU 1", "may only contain"),
        ("SKU-\x7f", "control characters (found U+007F at position 4)"),
    ],
)
def test_sku_rules(sku: str, expected: str) -> None:
    commands: list[OrderCommand] = [
        add_item(sku=sku),
        RemoveOrderItem(order_id=ORDER_ID, sku=sku),
        change_quantity(sku=sku),
    ]
    for command in commands:
        assert expected in only_violation(command, "sku")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("", "is required"),
        ("   ", "must not consist only of whitespace"),
        ("x" * (ITEM_NAME_MAX_LENGTH + 1), "at most 200 characters long (got 201)"),
        ("Coffee\nbeans", "control characters (found U+000A at position 6)"),
        ("Coffee \x85", "control characters (found U+0085"),
        ("Coffee \ud800", "lone surrogate at position 7"),
    ],
)
def test_item_name_rules(name: str, expected: str) -> None:
    assert expected in only_violation(add_item(name=name), "name")


def test_item_name_accepts_unicode_up_to_200_characters() -> None:
    validate(add_item(name="Kaffeebohnen \u2013 Äthiopien 🌱"))
    validate(add_item(name="x" * ITEM_NAME_MAX_LENGTH))


@pytest.mark.parametrize("quantity", [QUANTITY_MIN, 7, QUANTITY_MAX])
def test_quantity_accepts_1_to_10000(quantity: int) -> None:
    validate(add_item(quantity=quantity))
    validate(change_quantity(quantity=quantity))


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [
        (0, "must be between 1 and 10000 (got 0)"),
        (-1, "must be between 1 and 10000 (got -1)"),
        (QUANTITY_MAX + 1, "must be between 1 and 10000 (got 10001)"),
        (True, "must be an integer"),
        (2.0, "must be an integer"),
        ("2", "must be an integer"),
    ],
)
def test_quantity_rules(quantity: object, expected: str) -> None:
    assert expected in only_violation(add_item(quantity=quantity), "quantity")
    assert expected in only_violation(change_quantity(quantity=quantity), "quantity")


def test_changing_a_quantity_to_zero_points_to_remove_order_item() -> None:
    assert "use RemoveOrderItem" in only_violation(change_quantity(quantity=0), "quantity")
    assert "RemoveOrderItem" not in only_violation(add_item(quantity=0), "quantity")
    assert "RemoveOrderItem" not in only_violation(change_quantity(quantity=False), "quantity")


@pytest.mark.parametrize("price", [UNIT_PRICE_MINOR_MIN, 1, 1299, UNIT_PRICE_MINOR_MAX])
def test_unit_price_accepts_0_to_100_billion_minor_units(price: int) -> None:
    validate(add_item(unit_price_minor=price))


@pytest.mark.parametrize(
    ("price", "expected"),
    [
        (-1, "must be between 0 and 100000000000 (got -1)"),
        (UNIT_PRICE_MINOR_MAX + 1, "must be between 0 and 100000000000 (got 100000000001)"),
        (True, "must be an integer"),
        (12.99, "must be an integer"),
    ],
)
def test_unit_price_rules(price: object, expected: str) -> None:
    assert expected in only_violation(add_item(unit_price_minor=price), "unit_price_minor")


# --- CancelOrder ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("", "is required"),
        (" ", "must not consist only of whitespace"),
        ("r" * (CANCEL_REASON_MAX_LENGTH + 1), "at most 500 characters long (got 501)"),
        ("late\r\ndelivery", "control characters (found U+000D at position 4)"),
    ],
)
def test_cancel_reason_rules(reason: str, expected: str) -> None:
    assert expected in only_violation(cancel(reason=reason), "reason")


def test_cancel_reason_up_to_500_characters_is_fine() -> None:
    validate(cancel(reason="r" * CANCEL_REASON_MAX_LENGTH))


# --- collecting -------------------------------------------------------------------------------------------------


def test_all_violations_are_collected_not_just_the_first() -> None:
    command = CreateOrder(
        order_id="nope",
        customer_id="",
        currency="eur",
        shipping_address=Address(recipient="", line1="x" * 201, line2="", city="\x00", postal_code="", country="de"),
    )
    found = violations(command)
    assert set(found) == {
        "order_id",
        "customer_id",
        "currency",
        "shipping_address.recipient",
        "shipping_address.line1",
        "shipping_address.city",
        "shipping_address.postal_code",
        "shipping_address.country",
    }


def test_item_violations_are_collected_in_field_order() -> None:
    command = AddOrderItem(order_id=ORDER_ID.upper(), sku="a b", name="", quantity=0, unit_price_minor=-5)
    with pytest.raises(InvalidArgument) as caught:
        validate(command)
    assert [v.field for v in caught.value.violations] == ["order_id", "sku", "name", "quantity", "unit_price_minor"]
    # The error's message lists every violation for people reading logs.
    for field in ["order_id", "sku", "name", "quantity", "unit_price_minor"]:
        assert f"{field}: " in caught.value.message


# --- hostile text in every string field -------------------------------------------------------------------------


def _with_text(field: str, value: str) -> OrderCommand:
    """A command that is valid except for `value` in the (dotted) string field `field`."""
    commands: dict[str, OrderCommand] = {
        "order_id": PlaceOrder(order_id=value),
        "customer_id": create(customer_id=value),
        "currency": create(currency=value),
        "sku": add_item(sku=value),
        "name": add_item(name=value),
        "reason": cancel(reason=value),
    }
    if field.startswith("shipping_address."):
        return create(shipping_address=address(**{field.split(".", 1)[1]: value}))
    return commands[field]


STRING_FIELDS = [
    "order_id",
    "customer_id",
    "currency",
    "sku",
    "name",
    "reason",
    *(f"shipping_address.{f}" for f in ("recipient", "line1", "line2", "city", "postal_code", "country")),
]
HOSTILE_TEXT = ["A\x00B", "A\x07B", "A\x1bB", "A\x7fB", "A\x9bB", "A\ud800B", "A\udfffB", "A\u2028B", "A\ufffeB"]


@pytest.mark.parametrize("field", STRING_FIELDS)
@pytest.mark.parametrize("text", HOSTILE_TEXT, ids=lambda t: f"U+{ord(t[1]):04X}")
def test_nul_control_characters_surrogates_and_separators_are_refused_in_every_string_field(
    field: str, text: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        validate(_with_text(field, text))

    assert [v.field for v in caught.value.violations] == [field]


@pytest.mark.parametrize(
    "field", ["name", "reason", *(f"shipping_address.{f}" for f in ("recipient", "line1", "city"))]
)
@pytest.mark.parametrize(
    "text",
    [
        "\u05e9\u05dc\u05d5\u05dd \u05e2\u05d5\u05dc\u05dd",  # Hebrew (right to left)
        "\u0645\u0631\u062d\u0628\u0627 \u200f(1)",  # Arabic with a right-to-left mark
        "caf\u00e9 \u2615\U0001f600\U0001f1e9\U0001f1ea",  # accents, emoji, a flag
        "\u4e2d\u6587 \u0928\u092e\u0938\u094d\u0924\u0947",  # CJK and Devanagari
    ],
)
def test_any_script_rtl_text_and_emoji_are_fine_in_text_fields(field: str, text: str) -> None:
    validate(_with_text(field, text))


@pytest.mark.parametrize("text", HOSTILE_TEXT, ids=lambda t: f"U+{ord(t[1]):04X}")
def test_customer_names_and_emails_refuse_the_same_characters(text: str) -> None:
    customer_id = "0b7f3c1e-8d2a-4f5b-9c6d-1e2f3a4b5c6d"
    cases: list[tuple[CustomerCommand, str]] = [
        (RegisterCustomer(customer_id=customer_id, name=f"Ada {text}", email="ada@example.com"), "name"),
        (RenameCustomer(customer_id=customer_id, name=text), "name"),
        (ChangeCustomerEmail(customer_id=customer_id, email=f"ada{text}@example.com"), "email"),
        (DeactivateCustomer(customer_id=text), "customer_id"),
    ]
    for command, field in cases:
        with pytest.raises(InvalidArgument) as caught:
            validate_customer(command)
        assert [v.field for v in caught.value.violations] == [field], command


def test_customer_names_in_any_script_are_fine() -> None:
    customer_id = "0b7f3c1e-8d2a-4f5b-9c6d-1e2f3a4b5c6d"
    for name in ["\u05d3\u05e0\u05d4 \u05db\u05d4\u05df", "\u0645\u0631\u064a\u0645 \u200f", "Zo\u00eb \U0001f600"]:
        validate_customer(RenameCustomer(customer_id=customer_id, name=name))
