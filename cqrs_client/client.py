"""`OrdersClient`: the async client other services use to call the order service."""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from datetime import date, datetime
from types import TracebackType
from typing import Protocol, TypeVar

import grpc
from cqrs.orders.v1 import command_service_pb2 as cpb
from cqrs.orders.v1 import command_service_pb2_grpc as cgrpc
from cqrs.orders.v1 import consistency_pb2, order_pb2
from cqrs.orders.v1 import customer_service_pb2 as custpb
from cqrs.orders.v1 import customer_service_pb2_grpc as custgrpc
from cqrs.orders.v1 import query_service_pb2 as qpb
from cqrs.orders.v1 import query_service_pb2_grpc as qgrpc

from cqrs_client.channel import ClientTLS, open_channel
from cqrs_client.retry import RetryPolicy, call_with_retry

Req = TypeVar("Req")
Resp = TypeVar("Resp")

# The query service accepts at most 100 tokens per query; a session keeps the newest token per aggregate.
MAX_SESSION_TOKENS = 100
DEFAULT_WATCH_TIMEOUT = 3600.0

Tokens = str | Iterable[str] | None


class _HasToken(Protocol):
    @property
    def consistency_token(self) -> str: ...

    @property
    def version(self) -> int: ...


@dataclass
class _Connection:
    command_channel: grpc.aio.Channel
    query_channel: grpc.aio.Channel
    orders: cgrpc.OrderCommandServiceAsyncStub
    customers: custgrpc.CustomerCommandServiceAsyncStub
    order_queries: qgrpc.OrderQueryServiceAsyncStub
    customer_queries: custgrpc.CustomerQueryServiceAsyncStub


def _iso_date(value: date | str) -> str:
    # A datetime is a date too, but its day depends on a time zone: the caller must pick the day.
    if isinstance(value, datetime):
        raise TypeError("pass a date (or 'YYYY-MM-DD'), not a datetime: report days are UTC dates")
    return value.isoformat() if isinstance(value, date) else value


def _new_request_id() -> str:
    return str(uuid.uuid4())


class OrdersClient:
    """Async client for the command and query services.

    Use `async with OrdersClient.connect(command_addr, query_addr) as client:`. Every call has a deadline
    (`timeout`, default `default_timeout`); unary calls are retried on UNAVAILABLE (and a stopping server's
    CANCELLED) per `retry`, commands with the same request_id on every attempt. Errors are raised as
    `grpc.aio.AioRpcError` (see `cqrs_client.field_violations`).
    """

    def __init__(
        self,
        connection: _Connection,
        *,
        bearer_token: str | Callable[[], str] | None,
        default_timeout: float,
        retry: RetryPolicy,
        owns_connection: bool,
        session: bool = False,
    ) -> None:
        self._conn = connection
        self._bearer_token = bearer_token
        self.default_timeout = default_timeout
        self.retry = retry
        self._owns_connection = owns_connection
        # (kind, id) -> (version, token): the highest version seen per aggregate, since concurrent commands on one
        # aggregate may reply out of order and an older token must not replace a newer one.
        self._session_tokens: OrderedDict[tuple[str, str], tuple[int, str]] | None = OrderedDict() if session else None
        self.last_token: str | None = None
        """Consistency token of the last successful command sent through this client (or session)."""

    @classmethod
    def connect(
        cls,
        command_addr: str,
        query_addr: str,
        *,
        tls: ClientTLS | None = None,
        bearer_token: str | Callable[[], str] | None = None,
        default_timeout: float = 5.0,
        retry: RetryPolicy = RetryPolicy(),  # noqa: B008 - frozen, immutable default
    ) -> OrdersClient:
        """Opens channels to both services (lazily connected); close with `async with` or `close()`.

        `bearer_token` is sent as `authorization: Bearer ...` on every call; a callable is asked on every attempt,
        so it can refresh tokens.
        """
        if default_timeout <= 0:
            raise ValueError("default_timeout must be > 0")
        command_channel = open_channel(command_addr, tls)
        query_channel = command_channel if query_addr == command_addr else open_channel(query_addr, tls)
        connection = _Connection(
            command_channel=command_channel,
            query_channel=query_channel,
            orders=cgrpc.OrderCommandServiceStub(command_channel),
            customers=custgrpc.CustomerCommandServiceStub(command_channel),
            order_queries=qgrpc.OrderQueryServiceStub(query_channel),
            customer_queries=custgrpc.CustomerQueryServiceStub(query_channel),
        )
        return cls(
            connection, bearer_token=bearer_token, default_timeout=default_timeout, retry=retry, owns_connection=True
        )

    async def __aenter__(self) -> OrdersClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Closes the channels (a session shares its client's channels and closes nothing)."""
        if self._owns_connection:
            await self._conn.command_channel.close(None)
            if self._conn.query_channel is not self._conn.command_channel:
                await self._conn.query_channel.close(None)

    def session(self) -> OrdersClient:
        """A view on the same channels that remembers the tokens of its own writes (newest per order/customer)
        and adds them to each of its queries: everything read through it reflects everything written through it."""
        return OrdersClient(
            self._conn,
            bearer_token=self._bearer_token,
            default_timeout=self.default_timeout,
            retry=self.retry,
            owns_connection=False,
            session=True,
        )

    @property
    def session_tokens(self) -> list[str]:
        """Tokens a session adds to its queries (empty for a plain client)."""
        return [token for _, token in self._session_tokens.values()] if self._session_tokens is not None else []

    # ------------------------------------------------------------------ plumbing

    def _metadata(self) -> tuple[tuple[str, str], ...] | None:
        token = self._bearer_token() if callable(self._bearer_token) else self._bearer_token
        return (("authorization", f"Bearer {token}"),) if token else None

    async def _unary(
        self, method: grpc.aio.UnaryUnaryMultiCallable[Req, Resp], request: Req, timeout: float | None
    ) -> Resp:
        async def attempt(deadline: float) -> Resp:
            return await method(request, timeout=deadline, metadata=self._metadata())

        return await call_with_retry(attempt, self.retry, timeout or self.default_timeout)

    def _remember(self, kind: str, key: str, result: _HasToken) -> None:
        self.last_token = result.consistency_token
        if self._session_tokens is not None:
            known = self._session_tokens.pop((kind, key), None)
            newest = (
                max(known, (result.version, result.consistency_token))
                if known
                else (result.version, result.consistency_token)
            )
            self._session_tokens[(kind, key)] = newest
            while len(self._session_tokens) > MAX_SESSION_TOKENS:
                self._session_tokens.popitem(last=False)

    def _order_result(self, result: cpb.CommandResult) -> cpb.CommandResult:
        self._remember("order", result.order_id, result)
        return result

    def _customer_result(self, result: custpb.CustomerCommandResult) -> custpb.CustomerCommandResult:
        self._remember("customer", result.customer_id, result)
        return result

    def _consistency(
        self, consistency: Tokens, read_your_writes: bool, accept_stale: bool
    ) -> consistency_pb2.ConsistencyRequirement:
        tokens: list[str] = []
        if isinstance(consistency, str):
            tokens.append(consistency)
        elif consistency is not None:
            tokens.extend(consistency)
        if read_your_writes and self.last_token:
            tokens.append(self.last_token)
        tokens.extend(self.session_tokens)
        unique = list(dict.fromkeys(t for t in tokens if t))
        return consistency_pb2.ConsistencyRequirement(consistency_tokens=unique, accept_stale=accept_stale)

    # ------------------------------------------------------------------ order commands

    async def create_order(
        self,
        customer_id: str,
        currency: str,
        shipping_address: order_pb2.Address | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> cpb.CommandResult:
        """Creates a DRAFT order; the reply's `order_id` is the new order's id."""
        request = cpb.CreateOrderRequest(
            request_id=request_id or _new_request_id(),
            customer_id=customer_id,
            currency=currency,
            shipping_address=shipping_address,
        )
        reply = await self._unary(self._conn.orders.CreateOrder, request, timeout)
        return self._order_result(reply.result)

    async def add_item(
        self,
        order_id: str,
        sku: str,
        name: str,
        quantity: int,
        unit_price_minor: int,
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> cpb.CommandResult:
        """Adds a line (price in minor units) to a DRAFT order."""
        request = cpb.AddOrderItemRequest(
            request_id=request_id or _new_request_id(),
            expected_version=expected_version,
            order_id=order_id,
            sku=sku,
            name=name,
            quantity=quantity,
            unit_price_minor=unit_price_minor,
        )
        reply = await self._unary(self._conn.orders.AddOrderItem, request, timeout)
        return self._order_result(reply.result)

    async def remove_item(
        self,
        order_id: str,
        sku: str,
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> cpb.CommandResult:
        """Removes a line from a DRAFT order."""
        request = cpb.RemoveOrderItemRequest(
            request_id=request_id or _new_request_id(), expected_version=expected_version, order_id=order_id, sku=sku
        )
        reply = await self._unary(self._conn.orders.RemoveOrderItem, request, timeout)
        return self._order_result(reply.result)

    async def change_quantity(
        self,
        order_id: str,
        sku: str,
        quantity: int,
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> cpb.CommandResult:
        """Changes the quantity of a line of a DRAFT order."""
        request = cpb.ChangeItemQuantityRequest(
            request_id=request_id or _new_request_id(),
            expected_version=expected_version,
            order_id=order_id,
            sku=sku,
            quantity=quantity,
        )
        reply = await self._unary(self._conn.orders.ChangeItemQuantity, request, timeout)
        return self._order_result(reply.result)

    async def change_shipping_address(
        self,
        order_id: str,
        shipping_address: order_pb2.Address,
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> cpb.CommandResult:
        """Changes the shipping address of a DRAFT order."""
        request = cpb.ChangeShippingAddressRequest(
            request_id=request_id or _new_request_id(),
            expected_version=expected_version,
            order_id=order_id,
            shipping_address=shipping_address,
        )
        reply = await self._unary(self._conn.orders.ChangeShippingAddress, request, timeout)
        return self._order_result(reply.result)

    async def place_order(
        self,
        order_id: str,
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> cpb.CommandResult:
        """Places a DRAFT order that has at least one line."""
        request = cpb.PlaceOrderRequest(
            request_id=request_id or _new_request_id(), expected_version=expected_version, order_id=order_id
        )
        reply = await self._unary(self._conn.orders.PlaceOrder, request, timeout)
        return self._order_result(reply.result)

    async def cancel_order(
        self,
        order_id: str,
        reason: str = "",
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> cpb.CommandResult:
        """Cancels a DRAFT or PLACED order."""
        request = cpb.CancelOrderRequest(
            request_id=request_id or _new_request_id(),
            expected_version=expected_version,
            order_id=order_id,
            reason=reason,
        )
        reply = await self._unary(self._conn.orders.CancelOrder, request, timeout)
        return self._order_result(reply.result)

    async def delete_order(
        self,
        order_id: str,
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> cpb.CommandResult:
        """Deletes an order from the read model (its events stay in the event store)."""
        request = cpb.DeleteOrderRequest(
            request_id=request_id or _new_request_id(), expected_version=expected_version, order_id=order_id
        )
        reply = await self._unary(self._conn.orders.DeleteOrder, request, timeout)
        return self._order_result(reply.result)

    # ------------------------------------------------------------------ customer commands

    async def register_customer(
        self, name: str, email: str, *, request_id: str | None = None, timeout: float | None = None
    ) -> custpb.CustomerCommandResult:
        """Registers a customer; ALREADY_EXISTS when the (normalised) email is taken."""
        request = custpb.RegisterCustomerRequest(request_id=request_id or _new_request_id(), name=name, email=email)
        reply = await self._unary(self._conn.customers.RegisterCustomer, request, timeout)
        return self._customer_result(reply.result)

    async def rename_customer(
        self,
        customer_id: str,
        name: str,
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> custpb.CustomerCommandResult:
        """Renames a customer."""
        request = custpb.RenameCustomerRequest(
            request_id=request_id or _new_request_id(),
            expected_version=expected_version,
            customer_id=customer_id,
            name=name,
        )
        reply = await self._unary(self._conn.customers.RenameCustomer, request, timeout)
        return self._customer_result(reply.result)

    async def change_customer_email(
        self,
        customer_id: str,
        email: str,
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> custpb.CustomerCommandResult:
        """Changes a customer's email (the new one must be free)."""
        request = custpb.ChangeCustomerEmailRequest(
            request_id=request_id or _new_request_id(),
            expected_version=expected_version,
            customer_id=customer_id,
            email=email,
        )
        reply = await self._unary(self._conn.customers.ChangeCustomerEmail, request, timeout)
        return self._customer_result(reply.result)

    async def deactivate_customer(
        self,
        customer_id: str,
        *,
        expected_version: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> custpb.CustomerCommandResult:
        """Deactivates a customer: no new orders."""
        request = custpb.DeactivateCustomerRequest(
            request_id=request_id or _new_request_id(), expected_version=expected_version, customer_id=customer_id
        )
        reply = await self._unary(self._conn.customers.DeactivateCustomer, request, timeout)
        return self._customer_result(reply.result)

    # ------------------------------------------------------------------ queries

    async def get_order(
        self,
        order_id: str,
        *,
        consistency: Tokens = None,
        read_your_writes: bool = False,
        accept_stale: bool = False,
        as_of_version: int | None = None,
        as_of_time: datetime | None = None,
        timeout: float | None = None,
    ) -> qpb.GetOrderResponse:
        """One order (`.order`) and what the read model reflected (`.consistency`); NOT_FOUND when unknown.

        `consistency`: token(s) the answer must reflect; `read_your_writes=True` adds `last_token`; a session adds
        its own writes' tokens. The server waits for them within the deadline, else UNAVAILABLE (or a stale answer
        with `accept_stale`). `as_of_version` or `as_of_time` (an aware datetime; at most one of them): the order
        as it was then, also for an order deleted since.
        """
        request = qpb.GetOrderRequest(
            order_id=order_id,
            consistency=self._consistency(consistency, read_your_writes, accept_stale),
            as_of_version=as_of_version,
        )
        if as_of_time is not None:
            if as_of_time.tzinfo is None:
                raise ValueError("as_of_time must be timezone-aware")
            request.as_of_time.FromDatetime(as_of_time)
        return await self._unary(self._conn.order_queries.GetOrder, request, timeout)

    async def get_order_history(
        self,
        order_id: str,
        *,
        page_size: int = 0,
        page_token: str = "",
        consistency: Tokens = None,
        read_your_writes: bool = False,
        accept_stale: bool = False,
        timeout: float | None = None,
    ) -> qpb.GetOrderHistoryResponse:
        """One page of an order's change log, oldest first (`.events`, each with who and why); deleted orders keep
        theirs. `next_page_token` is empty on the last page."""
        request = qpb.GetOrderHistoryRequest(
            order_id=order_id,
            page_size=page_size,
            page_token=page_token,
            consistency=self._consistency(consistency, read_your_writes, accept_stale),
        )
        return await self._unary(self._conn.order_queries.GetOrderHistory, request, timeout)

    async def get_sales_report(
        self,
        from_date: date | str,
        to_date: date | str,
        *,
        currency: str = "",
        top_n: int = 0,
        consistency: Tokens = None,
        read_your_writes: bool = False,
        accept_stale: bool = False,
        timeout: float | None = None,
    ) -> qpb.GetSalesReportResponse:
        """Sales per UTC day and currency from `from_date` to `to_date` (both included, at most 366 days; dates
        or "YYYY-MM-DD"): `.days` (one row per day and currency with sales) and `.currencies` (each currency's
        totals over the range with its `top_n` SKUs by net quantity and by net revenue; default 10, at most 100).
        `currency` (e.g. "EUR") limits it to one currency."""
        request = qpb.GetSalesReportRequest(
            from_date=_iso_date(from_date),
            to_date=_iso_date(to_date),
            currency=currency,
            top_n=top_n,
            consistency=self._consistency(consistency, read_your_writes, accept_stale),
        )
        return await self._unary(self._conn.order_queries.GetSalesReport, request, timeout)

    async def list_orders(
        self,
        *,
        customer_id: str = "",
        status: order_pb2.OrderStatus.ValueType = order_pb2.ORDER_STATUS_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
        consistency: Tokens = None,
        read_your_writes: bool = False,
        accept_stale: bool = False,
        timeout: float | None = None,
    ) -> qpb.ListOrdersResponse:
        """One page of orders, newest first; `next_page_token` is empty on the last page."""
        request = qpb.ListOrdersRequest(
            customer_id=customer_id,
            status=status,
            page_size=page_size,
            page_token=page_token,
            consistency=self._consistency(consistency, read_your_writes, accept_stale),
        )
        return await self._unary(self._conn.order_queries.ListOrders, request, timeout)

    async def iter_orders(
        self,
        *,
        customer_id: str = "",
        status: order_pb2.OrderStatus.ValueType = order_pb2.ORDER_STATUS_UNSPECIFIED,
        page_size: int = 0,
        consistency: Tokens = None,
        read_your_writes: bool = False,
        timeout: float | None = None,
    ) -> AsyncIterator[order_pb2.Order]:
        """Every matching order over all pages (each page is its own call with its own deadline and retries)."""
        tokens = list(self._consistency(consistency, read_your_writes, False).consistency_tokens)
        page_token = ""
        while True:
            page = await self.list_orders(
                customer_id=customer_id,
                status=status,
                page_size=page_size,
                page_token=page_token,
                consistency=tokens,
                timeout=timeout,
            )
            for order in page.orders:
                yield order
            if not page.next_page_token:
                return
            page_token = page.next_page_token

    async def get_customer(
        self,
        customer_id: str,
        *,
        consistency: Tokens = None,
        read_your_writes: bool = False,
        accept_stale: bool = False,
        timeout: float | None = None,
    ) -> custpb.GetCustomerResponse:
        """One customer with live order statistics (`.customer`); NOT_FOUND when unknown."""
        request = custpb.GetCustomerRequest(
            customer_id=customer_id, consistency=self._consistency(consistency, read_your_writes, accept_stale)
        )
        return await self._unary(self._conn.customer_queries.GetCustomer, request, timeout)

    async def list_customers(
        self,
        *,
        name_prefix: str = "",
        email: str = "",
        page_size: int = 0,
        page_token: str = "",
        consistency: Tokens = None,
        read_your_writes: bool = False,
        accept_stale: bool = False,
        timeout: float | None = None,
    ) -> custpb.ListCustomersResponse:
        """One page of customers by name ascending."""
        request = custpb.ListCustomersRequest(
            name_prefix=name_prefix,
            email=email,
            page_size=page_size,
            page_token=page_token,
            consistency=self._consistency(consistency, read_your_writes, accept_stale),
        )
        return await self._unary(self._conn.customer_queries.ListCustomers, request, timeout)

    async def watch_order(
        self,
        order_id: str,
        *,
        consistency_token: str | None = None,
        read_your_writes: bool = False,
        timeout: float = DEFAULT_WATCH_TIMEOUT,
    ) -> AsyncIterator[qpb.WatchOrderResponse]:
        """The order each time it changes, until it is deleted (`deleted=True`, last message) or `timeout`.

        A stream is not retried: on UNAVAILABLE, watch again (the first message is the current state).
        """
        token = consistency_token or (self.last_token if read_your_writes else None) or ""
        call = self._conn.order_queries.WatchOrder(
            qpb.WatchOrderRequest(order_id=order_id, consistency_token=token),
            timeout=timeout,
            metadata=self._metadata(),
        )
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()


__all__ = ["OrdersClient"]
