"""gRPC adapter of the command side: proto request -> command, handler -> reply, errors -> precise status."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from cqrs.orders.v1 import command_service_pb2 as pb
from cqrs.orders.v1 import command_service_pb2_grpc as pb_grpc
from cqrs.orders.v1 import order_pb2
from google.protobuf.message import Message

from command_service.domain import commands as cmd
from command_service.domain.validation import validate
from command_service.event_store import CommandReply
from command_service.handlers import CommandContext, CommandHandler
from command_service.outages import CONNECTION_LOST, UNAVAILABLE_MESSAGE
from core import logs
from core.consistency import ConsistencyToken
from core.errors import FieldViolation, InvalidArgument, ServiceError, Unavailable
from core.grpc_errors import abort_with
from core.values import Address

log = logging.getLogger(__name__)

MAX_REQUEST_ID_LENGTH = 128
CORRELATION_HEADER = "x-correlation-id"
# A command stops this long before the caller's deadline, so that its UNAVAILABLE reaches the caller in time.
DEADLINE_MARGIN_SECONDS = 0.25

Context = grpc.aio.ServicerContext[Any, Any]
R = TypeVar("R", bound=Message)
CommandT = TypeVar("CommandT")


def _address(message: order_pb2.Address) -> Address:
    return Address(
        recipient=message.recipient,
        line1=message.line1,
        line2=message.line2,
        city=message.city,
        postal_code=message.postal_code,
        country=message.country,
    )


_EMPTY_ADDRESS = Address(recipient="", line1="", line2="", city="", postal_code="", country="")


def _shipping_address(request: Any, violations: list[FieldViolation]) -> Address:
    """The request's address; a missing one is reported as such (not as six empty sub-fields)."""
    if request.HasField("shipping_address"):
        return _address(request.shipping_address)
    violations.append(FieldViolation("shipping_address", "required"))
    return _EMPTY_ADDRESS


def _expected_version(request: Any) -> int | None:
    if "expected_version" in request.DESCRIPTOR.fields_by_name and request.HasField("expected_version"):
        return int(request.expected_version)
    return None


def _envelope_violations(request: Any) -> list[FieldViolation]:
    """Violations of the fields every command request has (request_id, expected_version)."""
    violations: list[FieldViolation] = []
    request_id = request.request_id
    if not request_id:
        violations.append(FieldViolation("request_id", "required: a unique idempotency key per command"))
    elif len(request_id) > MAX_REQUEST_ID_LENGTH or not request_id.isprintable() or request_id.strip() != request_id:
        violations.append(
            FieldViolation("request_id", f"must be 1..{MAX_REQUEST_ID_LENGTH} printable characters, no spaces around")
        )
    expected = _expected_version(request)
    if expected is not None and expected < 0:
        violations.append(FieldViolation("expected_version", "must be >= 0"))
    return violations


def _without_shadowed(violations: list[FieldViolation]) -> list[FieldViolation]:
    """Drops `a.b` violations when `a` itself is already reported (e.g. a missing message)."""
    whole = {v.field for v in violations}
    return [v for v in violations if not any(v.field.startswith(f + ".") for f in whole)]


def _fingerprint(method: str, request: Message) -> str:
    """Identifies the command independent of its request_id, to detect a request_id reused for another command."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.ClearField("request_id")
    return hashlib.sha256(method.encode() + b"\0" + copy.SerializeToString(deterministic=True)).hexdigest()


async def run_command(
    method: str,
    request: Any,
    context: Context,
    handler: CommandHandler[Any, CommandT],
    build: Callable[[list[FieldViolation]], CommandT],
    validate_command: Callable[[CommandT], None],
    reply: Callable[[CommandReply], R],
) -> R:
    """The shared path of every command RPC: validate all fields at once, handle, map errors to statuses."""
    try:
        violations = _envelope_violations(request)
        command = build(violations)
        try:
            validate_command(command)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
        if violations:
            raise InvalidArgument(_without_shadowed(violations))
        ctx = CommandContext(
            request_id=request.request_id,
            request_hash=_fingerprint(method, request),
            expected_version=_expected_version(request),
            correlation_id=_metadata_value(context, CORRELATION_HEADER) or request.request_id,
        )
        logs.correlation_id.set(ctx.correlation_id)
        try:
            # One budget for the whole command (load, decide, append, retries), inside the caller's deadline: a
            # PostgreSQL that accepts connections but answers nothing (a blackholed network) must get UNAVAILABLE
            # before the client gives up, not DEADLINE_EXCEEDED. Stopped mid-append, the outcome is unknown;
            # the client's retry with the same request_id then writes it once.
            async with asyncio.timeout(_command_budget(context, handler.max_seconds)):
                return reply(await handler.handle(command, ctx))
        except TimeoutError as exc:
            raise Unavailable(f"{UNAVAILABLE_MESSAGE} (no answer in time)") from exc
    except ServiceError as exc:
        await abort_with(context, exc)
    except CONNECTION_LOST as exc:  # the store translates these; this catches any path that does not
        log.warning("%s: event store (PostgreSQL) unavailable: %r", method, exc)
        await abort_with(context, Unavailable(UNAVAILABLE_MESSAGE))
    except Exception:
        log.exception("%s failed unexpectedly", method)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; it has been logged")
    raise AssertionError("unreachable: abort raises")


def _command_budget(context: Context, max_seconds: float) -> float:
    """Seconds the command may take: the caller's remaining deadline less a margin to answer, capped."""
    remaining = context.time_remaining()
    if remaining is None:
        return max_seconds
    return max(0.05, min(max_seconds, remaining - DEADLINE_MARGIN_SECONDS))


def consistency_token(reply: CommandReply) -> str:
    return ConsistencyToken(reply.stream_type, reply.stream_id, reply.version, reply.position).encode()


class OrderCommandServicer(pb_grpc.OrderCommandServiceServicer):
    def __init__(self, handler: CommandHandler[Any, cmd.OrderCommand]) -> None:
        self._handler = handler

    async def _run(
        self,
        method: str,
        request: Any,
        context: Context,
        build: Callable[[list[FieldViolation]], cmd.OrderCommand],
        reply: Callable[[pb.CommandResult], R],
    ) -> R:
        return await run_command(
            method, request, context, self._handler, build, validate, lambda r: reply(_order_result(r))
        )

    async def CreateOrder(self, request: pb.CreateOrderRequest, context: Context) -> pb.CreateOrderResponse:
        def build(violations: list[FieldViolation]) -> cmd.OrderCommand:
            return cmd.CreateOrder(
                order_id=str(uuid.uuid4()),
                customer_id=request.customer_id,
                currency=request.currency,
                shipping_address=_shipping_address(request, violations),
            )

        return await self._run("CreateOrder", request, context, build, lambda r: pb.CreateOrderResponse(result=r))

    async def AddOrderItem(self, request: pb.AddOrderItemRequest, context: Context) -> pb.AddOrderItemResponse:
        return await self._run(
            "AddOrderItem",
            request,
            context,
            lambda _: cmd.AddOrderItem(
                order_id=request.order_id,
                sku=request.sku,
                name=request.name,
                quantity=request.quantity,
                unit_price_minor=request.unit_price_minor,
            ),
            lambda r: pb.AddOrderItemResponse(result=r),
        )

    async def RemoveOrderItem(self, request: pb.RemoveOrderItemRequest, context: Context) -> pb.RemoveOrderItemResponse:
        return await self._run(
            "RemoveOrderItem",
            request,
            context,
            lambda _: cmd.RemoveOrderItem(order_id=request.order_id, sku=request.sku),
            lambda r: pb.RemoveOrderItemResponse(result=r),
        )

    async def ChangeItemQuantity(
        self, request: pb.ChangeItemQuantityRequest, context: Context
    ) -> pb.ChangeItemQuantityResponse:
        return await self._run(
            "ChangeItemQuantity",
            request,
            context,
            lambda _: cmd.ChangeItemQuantity(order_id=request.order_id, sku=request.sku, quantity=request.quantity),
            lambda r: pb.ChangeItemQuantityResponse(result=r),
        )

    async def ChangeShippingAddress(
        self, request: pb.ChangeShippingAddressRequest, context: Context
    ) -> pb.ChangeShippingAddressResponse:
        def build(violations: list[FieldViolation]) -> cmd.OrderCommand:
            return cmd.ChangeShippingAddress(
                order_id=request.order_id, shipping_address=_shipping_address(request, violations)
            )

        return await self._run(
            "ChangeShippingAddress", request, context, build, lambda r: pb.ChangeShippingAddressResponse(result=r)
        )

    async def PlaceOrder(self, request: pb.PlaceOrderRequest, context: Context) -> pb.PlaceOrderResponse:
        return await self._run(
            "PlaceOrder",
            request,
            context,
            lambda _: cmd.PlaceOrder(order_id=request.order_id),
            lambda r: pb.PlaceOrderResponse(result=r),
        )

    async def CancelOrder(self, request: pb.CancelOrderRequest, context: Context) -> pb.CancelOrderResponse:
        return await self._run(
            "CancelOrder",
            request,
            context,
            lambda _: cmd.CancelOrder(order_id=request.order_id, reason=request.reason),
            lambda r: pb.CancelOrderResponse(result=r),
        )

    async def DeleteOrder(self, request: pb.DeleteOrderRequest, context: Context) -> pb.DeleteOrderResponse:
        return await self._run(
            "DeleteOrder",
            request,
            context,
            lambda _: cmd.DeleteOrder(order_id=request.order_id),
            lambda r: pb.DeleteOrderResponse(result=r),
        )


def _order_result(reply: CommandReply) -> pb.CommandResult:
    return pb.CommandResult(
        order_id=reply.stream_id,
        version=reply.version,
        position=reply.position,
        consistency_token=consistency_token(reply),
    )


def _metadata_value(context: Context, key: str) -> str | None:
    for item_key, value in context.invocation_metadata() or ():
        if item_key == key:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None
