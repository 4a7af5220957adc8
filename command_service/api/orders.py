"""OrderCommandService: one table entry per RPC (request -> command, response), all run by `CommandRunner`."""

from __future__ import annotations

import uuid
from typing import Any

from cqrs.orders.v1 import command_service_pb2 as pb
from cqrs.orders.v1 import command_service_pb2_grpc as pb_grpc
from cqrs.orders.v1 import order_pb2

from command_service.api.runner import Command, CommandRunner
from command_service.domain import commands as cmd
from command_service.domain.validation import order_violations
from command_service.handlers import CommandHandler
from core.values import Address


def _address(message: order_pb2.Address) -> Address:
    return Address(
        recipient=message.recipient,
        line1=message.line1,
        line2=message.line2,
        city=message.city,
        postal_code=message.postal_code,
        country=message.country,
    )


def _create_order(request: pb.CreateOrderRequest) -> cmd.CreateOrder:
    return cmd.CreateOrder(
        order_id=str(uuid.uuid4()),  # the server picks the id
        customer_id=request.customer_id,
        currency=request.currency,
        shipping_address=_address(request.shipping_address),
    )


def _add_order_item(request: pb.AddOrderItemRequest) -> cmd.AddOrderItem:
    return cmd.AddOrderItem(
        order_id=request.order_id,
        sku=request.sku,
        name=request.name,
        quantity=request.quantity,
        unit_price_minor=request.unit_price_minor,
    )


class OrderCommandServicer(pb_grpc.OrderCommandServiceServicer):
    """The order commands, as a table: RPC = Command(request type, request -> command, response type)."""

    def __init__(self, handler: CommandHandler[Any, cmd.OrderCommand]) -> None:
        self.runner = CommandRunner(handler, order_violations, pb.CommandResult, id_field="order_id")

    CreateOrder = Command(pb.CreateOrderRequest, _create_order, pb.CreateOrderResponse, required=("shipping_address",))
    AddOrderItem = Command(pb.AddOrderItemRequest, _add_order_item, pb.AddOrderItemResponse)
    RemoveOrderItem = Command(
        pb.RemoveOrderItemRequest,
        lambda r: cmd.RemoveOrderItem(order_id=r.order_id, sku=r.sku),
        pb.RemoveOrderItemResponse,
    )
    ChangeItemQuantity = Command(
        pb.ChangeItemQuantityRequest,
        lambda r: cmd.ChangeItemQuantity(order_id=r.order_id, sku=r.sku, quantity=r.quantity),
        pb.ChangeItemQuantityResponse,
    )
    ChangeShippingAddress = Command(
        pb.ChangeShippingAddressRequest,
        lambda r: cmd.ChangeShippingAddress(order_id=r.order_id, shipping_address=_address(r.shipping_address)),
        pb.ChangeShippingAddressResponse,
        required=("shipping_address",),
    )
    PlaceOrder = Command(pb.PlaceOrderRequest, lambda r: cmd.PlaceOrder(order_id=r.order_id), pb.PlaceOrderResponse)
    CancelOrder = Command(
        pb.CancelOrderRequest,
        lambda r: cmd.CancelOrder(order_id=r.order_id, reason=r.reason),
        pb.CancelOrderResponse,
    )
    DeleteOrder = Command(pb.DeleteOrderRequest, lambda r: cmd.DeleteOrder(order_id=r.order_id), pb.DeleteOrderResponse)
