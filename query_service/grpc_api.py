"""The OrderQueryService gRPC servicer: request validation, read-model queries, errors -> gRPC status."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from cqrs.orders.v1 import query_service_pb2, query_service_pb2_grpc

from core.errors import FieldViolation, InvalidArgument, NotFound, ServiceError, Unavailable
from core.grpc_errors import abort_with
from query_service import paging, views
from query_service.read_model import OrderReadModel, describe_mongo_error, is_mongo_unavailable

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
_Response = TypeVar("_Response")

# Canonical hyphenated form only: the read model is keyed by `str(uuid.UUID(...))`, and accepting the other
# spellings `uuid.UUID` allows (braces, urn:uuid:, no hyphens) would only hide client bugs.
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class OrderQueryServicer(query_service_pb2_grpc.OrderQueryServiceServicer):
    """Answers GetOrder and ListOrders from the MongoDB read model only."""

    def __init__(self, read_model: OrderReadModel) -> None:
        self._read_model = read_model

    async def GetOrder(
        self, request: query_service_pb2.GetOrderRequest, context: Context
    ) -> query_service_pb2.GetOrderResponse:
        return await _answer(context, "GetOrder", lambda: self._get_order(request))

    async def ListOrders(
        self, request: query_service_pb2.ListOrdersRequest, context: Context
    ) -> query_service_pb2.ListOrdersResponse:
        return await _answer(context, "ListOrders", lambda: self._list_orders(request))

    async def WatchOrder(
        self, request: query_service_pb2.WatchOrderRequest, context: Context
    ) -> AsyncIterator[query_service_pb2.WatchOrderResponse]:
        # Added to the API after this service was built: say so explicitly instead of the generated default.
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "WatchOrder is not implemented yet")
        yield query_service_pb2.WatchOrderResponse()  # pragma: no cover - unreachable, makes this a generator

    async def _get_order(self, request: query_service_pb2.GetOrderRequest) -> query_service_pb2.GetOrderResponse:
        order_id = parse_order_id(request.order_id)
        doc = await self._read_model.get(order_id)
        if doc is None:
            raise NotFound(f"order {order_id} not found")
        return query_service_pb2.GetOrderResponse(order=views.order_from_document(doc))

    async def _list_orders(self, request: query_service_pb2.ListOrdersRequest) -> query_service_pb2.ListOrdersResponse:
        filters, page_size, after = parse_list_request(request)
        # One extra document tells whether another page exists without a second query.
        docs = await self._read_model.list_page(filters, after, page_size + 1)
        page = docs[:page_size]
        response = query_service_pb2.ListOrdersResponse(orders=[views.order_from_document(d) for d in page])
        if len(docs) > page_size:
            last = page[-1]
            cursor = paging.Cursor.after(last["created_at"], str(last["_id"]))
            response.next_page_token = paging.encode_page_token(cursor, filters)
        return response


def parse_order_id(raw: str) -> str:
    """The canonical (lower-case) form of a UUID order id; InvalidArgument on `order_id` otherwise."""
    if not raw:
        raise InvalidArgument([FieldViolation("order_id", "is required")])
    if not _UUID.fullmatch(raw):
        raise InvalidArgument([FieldViolation("order_id", "must be a UUID, e.g. 123e4567-e89b-12d3-a456-426614174000")])
    return str(uuid.UUID(raw))


def parse_list_request(
    request: query_service_pb2.ListOrdersRequest,
) -> tuple[paging.ListFilter, int, paging.Cursor | None]:
    """Filters, effective page size and cursor of a ListOrders request; all field errors at once."""
    violations: list[FieldViolation] = []
    status: str | None = None
    try:
        status = views.status_from_proto(request.status)
    except ValueError:
        violations.append(FieldViolation("status", f"unknown order status {request.status}"))
    page_size = paging.DEFAULT_PAGE_SIZE
    try:
        page_size = paging.effective_page_size(request.page_size)
    except InvalidArgument as exc:
        violations.extend(exc.violations)
    filters = paging.ListFilter(customer_id=request.customer_id, status=status)
    after: paging.Cursor | None = None
    if request.page_token and not violations:
        try:
            after = paging.decode_page_token(request.page_token, filters)
        except InvalidArgument as exc:
            violations.extend(exc.violations)
    if violations:
        raise InvalidArgument(violations)
    return filters, page_size, after


async def _answer(context: Context, method: str, handle: Callable[[], Awaitable[_Response]]) -> _Response:
    """Runs a handler and turns every failure into a deliberate status (never UNKNOWN, no stack trace)."""
    try:
        return await handle()
    except ServiceError as exc:
        await abort_with(context, exc)
    except Exception as exc:
        if not is_mongo_unavailable(exc):
            log.exception("%s failed unexpectedly", method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the query service's log")
        reason = describe_mongo_error(exc)
        log.warning("%s: read model (MongoDB) is unavailable: %s", method, reason)
        await abort_with(context, Unavailable(f"read model (MongoDB) is unavailable: {reason}"))
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises
