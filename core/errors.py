"""Errors a command or query can fail with, independent of the transport.

The gRPC layers map each class to exactly one status code, so a handler states *what* went wrong and never
chooses a wire code itself.
"""

from __future__ import annotations

from dataclasses import dataclass


class ServiceError(Exception):
    """Base of every error that is reported to a caller (never an INTERNAL error)."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One malformed field of a request: `field` is the proto field path, e.g. `shipping_address.country`."""

    field: str
    description: str


class InvalidArgument(ServiceError):
    """Malformed input; carries one violation per bad field."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        summary = "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(f"invalid request: {summary}")
        self.violations = violations


class NotFound(ServiceError):
    """The addressed entity does not exist (or was deleted)."""


class AlreadyExists(ServiceError):
    """The entity the caller tried to create already exists."""


class FailedPrecondition(ServiceError):
    """A business rule forbids the command in the entity's current state."""


class Conflict(ServiceError):
    """Optimistic concurrency: the entity changed since the caller read it (gRPC ABORTED)."""


class Unavailable(ServiceError):
    """A dependency (database, broker) is unreachable; the caller may retry."""


class DependencyUnavailable(Unavailable):
    """A store's driver lost its server or got no answer in time, translated at the store boundary.

    The caller learns only which dependency is down (`dependency`, e.g. "event store (PostgreSQL)"); `detail` is
    the driver's own text (hosts, ports, topology) and goes to the service's log, never onto the wire.
    """

    def __init__(self, dependency: str, detail: str, *, timed_out: bool = False) -> None:
        suffix = " (no answer in time)" if timed_out else ""
        super().__init__(f"{dependency} is unavailable; retry later{suffix}")
        self.dependency = dependency
        self.detail = detail
