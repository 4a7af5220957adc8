"""Typed async client for the cqrs-orders gRPC API (package `cqrs.orders.v1`).

```python
async with OrdersClient.connect("127.0.0.1:50051", "127.0.0.1:50052") as client:
    customer = await client.register_customer("Ada", "ada@example.com")
    order = await client.create_order(customer.customer_id, "EUR")
    view = await client.get_order(order.order_id, read_your_writes=True)
```

Errors are `grpc.aio.AioRpcError`; `field_violations(error)` gives the `BadRequest` details of INVALID_ARGUMENT.
The generated messages are re-exported here so callers need no other import.
"""

from cqrs.orders.v1.command_service_pb2 import CommandResult
from cqrs.orders.v1.consistency_pb2 import ReadConsistency
from cqrs.orders.v1.customer_pb2 import Customer, CustomerStatus
from cqrs.orders.v1.customer_service_pb2 import CustomerCommandResult
from cqrs.orders.v1.order_pb2 import Address, Order, OrderLine, OrderStatus
from cqrs.orders.v1.query_service_pb2 import (
    GetSalesReportResponse,
    OrderHistoryEvent,
    SalesReportCurrency,
    SalesReportDay,
    SkuSales,
)

from cqrs_client.channel import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, ClientTLS
from cqrs_client.client import OrdersClient
from cqrs_client.errors import FieldViolation, field_violations, rich_status
from cqrs_client.retry import NO_RETRY, RETRYABLE, RetryPolicy

__all__ = [
    "CHANNEL_OPTIONS",
    "MAX_MESSAGE_BYTES",
    "NO_RETRY",
    "RETRYABLE",
    "Address",
    "ClientTLS",
    "CommandResult",
    "Customer",
    "CustomerCommandResult",
    "CustomerStatus",
    "FieldViolation",
    "GetSalesReportResponse",
    "Order",
    "OrderHistoryEvent",
    "OrderLine",
    "OrderStatus",
    "OrdersClient",
    "ReadConsistency",
    "RetryPolicy",
    "SalesReportCurrency",
    "SalesReportDay",
    "SkuSales",
    "field_violations",
    "rich_status",
]
