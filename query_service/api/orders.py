"""OrderQueryService: one table entry per unary RPC (request -> parsed, read) over `QueryRunner`, and WatchOrder.

GetSalesReport reads the sales report (`query_service.sales_report`; request checks and view in `api.sales`).

GetOrder with `as_of_version`/`as_of_time` and GetOrderHistory read the order's change log (the `history` the
orders projection keeps in the order's document); the earlier state is folded from it by the projection's own
handlers (`core.projections.order_history`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from dataclasses import dataclass

from cqrs.orders.v1 import consistency_pb2
from cqrs.orders.v1 import query_service_pb2 as pb
from cqrs.orders.v1 import query_service_pb2_grpc as pb_grpc

from core.errors import FieldViolation, InvalidArgument, NotFound
from core.projections.order_history import BeyondHistory, history_of, order_as_of
from core.rpc_table import Context
from query_service import paging, views
from query_service.api.listing import listing, page_of
from query_service.api.runner import Query, QueryRunner, fail
from query_service.api.sales import parse_sales_report_request, read_sales_report
from query_service.consistency import ReadYourWrites, Requirement, parse_tokens
from query_service.read_model import Document, OrderReadModel
from query_service.request_checks import collect, parse_uuid, text_filter_violation
from query_service.sales_report import SalesQuery, SalesReportReader
from query_service.watch import OrderWatchHub, Removed

# Longer than any customer id the command side accepts: a longer filter cannot match anything.
MAX_CUSTOMER_ID_LENGTH = 64

OrderListing = tuple[paging.ListFilter, int, paging.Cursor | None]
# order id, page size, the version the page continues after (None: from the start)
HistoryPage = tuple[str, int, int | None]

# The range google.protobuf.Timestamp allows (0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z).
_MIN_SECONDS = -62_135_596_800
_MAX_SECONDS = 253_402_300_799


@dataclass(frozen=True, slots=True)
class OrderRead:
    """A parsed GetOrder: the order, and at most one of the as-of points."""

    order_id: str
    as_of_version: int | None = None
    as_of_time: dt.datetime | None = None


def parse_order_id(raw: str) -> str:
    """The canonical (lower-case) form of a UUID order id; InvalidArgument on `order_id` otherwise."""
    return parse_uuid(raw, "order_id")


def parse_get_request(request: pb.GetOrderRequest) -> OrderRead:
    """The order id and the optional as-of point of a GetOrder request; all field errors at once."""
    violations: list[FieldViolation] = []
    order_id = collect(violations, lambda: parse_order_id(request.order_id))
    as_of_version: int | None = None
    as_of_time: dt.datetime | None = None
    has_version, has_time = request.HasField("as_of_version"), request.HasField("as_of_time")
    if has_version and has_time:
        both = "set at most one of as_of_version and as_of_time"
        violations += [FieldViolation("as_of_version", both), FieldViolation("as_of_time", both)]
    elif has_version:
        as_of_version = request.as_of_version
        if as_of_version < 1:
            violations.append(FieldViolation("as_of_version", "must be at least 1 (the version that created it)"))
    elif has_time:
        stamp = request.as_of_time
        if not _MIN_SECONDS <= stamp.seconds <= _MAX_SECONDS or not 0 <= stamp.nanos <= 999_999_999:
            violations.append(FieldViolation("as_of_time", "must be a valid timestamp (years 1 to 9999)"))
        else:
            as_of_time = stamp.ToDatetime(tzinfo=dt.UTC)
    if violations:
        raise InvalidArgument(violations)
    assert order_id is not None
    return OrderRead(order_id, as_of_version, as_of_time)


def parse_history_request(request: pb.GetOrderHistoryRequest) -> HistoryPage:
    """Order id, effective page size and the version to continue after; all field errors at once."""
    violations: list[FieldViolation] = []
    order_id = collect(violations, lambda: parse_order_id(request.order_id))
    page_size = collect(violations, lambda: paging.effective_page_size(request.page_size))
    return listing(violations, page_size, order_id or "", request.page_token, paging.decode_history_page_token)


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
        sales_report: SalesReportReader | None = None,
    ) -> None:
        self._read_model = read_model
        # By default the report lives beside the orders (the server passes its own, to switch generations).
        self._sales = sales_report or SalesReportReader(read_model.collection.database)
        self._ryw = read_your_writes
        self._hub = watch_hub
        self._page_budget = paging.page_budget(max_message_bytes)
        self.runner = QueryRunner(self, read_your_writes)

    async def _get_order(self, query: OrderRead, consistency: consistency_pb2.ReadConsistency) -> pb.GetOrderResponse:
        if query.as_of_version is None and query.as_of_time is None:
            doc = await self._read_model.get(query.order_id)
            if doc is None:
                raise NotFound(f"order {query.order_id} not found")
        else:
            doc = await self._order_as_of(query)
        return pb.GetOrderResponse(order=views.order_from_document(doc), consistency=consistency)

    async def _order_as_of(self, query: OrderRead) -> Document:
        """The order as it was at the query's version or time, folded from its change log (deleted ones too)."""
        current = await self._read_model.get_with_history(query.order_id)
        if current is None:
            raise NotFound(f"order {query.order_id} not found")
        try:
            doc = order_as_of(current, version=query.as_of_version, at=query.as_of_time)
        except BeyondHistory as exc:
            raise InvalidArgument([FieldViolation("as_of_version", str(exc))]) from None
        if doc is None:
            raise NotFound(f"order {query.order_id} did not exist yet at {query.as_of_time}")
        if doc.get("deleted") is True:
            raise NotFound(f"order {query.order_id} was deleted by version {doc.get('version')}")
        return doc

    async def _get_order_history(
        self, query: HistoryPage, consistency: consistency_pb2.ReadConsistency
    ) -> pb.GetOrderHistoryResponse:
        order_id, page_size, after = query
        doc = await self._read_model.get_with_history(order_id)
        if doc is None:
            raise NotFound(f"order {order_id} not found")
        entries = [entry for entry in history_of(doc) if int(entry["version"]) > (after or 0)]
        events, last = page_of(entries[: page_size + 1], page_size, self._page_budget, views.history_event_from_entry)
        response = pb.GetOrderHistoryResponse(events=events, consistency=consistency)
        if last is not None:
            response.next_page_token = paging.encode_history_page_token(order_id, int(last["version"]))
        return response

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

    async def _get_sales_report(
        self, query: SalesQuery, consistency: consistency_pb2.ReadConsistency
    ) -> pb.GetSalesReportResponse:
        return await read_sales_report(self._sales, query, consistency)

    GetOrder = Query(pb.GetOrderRequest, parse_get_request, _get_order)
    GetOrderHistory = Query(pb.GetOrderHistoryRequest, parse_history_request, _get_order_history)
    ListOrders = Query(pb.ListOrdersRequest, parse_list_request, _list_orders)
    GetSalesReport = Query(pb.GetSalesReportRequest, parse_sales_report_request, _get_sales_report)

    async def WatchOrder(self, request: pb.WatchOrderRequest, context: Context) -> AsyncIterator[pb.WatchOrderResponse]:
        """The current order, then the order again each time its projection changes; ends after a deletion."""
        try:
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
        switches = self._ryw.switches
        await self._ryw.ensure(requirements, accept_stale=False, time_remaining=context.time_remaining())
        # Subscribe first, read second: every change after the read is then on its way to us (see watch.py).
        subscription = await self._hub.subscribe(order_id)
        try:
            doc = await self._read_model.get_including_deleted(order_id)
            while self._ryw.switches != switches:  # read across a generation switch: wait and read there again
                switches = self._ryw.switches
                await self._ryw.ensure(requirements, accept_stale=False, time_remaining=context.time_remaining())
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
