"""Errors: calls raise `grpc.aio.AioRpcError` unchanged; these helpers read its rich `google.rpc` details."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import cast

import grpc
from google.rpc import error_details_pb2, status_pb2

_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One `google.rpc.BadRequest` field violation: which request field is wrong and why."""

    field: str
    description: str


def rich_status(error: grpc.aio.AioRpcError) -> status_pb2.Status | None:
    """The `google.rpc.Status` the server attached to the error, if any."""
    # grpc-stubs types metadata items opaquely; at run time they are (key, value) pairs.
    pairs = cast("Iterable[tuple[str, str | bytes]]", error.trailing_metadata() or ())
    for key, value in pairs:
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status()
            status.ParseFromString(value)
            return status
    return None


def field_violations(error: grpc.aio.AioRpcError) -> list[FieldViolation]:
    """Field violations of an INVALID_ARGUMENT error (empty for other errors or when there are none)."""
    status = rich_status(error)
    if status is None:
        return []
    found: list[FieldViolation] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            found.extend(FieldViolation(v.field, v.description) for v in bad_request.field_violations)
    return found
