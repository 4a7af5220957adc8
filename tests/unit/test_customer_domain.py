"""The Customer aggregate: given events, when a command, then events or an error (with its code and message)."""

from __future__ import annotations

import pytest

from command_service.domain.customer import (
    CustomerState,
    CustomerStatus,
    decide,
    email_claims,
    evolve,
    fold,
)
from command_service.domain.customer_commands import (
    ChangeCustomerEmail,
    CustomerCommand,
    DeactivateCustomer,
    RegisterCustomer,
    RenameCustomer,
)
from command_service.domain.customer_validation import normalize_email, validate_customer
from core.customer_events import CustomerDeactivated, CustomerEmailChanged, CustomerRegistered, CustomerRenamed
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, ServiceError
from core.events import Event
from core.order_events import OrderPlaced

CUSTOMER_ID = "0b6f1c2e-8d4a-4f3b-9c5e-7a1d2e3f4a5b"
OTHER_CUSTOMER_ID = "9e8d7c6b-5a4f-4e3d-8c2b-1a0f9e8d7c6b"


def registered(name: str = "Ada Lovelace", email: str = "ada@example.com") -> CustomerRegistered:
    return CustomerRegistered(customer_id=CUSTOMER_ID, name=name, email=email)


def given(*events: Event) -> CustomerState | None:
    return fold(events)


def then_error(
    state: CustomerState | None, command: CustomerCommand, error: type[ServiceError], *fragments: str
) -> str:
    """Asserts that `command` fails with `error` and that its message names every fragment."""
    with pytest.raises(error) as caught:
        decide(state, command)
    assert type(caught.value) is error
    for fragment in fragments:
        assert fragment in caught.value.message
    return caught.value.message


def violations_of(command: CustomerCommand) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        validate_customer(command)
    return {v.field: v.description for v in caught.value.violations}


ACTIVE = (registered(),)
DEACTIVATED = (registered(), CustomerDeactivated())

COMMANDS_ON_EXISTING: list[CustomerCommand] = [
    RenameCustomer(customer_id=CUSTOMER_ID, name="Augusta Ada King"),
    ChangeCustomerEmail(customer_id=CUSTOMER_ID, email="countess@lovelace.org"),
    DeactivateCustomer(customer_id=CUSTOMER_ID),
]
EACH_COMMAND_ON_EXISTING = pytest.mark.parametrize("command", COMMANDS_ON_EXISTING, ids=lambda c: type(c).__name__)


# --- RegisterCustomer -------------------------------------------------------------------------------------------


def test_register_customer() -> None:
    command = RegisterCustomer(customer_id=CUSTOMER_ID, name="Ada Lovelace", email="ada@example.com")
    assert decide(None, command) == [registered()]


def test_register_stores_the_normalised_email_and_the_stripped_name() -> None:
    command = RegisterCustomer(customer_id=CUSTOMER_ID, name="  Ada Lovelace ", email="  Ada@Example.COM ")
    assert decide(None, command) == [registered(name="Ada Lovelace", email="ada@example.com")]


@pytest.mark.parametrize("history", [ACTIVE, DEACTIVATED], ids=["active", "deactivated"])
def test_register_on_an_existing_stream_already_exists(history: tuple[Event, ...]) -> None:
    command = RegisterCustomer(customer_id=CUSTOMER_ID, name="Ada", email="other@example.com")
    message = then_error(given(*history), command, AlreadyExists)
    assert message == f"customer {CUSTOMER_ID} already exists"


# --- the customer must exist and be active ----------------------------------------------------------------------


@EACH_COMMAND_ON_EXISTING
def test_commands_on_an_unknown_customer_are_not_found(command: CustomerCommand) -> None:
    message = then_error(None, command, NotFound)
    assert message == f"customer {CUSTOMER_ID} not found"


@EACH_COMMAND_ON_EXISTING
def test_commands_on_a_deactivated_customer_fail(command: CustomerCommand) -> None:
    then_error(given(*DEACTIVATED), command, FailedPrecondition, CUSTOMER_ID, "is deactivated")


def test_no_op_commands_on_a_deactivated_customer_still_fail() -> None:
    # The caller should learn that the customer is frozen even when nothing would change.
    state = given(*DEACTIVATED)
    then_error(state, RenameCustomer(customer_id=CUSTOMER_ID, name="Ada Lovelace"), FailedPrecondition)
    then_error(state, ChangeCustomerEmail(customer_id=CUSTOMER_ID, email="ada@example.com"), FailedPrecondition)


def test_a_state_of_another_customer_is_a_programming_error_not_a_caller_error() -> None:
    with pytest.raises(ValueError, match=r"state of customer .* for a command on"):
        decide(given(*ACTIVE), DeactivateCustomer(customer_id=OTHER_CUSTOMER_ID))


# --- RenameCustomer ---------------------------------------------------------------------------------------------


def test_rename_customer() -> None:
    command = RenameCustomer(customer_id=CUSTOMER_ID, name="Augusta Ada King")
    assert decide(given(*ACTIVE), command) == [CustomerRenamed(name="Augusta Ada King")]


@pytest.mark.parametrize("name", ["Ada Lovelace", "  Ada Lovelace\t"])
def test_renaming_to_the_same_name_changes_nothing(name: str) -> None:
    assert decide(given(*ACTIVE), RenameCustomer(customer_id=CUSTOMER_ID, name=name)) == []


def test_renaming_is_case_sensitive() -> None:
    command = RenameCustomer(customer_id=CUSTOMER_ID, name="ADA LOVELACE")
    assert decide(given(*ACTIVE), command) == [CustomerRenamed(name="ADA LOVELACE")]


# --- ChangeCustomerEmail ----------------------------------------------------------------------------------------


def test_change_email_stores_the_normalised_email() -> None:
    command = ChangeCustomerEmail(customer_id=CUSTOMER_ID, email=" Countess@Lovelace.ORG ")
    assert decide(given(*ACTIVE), command) == [CustomerEmailChanged(email="countess@lovelace.org")]


@pytest.mark.parametrize("email", ["ada@example.com", "  ADA@Example.Com  "])
def test_changing_to_the_same_normalised_email_changes_nothing(email: str) -> None:
    assert decide(given(*ACTIVE), ChangeCustomerEmail(customer_id=CUSTOMER_ID, email=email)) == []


def test_changing_back_to_an_earlier_email_is_a_change() -> None:
    state = given(*ACTIVE, CustomerEmailChanged(email="new@example.com"))
    command = ChangeCustomerEmail(customer_id=CUSTOMER_ID, email="ada@example.com")
    assert decide(state, command) == [CustomerEmailChanged(email="ada@example.com")]


# --- DeactivateCustomer -----------------------------------------------------------------------------------------


def test_deactivate_customer() -> None:
    assert decide(given(*ACTIVE), DeactivateCustomer(customer_id=CUSTOMER_ID)) == [CustomerDeactivated()]


def test_deactivate_twice_fails() -> None:
    message = then_error(given(*DEACTIVATED), DeactivateCustomer(customer_id=CUSTOMER_ID), FailedPrecondition)
    assert message == f"customer {CUSTOMER_ID} is deactivated; a deactivated customer cannot be changed"


# --- normalisation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("  Ada@Example.COM ", "ada@example.com"),
        ("ada@example.com", "ada@example.com"),
        ("\tBOB.SMITH+Tag@Mail.Example.Org\n", "bob.smith+tag@mail.example.org"),
        ("e\u0301@example.com", "\u00e9@example.com"),  # NFD -> NFC
        ("", ""),
    ],
)
def test_normalize_email(raw: str, normalised: str) -> None:
    assert normalize_email(raw) == normalised


def test_normalize_email_is_idempotent() -> None:
    once = normalize_email("  Ada@Example.COM ")
    assert normalize_email(once) == once


# --- validation: customer_id and name ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("customer_id", "fragment"),
    [
        ("", "is required"),
        ("cust-42", "must be a UUID"),
        (CUSTOMER_ID.upper(), "canonical form"),
        (f" {CUSTOMER_ID}", "leading or trailing whitespace"),
        (CUSTOMER_ID.replace("-", ""), "canonical form"),
    ],
)
def test_customer_id_must_be_a_canonical_uuid(customer_id: str, fragment: str) -> None:
    problems = violations_of(DeactivateCustomer(customer_id=customer_id))
    assert list(problems) == ["customer_id"]
    assert fragment in problems["customer_id"]


@pytest.mark.parametrize("name", ["A", "Ada Lovelace", "Zoë Ångström", "x" * 200, "  " + "x" * 200 + "  ", "李小龍"])
def test_valid_names(name: str) -> None:
    validate_customer(RenameCustomer(customer_id=CUSTOMER_ID, name=name))


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("", "is required"),
        ("   ", "must not consist only of whitespace"),
        ("x" * 201, "at most 200 characters long (got 201)"),
        ("Ada\nLovelace", "control characters (found U+000A at position 3)"),
        ("  Ada\tLovelace", "control characters (found U+0009 at position 3)"),  # positions count after stripping
        ("Ada\x00", "control characters"),
        ("Ada\ud800", "lone surrogate"),
    ],
)
def test_invalid_names(name: str, fragment: str) -> None:
    problems = violations_of(RenameCustomer(customer_id=CUSTOMER_ID, name=name))
    assert list(problems) == ["name"]
    assert fragment in problems["name"]


# --- validation: email ------------------------------------------------------------------------------------------

VALID_EMAILS = [
    "ada@example.com",
    "  Ada@Example.COM ",
    "a@b.co",
    "first.last@example.co.uk",
    "user+tag@sub-domain.example.org",
    "o'brien@example.ie",
    "!#$%&'*+/=?^_`{|}~-@example.com",
    "x@123.example.com",
    "x@a-b-c.example",
    "l" * 64 + "@example.com",
    "x@" + "d" * 63 + ".com",
    "x@" + ".".join(["a" * 60] * 4) + ".com",  # 2 + 243 + 4 = 249 characters
]


@pytest.mark.parametrize("email", VALID_EMAILS)
def test_valid_emails(email: str) -> None:
    validate_customer(ChangeCustomerEmail(customer_id=CUSTOMER_ID, email=email))


def long_email(length: int) -> str:
    domain = ".".join(["a" * 60] * 4) + ".com"  # 247 characters
    local = "l" * (length - len(domain) - 1)
    return f"{local}@{domain}"


@pytest.mark.parametrize(
    ("email", "fragment"),
    [
        ("", "is required"),
        ("   ", "is required"),
        (long_email(255), "at most 254 characters long (got 255)"),
        ("ada.example.com", "exactly one '@' (found 0)"),
        ("ada@home@example.com", "exactly one '@' (found 2)"),
        ("@example.com", "needs a name before the '@'"),
        ("l" * 65 + "@example.com", "before the '@' must be at most 64 characters long (got 65)"),
        ("ada lovelace@example.com", "before the '@' may only contain"),
        ('"ada"@example.com', "(found '\"')"),
        ("ada(comment)@example.com", "(found '(')"),
        ("zoë@example.com", "(found 'ë')"),
        (".ada@example.com", "must not start or end with a dot"),
        ("ada.@example.com", "must not start or end with a dot"),
        ("a..da@example.com", "two dots in a row"),
        ("ada@", "needs a domain after the '@'"),
        ("ada@localhost", "must contain a dot"),
        ("ada@.example.com", "must not start or end with a dot or contain two dots in a row"),
        ("ada@example.com.", "must not start or end with a dot"),
        ("ada@example..com", "two dots in a row"),
        ("ada@-example.com", "'-example' must not start or end with a hyphen"),
        ("ada@example-.com", "must not start or end with a hyphen"),
        ("ada@exa_mple.com", "'exa_mple' may only contain letters a-z, digits and hyphens"),
        ("ada@münchen.de", "may only contain letters a-z, digits and hyphens"),
        ("ada@" + "d" * 64 + ".com", "at most 63 characters long (got 64)"),
        ("ada@example.c", "top-level domain 'c' must be at least two letters"),
        ("ada@example.123", "top-level domain '123'"),
        ("ada@example.c0m", "top-level domain 'c0m'"),
        ("ada@example.com\x00", "control characters"),
        ("ada@exa\x7fmple.com", "control characters (found U+007F at position 7)"),
        ("ada\u200b@example.com", "(found U+200B)"),
    ],
)
def test_invalid_emails(email: str, fragment: str) -> None:
    problems = violations_of(ChangeCustomerEmail(customer_id=CUSTOMER_ID, email=email))
    assert list(problems) == ["email"]
    assert fragment in problems["email"], problems["email"]


def test_email_length_is_measured_after_normalisation() -> None:
    email = long_email(254)
    validate_customer(ChangeCustomerEmail(customer_id=CUSTOMER_ID, email=f"   {email.upper()}\r\n"))


def test_every_bad_field_is_reported_at_once() -> None:
    problems = violations_of(RegisterCustomer(customer_id="nope", name=" ", email="nope"))
    assert list(problems) == ["customer_id", "name", "email"]
    with pytest.raises(InvalidArgument) as caught:
        validate_customer(RegisterCustomer(customer_id="nope", name=" ", email="nope"))
    assert caught.value.message.startswith("invalid request: customer_id: must be a UUID")


def test_only_the_fields_of_the_command_are_checked() -> None:
    validate_customer(DeactivateCustomer(customer_id=CUSTOMER_ID))
    assert list(violations_of(RenameCustomer(customer_id="x", name="Ada"))) == ["customer_id"]
    assert list(violations_of(ChangeCustomerEmail(customer_id=CUSTOMER_ID, email="x"))) == ["email"]


# --- evolve and fold --------------------------------------------------------------------------------------------


def test_evolve_builds_the_state_event_by_event() -> None:
    state = evolve(None, registered())
    assert state == CustomerState(
        customer_id=CUSTOMER_ID,
        name="Ada Lovelace",
        email="ada@example.com",
        status=CustomerStatus.ACTIVE,
        version=1,
    )
    assert state.is_active
    state = evolve(state, CustomerRenamed(name="Augusta Ada King"))
    state = evolve(state, CustomerEmailChanged(email="countess@lovelace.org"))
    assert (state.name, state.email, state.version) == ("Augusta Ada King", "countess@lovelace.org", 3)
    state = evolve(state, CustomerDeactivated())
    assert (state.status, state.is_active, state.version) == (CustomerStatus.DEACTIVATED, False, 4)


def test_fold_of_nothing_is_none_and_fold_continues_from_a_state() -> None:
    assert fold([]) is None
    start = given(*ACTIVE)
    assert fold([], start) is start
    assert fold([CustomerRenamed(name="B")], start) == given(*ACTIVE, CustomerRenamed(name="B"))


@pytest.mark.parametrize(
    "command",
    [
        RegisterCustomer(customer_id=CUSTOMER_ID, name=" Ada ", email=" ADA@EXAMPLE.COM "),
        RenameCustomer(customer_id=CUSTOMER_ID, name="Countess"),
        ChangeCustomerEmail(customer_id=CUSTOMER_ID, email="Countess@Lovelace.org"),
        DeactivateCustomer(customer_id=CUSTOMER_ID),
    ],
    ids=lambda c: type(c).__name__,
)
def test_decided_events_always_evolve(command: CustomerCommand) -> None:
    before = None if isinstance(command, RegisterCustomer) else given(*ACTIVE)
    after = fold(decide(before, command), before)
    assert after is not None
    assert after.version == (before.version if before else 0) + 1
    # Replaying the same command on the new state is a no-op or a refusal, never a second change.
    if isinstance(command, RenameCustomer | ChangeCustomerEmail):
        assert decide(after, command) == []


@pytest.mark.parametrize(
    ("history", "fragment"),
    [
        ((CustomerRenamed(name="Ada"),), "CustomerRenamed cannot apply before CustomerRegistered"),
        ((CustomerDeactivated(),), "CustomerDeactivated cannot apply before CustomerRegistered"),
        ((registered(), registered()), f"customer {CUSTOMER_ID} already exists"),
        ((*DEACTIVATED, CustomerRenamed(name="B")), "is deactivated"),
        ((*DEACTIVATED, CustomerDeactivated()), "is deactivated"),
        ((registered(), OrderPlaced()), "no rule for OrderPlaced"),
    ],
    ids=["rename-first", "deactivate-first", "register-twice", "after-deactivation", "deactivate-twice", "foreign"],
)
def test_impossible_histories_are_value_errors(history: tuple[Event, ...], fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        fold(history)


# --- email_claims -----------------------------------------------------------------------------------------------


def test_register_reserves_its_email() -> None:
    events = decide(None, RegisterCustomer(customer_id=CUSTOMER_ID, name="Ada", email=" Ada@Example.com"))
    assert email_claims(None, events) == ("ada@example.com", None)


def test_email_change_reserves_the_new_and_releases_the_old() -> None:
    state = given(*ACTIVE)
    events = decide(state, ChangeCustomerEmail(customer_id=CUSTOMER_ID, email="New@Example.com"))
    assert email_claims(state, events) == ("new@example.com", "ada@example.com")


@pytest.mark.parametrize(
    "command",
    [
        RenameCustomer(customer_id=CUSTOMER_ID, name="Countess"),
        ChangeCustomerEmail(customer_id=CUSTOMER_ID, email="ADA@example.com"),  # no-op
        DeactivateCustomer(customer_id=CUSTOMER_ID),
    ],
    ids=["rename", "same-email", "deactivate"],
)
def test_other_outcomes_claim_nothing(command: CustomerCommand) -> None:
    state = given(*ACTIVE)
    assert email_claims(state, decide(state, command)) == (None, None)
