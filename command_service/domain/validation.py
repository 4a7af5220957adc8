"""Shape checks of a command, before any business rule: every malformed field is reported at once.

`order_violations` lists one `FieldViolation` per bad field, named by the proto request field path (e.g.
`shipping_address.country`), so the gRPC runner can return them as `google.rpc.BadRequest` unchanged, together
with the request's own (request_id, missing messages); `validate` raises them as `InvalidArgument`.
It looks only at the command, never at the order's state: that is `order.decide`'s job.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from dataclasses import dataclass, field
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
from core.errors import FieldViolation, InvalidArgument
from core.values import Address

CUSTOMER_ID_MAX_LENGTH: Final = 64
CUSTOMER_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:-]+")
CUSTOMER_ID_ALLOWED: Final = "letters A-Z and a-z, digits and the characters . _ : -"

SKU_MAX_LENGTH: Final = 64
SKU_PATTERN: Final = re.compile(r"[A-Za-z0-9._-]+")
SKU_ALLOWED: Final = "letters A-Z and a-z, digits and the characters . _ -"

ITEM_NAME_MAX_LENGTH: Final = 200
QUANTITY_MIN: Final = 1
QUANTITY_MAX: Final = 10_000
UNIT_PRICE_MINOR_MIN: Final = 0
UNIT_PRICE_MINOR_MAX: Final = 100_000_000_000
CANCEL_REASON_MAX_LENGTH: Final = 500

ADDRESS_FIELD_MAX_LENGTH: Final = 200
POSTAL_CODE_MAX_LENGTH: Final = 20

# ISO 4217 List One (current currency and funds codes) as published by the maintenance agency on 2025-05-12.
# It includes funds, precious metals and the special codes XTS/XXX because they are active codes; when the
# agency withdraws a code (e.g. BGN after Bulgaria's move to the euro), remove it here.
ISO_4217_CURRENCY_CODES: Final = frozenset(
    """
    AED AFN ALL AMD AOA ARS AUD AWG AZN
    BAM BBD BDT BGN BHD BIF BMD BND BOB BOV BRL BSD BTN BWP BYN BZD
    CAD CDF CHE CHF CHW CLF CLP CNY COP COU CRC CUP CVE CZK
    DJF DKK DOP DZD
    EGP ERN ETB EUR
    FJD FKP
    GBP GEL GHS GIP GMD GNF GTQ GYD
    HKD HNL HTG HUF
    IDR ILS INR IQD IRR ISK
    JMD JOD JPY
    KES KGS KHR KMF KPW KRW KWD KYD KZT
    LAK LBP LKR LRD LSL LYD
    MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MXV MYR MZN
    NAD NGN NIO NOK NPR NZD
    OMR
    PAB PEN PGK PHP PKR PLN PYG
    QAR
    RON RSD RUB RWF
    SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL
    THB TJS TMT TND TOP TRY TTD TWD TZS
    UAH UGX USD USN UYI UYU UYW UZS
    VED VES VND VUV
    WST
    XAD XAF XAG XAU XBA XBB XBC XBD XCD XCG XDR XOF XPD XPF XPT XSU XTS XUA XXX
    YER
    ZAR ZMW ZWG
    """.split()
)

# The 249 officially assigned ISO 3166-1 alpha-2 codes (user-assigned codes such as XK are not included).
ISO_3166_1_ALPHA_2_CODES: Final = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ
    BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS BT BV BW BY BZ
    CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ
    DE DJ DK DM DO DZ
    EC EE EG EH ER ES ET
    FI FJ FK FM FO FR
    GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY
    HK HM HN HR HT HU
    ID IE IL IM IN IO IQ IR IS IT
    JE JM JO JP
    KE KG KH KI KM KN KP KR KW KY KZ
    LA LB LC LI LK LR LS LT LU LV LY
    MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ
    NA NC NE NF NG NI NL NO NP NR NU NZ
    OM
    PA PE PF PG PH PK PL PM PN PR PS PT PW PY
    QA
    RE RO RS RU RW
    SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ
    TC TD TF TG TH TJ TK TL TM TN TO TR TT TV TW TZ
    UA UG UM US UY UZ
    VA VC VE VG VI VN VU
    WF WS
    YE YT
    ZA ZM ZW
    """.split()
)

_UUID_EXAMPLE: Final = "3f2c8a9e-5b1d-4c7a-9e2f-0a1b2c3d4e5f"


def validate(command: OrderCommand) -> None:
    """Raises InvalidArgument listing every malformed field of `command`; returns None when it is well formed."""
    if found := order_violations(command):
        raise InvalidArgument(found)


def order_violations(command: OrderCommand) -> list[FieldViolation]:
    """Every malformed field of `command`, in field order (empty when it is well formed)."""
    violations = _Violations()
    violations.check("order_id", _order_id_problem(command.order_id))
    match command:
        case CreateOrder():
            violations.check("customer_id", _customer_id_problem(command.customer_id))
            violations.check("currency", _currency_problem(command.currency))
            _check_address(violations, "shipping_address", command.shipping_address)
        case AddOrderItem():
            violations.check("sku", _sku_problem(command.sku))
            violations.check("name", _text_problem(command.name, max_length=ITEM_NAME_MAX_LENGTH))
            violations.check("quantity", _quantity_problem(command.quantity))
            violations.check(
                "unit_price_minor",
                _int_problem(command.unit_price_minor, minimum=UNIT_PRICE_MINOR_MIN, maximum=UNIT_PRICE_MINOR_MAX),
            )
        case RemoveOrderItem():
            violations.check("sku", _sku_problem(command.sku))
        case ChangeItemQuantity():
            violations.check("sku", _sku_problem(command.sku))
            problem = _quantity_problem(command.quantity)
            if problem is not None and type(command.quantity) is int and command.quantity == 0:
                problem += "; to remove the line use RemoveOrderItem"
            violations.check("quantity", problem)
        case ChangeShippingAddress():
            _check_address(violations, "shipping_address", command.shipping_address)
        case CancelOrder():
            violations.check("reason", _text_problem(command.reason, max_length=CANCEL_REASON_MAX_LENGTH))
        case PlaceOrder() | DeleteOrder():
            pass
        case _:
            assert_never(command)
    return violations.items


@dataclass
class _Violations:
    items: list[FieldViolation] = field(default_factory=list)

    def check(self, field_path: str, problem: str | None) -> None:
        if problem is not None:
            self.items.append(FieldViolation(field=field_path, description=problem))


def _check_address(violations: _Violations, prefix: str, address: object) -> None:
    if not isinstance(address, Address):
        violations.check(prefix, "is required")
        return
    limit = ADDRESS_FIELD_MAX_LENGTH
    violations.check(f"{prefix}.recipient", _text_problem(address.recipient, max_length=limit))
    violations.check(f"{prefix}.line1", _text_problem(address.line1, max_length=limit))
    violations.check(f"{prefix}.line2", _text_problem(address.line2, max_length=limit, optional=True))
    violations.check(f"{prefix}.city", _text_problem(address.city, max_length=limit))
    violations.check(f"{prefix}.postal_code", _text_problem(address.postal_code, max_length=POSTAL_CODE_MAX_LENGTH))
    violations.check(f"{prefix}.country", _country_problem(address.country))


def _order_id_problem(value: object) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "is required"
    if value != value.strip():
        return "must not have leading or trailing whitespace"
    try:
        canonical = str(uuid.UUID(value))
    except ValueError:
        return f"must be a UUID such as {_UUID_EXAMPLE!r}"
    if value != canonical:
        # Ids are compared as strings everywhere (event store, subjects, read model): one spelling per order.
        return f"must be a UUID in canonical form (lowercase hex with hyphens): {canonical!r}"
    return None


def _customer_id_problem(value: object) -> str | None:
    return _identifier_problem(
        value, max_length=CUSTOMER_ID_MAX_LENGTH, pattern=CUSTOMER_ID_PATTERN, allowed=CUSTOMER_ID_ALLOWED
    )


def _sku_problem(value: object) -> str | None:
    return _identifier_problem(value, max_length=SKU_MAX_LENGTH, pattern=SKU_PATTERN, allowed=SKU_ALLOWED)


def _identifier_problem(value: object, *, max_length: int, pattern: re.Pattern[str], allowed: str) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "is required"
    if value != value.strip():
        return "must not have leading or trailing whitespace"
    if (problem := _forbidden_character(value)) is not None:
        return problem
    if len(value) > max_length:
        return f"must be at most {max_length} characters long (got {len(value)})"
    if pattern.fullmatch(value) is None:
        return f"may only contain {allowed}"
    return None


def _text_problem(value: object, *, max_length: int, optional: bool = False) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return None if optional else "is required"
    if (problem := _forbidden_character(value)) is not None:
        return problem
    if not value.strip():
        return "must not consist only of whitespace"
    if len(value) > max_length:
        return f"must be at most {max_length} characters long (got {len(value)})"
    return None


def _forbidden_character(value: str) -> str | None:
    """What makes `value` unfit to store as text (None when it is fine).

    Control characters (NUL included), line/paragraph separators and noncharacters are refused; everything else
    in Unicode is welcome: any script, right-to-left text and its direction marks, emoji.
    """
    for index, char in enumerate(value):
        category = unicodedata.category(char)
        if category == "Cc":
            return f"must not contain control characters (found U+{ord(char):04X} at position {index})"
        if category == "Cs":
            # A lone surrogate cannot be encoded as UTF-8, so it could not be stored or sent on.
            return f"must be valid Unicode text (found a lone surrogate at position {index})"
        if category in ("Zl", "Zp"):
            return f"must be a single line (found U+{ord(char):04X} at position {index})"
        if _is_noncharacter(ord(char)):
            return f"must not contain Unicode noncharacters (found U+{ord(char):04X} at position {index})"
    return None


def _is_noncharacter(code_point: int) -> bool:
    # U+FDD0..U+FDEF and the last two code points of every plane are permanently reserved for internal use.
    return 0xFDD0 <= code_point <= 0xFDEF or code_point & 0xFFFE == 0xFFFE


def _currency_problem(value: object) -> str | None:
    return _code_problem(value, ISO_4217_CURRENCY_CODES, "an active ISO 4217 currency code such as 'EUR'")


def _country_problem(value: object) -> str | None:
    return _code_problem(value, ISO_3166_1_ALPHA_2_CODES, "an ISO 3166-1 alpha-2 country code such as 'DE'")


def _code_problem(value: object, codes: frozenset[str], what: str) -> str | None:
    if not isinstance(value, str):
        return "must be a string"
    if not value:
        return "is required"
    if value in codes:
        return None
    if value.upper() in codes:
        return f"must be upper case: use {value.upper()!r}"
    return f"must be {what}"


def _quantity_problem(value: object) -> str | None:
    return _int_problem(value, minimum=QUANTITY_MIN, maximum=QUANTITY_MAX)


def _int_problem(value: object, *, minimum: int, maximum: int) -> str | None:
    # bool is an int subclass, but `True` is not a quantity.
    if isinstance(value, bool) or not isinstance(value, int):
        return "must be an integer"
    if not minimum <= value <= maximum:
        return f"must be between {minimum} and {maximum} (got {value})"
    return None
