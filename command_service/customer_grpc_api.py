"""gRPC adapter of the customer commands (served by the command service next to the order commands)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from cqrs.orders.v1 import customer_service_pb2 as pb
from cqrs.orders.v1 import customer_service_pb2_grpc as pb_grpc

from command_service.domain.customer_commands import (
    ChangeCustomerEmail,
    CustomerCommand,
    DeactivateCustomer,
    RegisterCustomer,
    RenameCustomer,
)
from command_service.domain.customer_validation import validate_customer
from command_service.event_store import CommandReply
from command_service.grpc_api import Context, R, consistency_token, run_command
from command_service.handlers import CommandHandler
from core.errors import FieldViolation


def _result(reply: CommandReply) -> pb.CustomerCommandResult:
    return pb.CustomerCommandResult(
        customer_id=reply.stream_id,
        version=reply.version,
        position=reply.position,
        consistency_token=consistency_token(reply),
    )


class CustomerCommandServicer(pb_grpc.CustomerCommandServiceServicer):
    def __init__(self, handler: CommandHandler[Any, CustomerCommand]) -> None:
        self._handler = handler

    async def _run(
        self,
        method: str,
        request: Any,
        context: Context,
        build: Callable[[list[FieldViolation]], CustomerCommand],
        reply: Callable[[pb.CustomerCommandResult], R],
    ) -> R:
        return await run_command(
            method, request, context, self._handler, build, validate_customer, lambda r: reply(_result(r))
        )

    async def RegisterCustomer(
        self, request: pb.RegisterCustomerRequest, context: Context
    ) -> pb.RegisterCustomerResponse:
        return await self._run(
            "RegisterCustomer",
            request,
            context,
            lambda _: RegisterCustomer(customer_id=str(uuid.uuid4()), name=request.name, email=request.email),
            lambda r: pb.RegisterCustomerResponse(result=r),
        )

    async def RenameCustomer(self, request: pb.RenameCustomerRequest, context: Context) -> pb.RenameCustomerResponse:
        return await self._run(
            "RenameCustomer",
            request,
            context,
            lambda _: RenameCustomer(customer_id=request.customer_id, name=request.name),
            lambda r: pb.RenameCustomerResponse(result=r),
        )

    async def ChangeCustomerEmail(
        self, request: pb.ChangeCustomerEmailRequest, context: Context
    ) -> pb.ChangeCustomerEmailResponse:
        return await self._run(
            "ChangeCustomerEmail",
            request,
            context,
            lambda _: ChangeCustomerEmail(customer_id=request.customer_id, email=request.email),
            lambda r: pb.ChangeCustomerEmailResponse(result=r),
        )

    async def DeactivateCustomer(
        self, request: pb.DeactivateCustomerRequest, context: Context
    ) -> pb.DeactivateCustomerResponse:
        return await self._run(
            "DeactivateCustomer",
            request,
            context,
            lambda _: DeactivateCustomer(customer_id=request.customer_id),
            lambda r: pb.DeactivateCustomerResponse(result=r),
        )
