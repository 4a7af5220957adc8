"""Shape checks of a Customer command, before any business rule: every malformed field is reported at once.

`customer_violations` lists one `FieldViolation` per bad field, named by the proto request field (`customer_id`,
`name`, `email`); `validate_customer` raises them as `InvalidArgument`. Emails are checked in their normalised
form (`normalize_email`), which is also the form `customer.decide` puts into events, so what is validated is
exactly what is stored.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Final, assert_never

from command_service.domain.customer_commands import (
    ChangeCustomerEmail,
    CustomerCommand,
    DeactivateCustomer,
    RegisterCustomer,
    RenameCustomer,
)
from command_service.domain.validation import _forbidden_character, _order_id_problem, _Violations
from core.errors import FieldViolation, InvalidArgument

CUSTOMER_NAME_MAX_LENGTH: Final = 200
EMAIL_MAX_LENGTH: Final = 254  # RFC 5321's limit on a forward path, minus the angle brackets
EMAIL_LOCAL_PART_MAX_LENGTH: Final = 64
EMAIL_DOMAIN_LABEL_MAX_LENGTH: Final = 63

# A conservative subset of RFC 5322's dot-atom: no quoted strings, comments or non-ASCII addresses, which many
# mail systems reject anyway.
_LOCAL_PART_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.!#$%&'*+/=?^_`{|}~-"
)
_LOCAL_PART_ALLOWED: Final = "letters a-z, digits, dots and the characters ! # $ % & ' * + / = ? ^ _ ` { | } ~ -"
_DOMAIN_LABEL: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?")
_TLD: Final = re.compile(r"[a-z]{2,}")


def normalize_email(raw: str) -> str:
    """The stored form of an email: surrounding whitespace stripped, lower case, Unicode NFC.

    The whole address is lower-cased (not only the domain): two customers whose addresses differ only in case
    are almost always the same person, and the uniqueness reservation compares these strings.
    """
    return unicodedata.normalize("NFC", raw.strip().lower())


def normalize_name(raw: str) -> str:
    """The stored form of a customer name: surrounding whitespace stripped (inner spacing is kept)."""
    return raw.strip()


def validate_customer(command: CustomerCommand) -> None:
    """Raises InvalidArgument listing every malformed field of `command`; returns None when it is well formed."""
    if found := customer_violations(command):
        raise InvalidArgument(found)


def customer_violations(command: CustomerCommand) -> list[FieldViolation]:
    """Every malformed field of `command`, in field order (empty when it is well formed)."""
    violations = _Violations()
    violations.check("customer_id", _order_id_problem(command.customer_id))
    match command:
        case RegisterCustomer():
            violations.check("name", name_problem(command.name))
            violations.check("email", email_problem(command.email))
        case RenameCustomer():
            violations.check("name", name_problem(command.name))
        case ChangeCustomerEmail():
            violations.check("email", email_problem(command.email))
        case DeactivateCustomer():
            pass
        case _:
            assert_never(command)
    return violations.items


def name_problem(value: object) -> str | None:
    """What is wrong with a customer name (None when it is fine); checked after stripping, as it is stored."""
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "is required"
    stripped = normalize_name(value)
    if not stripped:
        return "must not consist only of whitespace"
    # Checked on what would be stored: surrounding whitespace (even a pasted trailing newline) is stripped anyway.
    if (problem := _forbidden_character(stripped)) is not None:
        return problem
    if len(stripped) > CUSTOMER_NAME_MAX_LENGTH:
        return f"must be at most {CUSTOMER_NAME_MAX_LENGTH} characters long (got {len(stripped)})"
    return None


def email_problem(value: object) -> str | None:
    """What is wrong with an email address after normalisation (None when it is fine)."""
    if not isinstance(value, str):
        return "must be a string"
    email = normalize_email(value)
    if not email:
        return "is required"
    if (problem := _forbidden_character(email)) is not None:
        return problem
    if len(email) > EMAIL_MAX_LENGTH:
        return f"must be at most {EMAIL_MAX_LENGTH} characters long (got {len(email)})"
    ats = email.count("@")
    if ats != 1:
        return f"must contain exactly one '@' (found {ats}), like 'name@example.com'"
    local, domain = email.split("@")
    return _local_part_problem(local) or _domain_problem(domain)


def _local_part_problem(local: str) -> str | None:
    if not local:
        return "needs a name before the '@'"
    if len(local) > EMAIL_LOCAL_PART_MAX_LENGTH:
        return (
            f"the part before the '@' must be at most {EMAIL_LOCAL_PART_MAX_LENGTH} characters long (got {len(local)})"
        )
    bad = next((char for char in local if char not in _LOCAL_PART_CHARS), None)
    if bad is not None:
        found = repr(bad) if bad.isprintable() and not bad.isspace() else f"U+{ord(bad):04X}"
        return f"the part before the '@' may only contain {_LOCAL_PART_ALLOWED} (found {found})"
    if local.startswith(".") or local.endswith("."):
        return "the part before the '@' must not start or end with a dot"
    if ".." in local:
        return "the part before the '@' must not contain two dots in a row"
    return None


def _domain_problem(domain: str) -> str | None:
    if not domain:
        return "needs a domain after the '@', like 'example.com'"
    if "." not in domain:
        return f"the domain {domain!r} must contain a dot, like 'example.com'"
    labels = domain.split(".")
    if any(not label for label in labels):
        return f"the domain {domain!r} must not start or end with a dot or contain two dots in a row"
    for label in labels:
        if len(label) > EMAIL_DOMAIN_LABEL_MAX_LENGTH:
            return (
                f"each dot-separated part of the domain must be at most {EMAIL_DOMAIN_LABEL_MAX_LENGTH} characters "
                f"long (got {len(label)})"
            )
        if _DOMAIN_LABEL.fullmatch(label) is None:
            if label.startswith("-") or label.endswith("-"):
                return f"the domain part {label!r} must not start or end with a hyphen"
            return f"the domain part {label!r} may only contain letters a-z, digits and hyphens"
    if _TLD.fullmatch(labels[-1]) is None:
        return f"the top-level domain {labels[-1]!r} must be at least two letters, like 'com'"
    return None
