"""Maps ServiceError to gRPC status with `google.rpc` rich details, shared by both gRPC servers."""

from __future__ import annotations

import logging
from typing import NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from core.errors import (
    AlreadyExists,
    Conflict,
    DependencyUnavailable,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ServiceError,
    Unavailable,
)
from core.log_throttle import per_request

_CODES: list[tuple[type[ServiceError], grpc.StatusCode, int]] = [
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, code_pb2.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND, code_pb2.NOT_FOUND),
    (AlreadyExists, grpc.StatusCode.ALREADY_EXISTS, code_pb2.ALREADY_EXISTS),
    (FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, code_pb2.FAILED_PRECONDITION),
    (Conflict, grpc.StatusCode.ABORTED, code_pb2.ABORTED),
    (Unavailable, grpc.StatusCode.UNAVAILABLE, code_pb2.UNAVAILABLE),
]


def to_rpc_status(error: ServiceError) -> status_pb2.Status:
    """Builds the google.rpc.Status (with BadRequest field violations for InvalidArgument)."""
    numeric = next((num for cls, _, num in _CODES if isinstance(error, cls)), code_pb2.INTERNAL)
    status = status_pb2.Status(code=numeric, message=error.message)
    if isinstance(error, InvalidArgument):
        bad_request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        detail = any_pb2.Any()
        detail.Pack(bad_request)
        status.details.append(detail)
    return status


async def abort_with(context: grpc.aio.ServicerContext[object, object], error: ServiceError) -> None:
    """Ends the RPC with the error's status, message and rich details; never returns."""
    await context.abort_with_status(rpc_status.to_status(to_rpc_status(error)))  # type: ignore[attr-defined]


async def abort_for(
    context: grpc.aio.ServicerContext[object, object], method: str, exc: Exception, log: logging.Logger
) -> NoReturn:
    """Ends the RPC `method` with the status `exc` deserves; never returns. The one error -> status mapping of
    both servers' runners (ARCHITECTURE guarantee 7): a ServiceError gets its own status, anything else INTERNAL
    with a generic message (the traceback goes to `log`, never to the caller).

    A dependency outage is logged as a warning naming the dependency and the driver's detail, which the caller
    does not see; any other UNAVAILABLE (e.g. a read model behind a consistency token) at info level. Both fail
    every request while they last, so each method logs them at most once per window (`core.log_throttle`).
    """
    if isinstance(exc, DependencyUnavailable):
        per_request.log(
            log, logging.WARNING, (method, exc.dependency), "%s: %s is unavailable: %s", method, exc.dependency,
            exc.detail,
        )  # fmt: skip
    elif isinstance(exc, Unavailable):
        per_request.log(log, logging.INFO, (method, Unavailable), "%s: %s", method, exc.message)
    if isinstance(exc, ServiceError):
        await abort_with(context, exc)
    log.error("%s failed unexpectedly", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, "internal error; it has been logged")


def field_violations(error: grpc.aio.AioRpcError | grpc.RpcError) -> list[tuple[str, str]]:
    """Client-side helper: (field, description) pairs of a BadRequest detail, if any."""
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    if status is None:
        return []
    pairs: list[tuple[str, str]] = []
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad_request = error_details_pb2.BadRequest()
            detail.Unpack(bad_request)
            pairs.extend((v.field, v.description) for v in bad_request.field_violations)
    return pairs
