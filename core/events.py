"""Event registry and payload codec.

Every stored event has a type name and a schema version. A type name is never renamed; when a payload's shape
changes, the new shape gets a higher schema version and an upcaster turns older payloads into it, so readers only
ever see the current shape.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

from core.values import Address

Payload = dict[str, Any]
Upcaster = Callable[[Payload], Payload]


class Event:
    """Base of all domain events (frozen dataclasses registered with `@register`)."""

    event_type: ClassVar[str]
    schema_version: ClassVar[int]

    def to_payload(self) -> Payload:
        payload: Payload = {}
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, field.name)
            payload[field.name] = value.to_dict() if isinstance(value, Address) else value
        return payload


class UnknownEventType(ValueError):
    """The stored type name (or schema version) is not known to this build."""


class MalformedEvent(ValueError):
    """The payload does not fit the event type's shape."""


_REGISTRY: dict[str, type[Event]] = {}
_UPCASTERS: dict[tuple[str, int], Upcaster] = {}

E = TypeVar("E", bound=type[Event])


def register(event_type: str, schema_version: int = 1) -> Callable[[E], E]:
    """Class decorator: registers an event dataclass under its permanent type name."""

    def wrap(cls: E) -> E:
        if event_type in _REGISTRY:
            raise ValueError(f"event type {event_type!r} registered twice")
        cls.event_type = event_type
        cls.schema_version = schema_version
        _REGISTRY[event_type] = cls
        return cls

    return wrap


def upcaster(event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
    """Registers a function turning a `from_version` payload into the `from_version + 1` shape."""

    def wrap(fn: Upcaster) -> Upcaster:
        _UPCASTERS[(event_type, from_version)] = fn
        return fn

    return wrap


def known_event_types() -> frozenset[str]:
    return frozenset(_REGISTRY)


def decode_event(event_type: str, schema_version: int, payload: Payload) -> Event:
    """Builds the current-shape event object from a stored payload, upcasting older schema versions."""
    cls = _REGISTRY.get(event_type)
    if cls is None:
        raise UnknownEventType(f"unknown event type {event_type!r}")
    if schema_version > cls.schema_version:
        raise UnknownEventType(
            f"{event_type} schema version {schema_version} is newer than this build knows ({cls.schema_version})"
        )
    while schema_version < cls.schema_version:
        up = _UPCASTERS.get((event_type, schema_version))
        if up is None:
            raise UnknownEventType(f"no upcaster for {event_type} from schema version {schema_version}")
        try:
            payload = up(payload)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedEvent(f"{event_type} v{schema_version} could not be upcast: {exc!r}") from exc
        schema_version += 1
    return _from_payload(cls, payload)


_FIELDS: dict[type[Event], tuple[tuple[dataclasses.Field[Any], Any], ...]] = {}


def _fields_of(cls: type[Event]) -> tuple[tuple[dataclasses.Field[Any], Any], ...]:
    """Each dataclass field of `cls` with its resolved type (resolving them is slow; every decode needs them)."""
    fields = _FIELDS.get(cls)
    if fields is None:
        hints = typing.get_type_hints(cls)
        fields = tuple((field, hints[field.name]) for field in dataclasses.fields(cls))  # type: ignore[arg-type]
        _FIELDS[cls] = fields
    return fields


def _from_payload(cls: type[Event], payload: Payload) -> Event:
    kwargs: dict[str, Any] = {}
    try:
        for field, expected in _fields_of(cls):
            if field.name not in payload:
                if field.default is not dataclasses.MISSING:
                    continue
                raise MalformedEvent(f"{cls.event_type}: payload lacks field {field.name!r}")
            value = payload[field.name]
            if expected is Address:
                value = Address.from_dict(value)
            elif expected in (int, str) and (not isinstance(value, expected) or isinstance(value, bool)):
                raise MalformedEvent(f"{cls.event_type}.{field.name}: expected {expected.__name__}")
            kwargs[field.name] = value
        return cls(**kwargs)
    except (KeyError, TypeError, AttributeError) as exc:
        raise MalformedEvent(f"{cls.event_type}: {exc}") from exc


# Import the event modules so their classes are registered whenever the codec is used.
import core.customer_events  # noqa: E402
import core.order_events  # noqa: E402,F401
