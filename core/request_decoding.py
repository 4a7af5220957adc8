"""Requests that cannot be decoded are INVALID_ARGUMENT, not grpcio's UNKNOWN with the parser's text.

grpcio decodes a request with the handler's `request_deserializer` before any servicer code runs; when that
raises (truncated frames, random bytes, a string field that is not valid UTF-8), grpc.aio answers
`UNKNOWN: Unexpected <class 'google.protobuf.message.DecodeError'>: ...`. This interceptor swaps in a
deserializer that never raises: an undecodable request becomes a `Malformed` marker, and the handler answers it
with INVALID_ARGUMENT and a `google.rpc.BadRequest` violation on `request` before the servicer sees anything.
Both servers install it (see `core.grpc_server` / the servers' interceptor lists).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc

from core.errors import FieldViolation, InvalidArgument
from core.grpc_errors import abort_with
from core.grpc_server import ServerInterceptorBase, responses_of

Context = grpc.aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class Malformed:
    """Stands in for a request whose bytes are not a valid encoding of the method's request message."""

    method: str


def malformed_request_error(method: str) -> InvalidArgument:
    """The error an undecodable request gets: what is wrong, never the parser's own text."""
    return InvalidArgument(
        [
            FieldViolation(
                "request",
                f"is not a valid protobuf encoding of the request message of {method} "
                "(truncated, corrupt, or a string field that is not valid UTF-8)",
            )
        ]
    )


def _safe(deserializer: Callable[[bytes], Any], method: str) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return deserializer(raw)
        except Exception:  # DecodeError, and anything else a parser raises on hostile bytes
            return Malformed(method)

    return deserialize


def _unary(behavior: Callable[..., Any]) -> Callable[[Any, Context], Awaitable[Any]]:
    async def handle(request: Any, context: Context) -> Any:
        if isinstance(request, Malformed):
            await abort_with(context, malformed_request_error(request.method))
        return await behavior(request, context)

    return handle


def _streaming(behavior: Callable[..., Any]) -> Callable[[Any, Context], AsyncIterator[Any]]:
    async def handle(request: Any, context: Context) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            await abort_with(context, malformed_request_error(request.method))
        async for response in responses_of(behavior(request, context)):
            yield response

    return handle


class MalformedRequestInterceptor(ServerInterceptorBase):
    """Makes every unary-request method of a server answer undecodable requests with INVALID_ARGUMENT."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler  # unknown method, raw bytes, or client streaming (none of ours): unchanged
        method = handler_call_details.method
        deserializer = _safe(handler.request_deserializer, method)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _unary(handler.unary_unary),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _streaming(handler.unary_stream),
                request_deserializer=deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
