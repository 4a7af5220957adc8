"""The OrderQueryService gRPC servicer: request validation, read-your-writes, read-model queries, errors -> status."""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from cqrs.orders.v1 import consistency_pb2, query_service_pb2, query_service_pb2_grpc

from core.errors import FieldViolation, InvalidArgument, NotFound, ServiceError, Unavailable
from core.grpc_errors import abort_with
from query_service import paging, views
from query_service.consistency import ReadYourWrites, Requirement, TooManyWaiters, parse_requirement, parse_tokens
from query_service.read_model import Document, OrderReadModel, describe_mongo_error, is_mongo_unavailable
from query_service.request_checks import text_filter_violation
from query_service.watch import OrderWatchHub, Removed

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]
READ_MODEL_UNAVAILABLE = "read model (MongoDB) is unavailable; retry later"
_Response = TypeVar("_Response")

# Canonical hyphenated form only: the read model is keyed by `str(uuid.UUID(...))`, and accepting the other
# spellings `uuid.UUID` allows (braces, urn:uuid:, no hyphens) would only hide client bugs.
# Longer than any customer id the command side accepts: a longer filter cannot match anything.
MAX_CUSTOMER_ID_LENGTH = 64
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


class OrderQueryServicer(query_service_pb2_grpc.OrderQueryServiceServicer):
    """Answers GetOrder, ListOrders and WatchOrder from the MongoDB read model only."""

    def __init__(
        self,
        read_model: OrderReadModel,
        read_your_writes: ReadYourWrites,
        watch_hub: OrderWatchHub,
        *,
        max_message_bytes: int = paging.DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self._read_model = read_model
        self._ryw = read_your_writes
        self._hub = watch_hub
        self._page_budget = paging.page_budget(max_message_bytes)

    async def GetOrder(
        self, request: query_service_pb2.GetOrderRequest, context: Context
    ) -> query_service_pb2.GetOrderResponse:
        return await answer(context, "GetOrder", lambda: self._get_order(request, context))

    async def ListOrders(
        self, request: query_service_pb2.ListOrdersRequest, context: Context
    ) -> query_service_pb2.ListOrdersResponse:
        return await answer(context, "ListOrders", lambda: self._list_orders(request, context))

    async def WatchOrder(
        self, request: query_service_pb2.WatchOrderRequest, context: Context
    ) -> AsyncIterator[query_service_pb2.WatchOrderResponse]:
        """The current order, then the order again each time its projection changes; ends after a deletion."""
        try:
            async for response in self._watch_order(request, context):
                yield response
        except Exception as exc:  # CancelledError (the client left) is a BaseException and passes through
            await fail(context, "WatchOrder", exc)

    async def _get_order(
        self, request: query_service_pb2.GetOrderRequest, context: Context
    ) -> query_service_pb2.GetOrderResponse:
        order_id, consistency = await validated_and_consistent(
            self._ryw, request.consistency, context, lambda: parse_order_id(request.order_id)
        )
        doc = await self._read_model.get(order_id)
        if doc is None:
            raise NotFound(f"order {order_id} not found")
        return query_service_pb2.GetOrderResponse(order=views.order_from_document(doc), consistency=consistency)

    async def _list_orders(
        self, request: query_service_pb2.ListOrdersRequest, context: Context
    ) -> query_service_pb2.ListOrdersResponse:
        (filters, page_size, after), consistency = await validated_and_consistent(
            self._ryw, request.consistency, context, lambda: parse_list_request(request)
        )
        # One extra document tells whether another page exists without a second query.
        docs = await self._read_model.list_page(filters, after, page_size + 1)
        orders = [views.order_from_document(d) for d in docs[:page_size]]
        # Cut by encoded size too: 500 orders of 100 long lines would not fit a gRPC message.
        count = paging.fit_page((order.ByteSize() for order in orders), page_size, self._page_budget)
        response = query_service_pb2.ListOrdersResponse(orders=orders[:count], consistency=consistency)
        if len(docs) > count:
            last = docs[count - 1]
            cursor = paging.Cursor.after(last["created_at"], str(last["_id"]))
            response.next_page_token = paging.encode_page_token(cursor, filters)
        return response

    async def _watch_order(
        self, request: query_service_pb2.WatchOrderRequest, context: Context
    ) -> AsyncIterator[query_service_pb2.WatchOrderResponse]:
        requirements: list[Requirement] = []
        violations: list[FieldViolation] = []
        if request.consistency_token:
            requirements, bad = parse_tokens([request.consistency_token], "consistency_token")
            violations = [FieldViolation("consistency_token", v.description) for v in bad]
        order_id = collect(violations, lambda: parse_order_id(request.order_id))
        if violations:
            raise InvalidArgument(violations)
        assert order_id is not None
        # A watch has no "stale" answer: it starts from the token's state or fails (UNAVAILABLE, with the lag).
        await self._ryw.ensure(requirements, accept_stale=False, time_remaining=context.time_remaining())
        # Subscribe first, read second: every change after the read is then on its way to us (see watch.py).
        subscription = await self._hub.subscribe(order_id)
        try:
            doc = await self._read_model.get_including_deleted(order_id)
            if doc is None or doc.get("deleted") is True:
                raise NotFound(f"order {order_id} not found")
            last = views.order_from_document(doc)
            yield query_service_pb2.WatchOrderResponse(order=last)
            while True:
                item = await subscription.next()
                if isinstance(item, Removed):  # the document vanished (the projector writes tombstones instead)
                    yield query_service_pb2.WatchOrderResponse(order=last, deleted=True)
                    return
                if _version(item) <= last.version:
                    continue  # a duplicate, or a lookup older than what this stream already sent
                last = views.order_from_document(item)
                deleted = item.get("deleted") is True
                yield query_service_pb2.WatchOrderResponse(order=last, deleted=deleted)
                if deleted:
                    return
        finally:
            self._hub.unsubscribe(subscription)


def parse_order_id(raw: str) -> str:
    """The canonical (lower-case) form of a UUID order id; InvalidArgument on `order_id` otherwise."""
    return parse_uuid(raw, "order_id")


def parse_uuid(raw: str, field: str) -> str:
    """The canonical (lower-case) form of a UUID; InvalidArgument on `field` otherwise."""
    if not raw:
        raise InvalidArgument([FieldViolation(field, "is required")])
    if not _UUID.fullmatch(raw):
        raise InvalidArgument([FieldViolation(field, "must be a UUID, e.g. 123e4567-e89b-12d3-a456-426614174000")])
    return str(uuid.UUID(raw))


_Parsed = TypeVar("_Parsed")


def collect(violations: list[FieldViolation], parse: Callable[[], _Parsed]) -> _Parsed | None:
    """Runs a parser; its field violations are added to `violations` (None returned) so all are reported at once."""
    try:
        return parse()
    except InvalidArgument as exc:
        violations.extend(exc.violations)
        return None


async def validated_and_consistent(
    ryw: ReadYourWrites,
    requirement: consistency_pb2.ConsistencyRequirement,
    context: Context,
    parse: Callable[[], _Parsed],
) -> tuple[_Parsed, consistency_pb2.ReadConsistency]:
    """The shared start of every read: `parse` the request and its consistency tokens, reporting all field
    violations at once (InvalidArgument), then wait until the read model reflects the tokens."""
    requirements, violations = parse_requirement(requirement)
    parsed = collect(violations, parse)
    if violations:
        raise InvalidArgument(violations)
    assert parsed is not None
    consistency = await ryw.ensure(
        requirements, accept_stale=requirement.accept_stale, time_remaining=context.time_remaining()
    )
    return parsed, consistency


def _version(doc: Document) -> int:
    value = doc.get("version")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


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
    page_size = collect(violations, lambda: paging.effective_page_size(request.page_size))
    bad_customer = text_filter_violation("customer_id", request.customer_id, max_length=MAX_CUSTOMER_ID_LENGTH)
    if bad_customer is not None:
        violations.append(bad_customer)
    filters = paging.ListFilter(customer_id=request.customer_id, status=status)
    after: paging.Cursor | None = None
    if request.page_token and not violations:
        after = collect(violations, lambda: paging.decode_page_token(request.page_token, filters))
    if violations:
        raise InvalidArgument(violations)
    assert page_size is not None
    return filters, page_size, after


async def answer(context: Context, method: str, handle: Callable[[], Awaitable[_Response]]) -> _Response:
    """Runs a handler and turns every failure into a deliberate status (never UNKNOWN, no stack trace)."""
    try:
        return await handle()
    except Exception as exc:
        await fail(context, method, exc)
    raise AssertionError("context.abort returned")  # pragma: no cover - abort always raises


async def fail(context: Context, method: str, exc: Exception) -> None:
    """Ends the RPC with the status that `exc` deserves; never returns."""
    if isinstance(exc, ServiceError):
        if isinstance(exc, Unavailable):
            log.info("%s: %s", method, exc.message)  # e.g. the read model is behind a token
        await abort_with(context, exc)
    if isinstance(exc, TooManyWaiters):
        log.warning("%s: %s", method, exc)
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    if not is_mongo_unavailable(exc):
        log.error("%s failed unexpectedly", method, exc_info=exc)
        await context.abort(grpc.StatusCode.INTERNAL, "internal error; see the query service's log")
    # The driver's text (hosts, ports, topology) goes to our log only; the caller learns what is down.
    log.warning("%s: read model (MongoDB) is unavailable: %s", method, describe_mongo_error(exc))
    await abort_with(context, Unavailable(READ_MODEL_UNAVAILABLE))
