"""CustomerCommandService: one table entry per RPC (request -> command, response), all run by `CommandRunner`."""

from __future__ import annotations

import uuid
from typing import Any

from cqrs.orders.v1 import customer_service_pb2 as pb
from cqrs.orders.v1 import customer_service_pb2_grpc as pb_grpc

from command_service.api.runner import Command, CommandRunner
from command_service.domain import customer_commands as cmd
from command_service.domain.customer_validation import customer_violations
from command_service.handlers import CommandHandler


class CustomerCommandServicer(pb_grpc.CustomerCommandServiceServicer):
    """The customer commands, as a table: RPC = Command(request type, request -> command, response type)."""

    def __init__(self, handler: CommandHandler[Any, cmd.CustomerCommand]) -> None:
        self.runner = CommandRunner(handler, customer_violations, pb.CustomerCommandResult, id_field="customer_id")

    RegisterCustomer = Command(
        pb.RegisterCustomerRequest,
        # the server picks the id
        lambda r: cmd.RegisterCustomer(customer_id=str(uuid.uuid4()), name=r.name, email=r.email),
        pb.RegisterCustomerResponse,
    )
    RenameCustomer = Command(
        pb.RenameCustomerRequest,
        lambda r: cmd.RenameCustomer(customer_id=r.customer_id, name=r.name),
        pb.RenameCustomerResponse,
    )
    ChangeCustomerEmail = Command(
        pb.ChangeCustomerEmailRequest,
        lambda r: cmd.ChangeCustomerEmail(customer_id=r.customer_id, email=r.email),
        pb.ChangeCustomerEmailResponse,
    )
    DeactivateCustomer = Command(
        pb.DeactivateCustomerRequest,
        lambda r: cmd.DeactivateCustomer(customer_id=r.customer_id),
        pb.DeactivateCustomerResponse,
    )
