"""OrderQueryService: one table entry per unary RPC (request -> parsed, read) over `QueryRunner`, and WatchOrder."""

from __future__ import annotations

from collections.abc import AsyncIterator

from cqrs.orders.v1 import consistency_pb2
from cqrs.orders.v1 import query_service_pb2 as pb
from cqrs.orders.v1 import query_service_pb2_grpc as pb_grpc

from core.errors import FieldViolation, InvalidArgument, NotFound
from core.rpc_table import Context
from query_service import paging, views
from query_service.api.listing import listing, page_of
from query_service.api.runner import Query, QueryRunner, fail
from query_service.consistency import ReadYourWrites, Requirement, parse_tokens
from query_service.read_model import Document, OrderReadModel, read_model_outage
from query_service.request_checks import collect, parse_uuid, text_filter_violation
from query_service.watch import OrderWatchHub, Removed

# Longer than any customer id the command side accepts: a longer filter cannot match anything.
MAX_CUSTOMER_ID_LENGTH = 64

OrderListing = tuple[paging.ListFilter, int, paging.Cursor | None]


def parse_order_id(raw: str) -> str:
    """The canonical (lower-case) form of a UUID order id; InvalidArgument on `order_id` otherwise."""
    return parse_uuid(raw, "order_id")


def parse_list_request(request: pb.ListOrdersRequest) -> OrderListing:
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
    return listing(violations, page_size, filters, request.page_token, paging.decode_page_token)


class OrderQueryServicer(pb_grpc.OrderQueryServiceServicer):
    """Answers the order queries from the MongoDB read model only: a table of unary reads, and WatchOrder."""

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
        self.runner = QueryRunner(self, read_your_writes)

    async def _get_order(self, order_id: str, consistency: consistency_pb2.ReadConsistency) -> pb.GetOrderResponse:
        doc = await self._read_model.get(order_id)
        if doc is None:
            raise NotFound(f"order {order_id} not found")
        return pb.GetOrderResponse(order=views.order_from_document(doc), consistency=consistency)

    async def _list_orders(
        self, query: OrderListing, consistency: consistency_pb2.ReadConsistency
    ) -> pb.ListOrdersResponse:
        filters, page_size, after = query
        docs = await self._read_model.list_page(filters, after, page_size + 1)
        orders, last = page_of(docs, page_size, self._page_budget, views.order_from_document)
        response = pb.ListOrdersResponse(orders=orders, consistency=consistency)
        if last is not None:
            cursor = paging.Cursor.after(last["created_at"], str(last["_id"]))
            response.next_page_token = paging.encode_page_token(cursor, filters)
        return response

    GetOrder = Query(pb.GetOrderRequest, lambda r: parse_order_id(r.order_id), _get_order)
    ListOrders = Query(pb.ListOrdersRequest, parse_list_request, _list_orders)

    async def WatchOrder(self, request: pb.WatchOrderRequest, context: Context) -> AsyncIterator[pb.WatchOrderResponse]:
        """The current order, then the order again each time its projection changes; ends after a deletion."""
        try:
            # The watch feed follows MongoDB itself (query_service.watch): its driver errors are outages too.
            with read_model_outage():
                async for response in self._watch_order(request, context):
                    yield response
        except Exception as exc:  # CancelledError (the client left) is a BaseException and passes through
            await fail(context, "WatchOrder", exc)

    async def _watch_order(
        self, request: pb.WatchOrderRequest, context: Context
    ) -> AsyncIterator[pb.WatchOrderResponse]:
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
            yield pb.WatchOrderResponse(order=last)
            while True:
                item = await subscription.next()
                if isinstance(item, Removed):  # the document vanished (the projector writes tombstones instead)
                    yield pb.WatchOrderResponse(order=last, deleted=True)
                    return
                if _version(item) <= last.version:
                    continue  # a duplicate, or a lookup older than what this stream already sent
                last = views.order_from_document(item)
                deleted = item.get("deleted") is True
                yield pb.WatchOrderResponse(order=last, deleted=deleted)
                if deleted:
                    return
        finally:
            self._hub.unsubscribe(subscription)


def _version(doc: Document) -> int:
    value = doc.get("version")
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
