"""Value types shared by the write model, the events and the read model. Money is always integer minor units."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Address:
    recipient: str
    line1: str
    line2: str
    city: str
    postal_code: str
    country: str

    def to_dict(self) -> dict[str, str]:
        return {
            "recipient": self.recipient,
            "line1": self.line1,
            "line2": self.line2,
            "city": self.city,
            "postal_code": self.postal_code,
            "country": self.country,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Address:
        return cls(
            recipient=str(data["recipient"]),
            line1=str(data["line1"]),
            line2=str(data.get("line2", "")),
            city=str(data["city"]),
            postal_code=str(data["postal_code"]),
            country=str(data["country"]),
        )


@dataclass(frozen=True, slots=True)
class OrderLine:
    sku: str
    name: str
    quantity: int
    unit_price_minor: int

    @property
    def line_total_minor(self) -> int:
        return self.quantity * self.unit_price_minor
