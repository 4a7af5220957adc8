"""Every RPC in the protos has exactly one implementation: a table entry (unary) or an explicit method (streaming).

A servicer inherits an UNIMPLEMENTED stub for every RPC from the generated base, so an RPC added to a .proto and
missed in a table would otherwise fail only when a client calls it. The adapters also stay free of database
drivers: the stores translate driver outages into `DependencyUnavailable` (no servers here, no I/O).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import cqrs.orders.v1
import pytest
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from pymongo.errors import OperationFailure, ServerSelectionTimeoutError

from command_service.api.customers import CustomerCommandServicer
from command_service.api.orders import OrderCommandServicer
from command_service.api.runner import Command
from core.errors import DependencyUnavailable
from core.rpc_table import Rpc, rpc_entries
from query_service.api.customers import CustomerQueryServicer
from query_service.api.orders import OrderQueryServicer
from query_service.read_model import read_model_outage

ROOT = Path(__file__).resolve().parents[2]

SERVICERS: dict[str, type] = {
    "cqrs.orders.v1.OrderCommandService": OrderCommandServicer,
    "cqrs.orders.v1.CustomerCommandService": CustomerCommandServicer,
    "cqrs.orders.v1.OrderQueryService": OrderQueryServicer,
    "cqrs.orders.v1.CustomerQueryService": CustomerQueryServicer,
}


def _proto_services() -> dict[str, ServiceDescriptor]:
    """Every service of every generated module of the API package, by full name."""
    services: dict[str, ServiceDescriptor] = {}
    for module_info in pkgutil.iter_modules(cqrs.orders.v1.__path__):
        if module_info.name.endswith("_pb2"):
            module = importlib.import_module(f"cqrs.orders.v1.{module_info.name}")
            services.update({s.full_name: s for s in module.DESCRIPTOR.services_by_name.values()})
    return services


SERVICES = _proto_services()


def test_every_service_in_the_protos_has_a_servicer() -> None:
    assert set(SERVICES) == set(SERVICERS)


@pytest.mark.parametrize("name", sorted(SERVICERS))
def test_every_unary_rpc_has_one_table_entry_for_its_request(name: str) -> None:
    service, servicer = SERVICES[name], SERVICERS[name]
    table = rpc_entries(servicer)
    unary = {m.name for m in service.methods if not m.client_streaming and not m.server_streaming}
    assert set(table) == unary, f"{name}: table entries differ from the unary RPCs of the proto"
    for rpc, entry in table.items():
        method = service.methods_by_name[rpc]
        assert entry.name == rpc
        assert entry.request.DESCRIPTOR is method.input_type, f"{name}.{rpc} decodes the wrong request type"
        if isinstance(entry, Command):
            assert isinstance(entry.response, type) and issubclass(entry.response, Message), entry.response
            assert entry.response.DESCRIPTOR is method.output_type, f"{name}.{rpc} replies with the wrong type"


@pytest.mark.parametrize("name", sorted(SERVICERS))
def test_every_streaming_rpc_is_a_method_of_the_servicer_itself(name: str) -> None:
    service, servicer = SERVICES[name], SERVICERS[name]
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            own = vars(servicer).get(method.name)
            assert callable(own) and not isinstance(own, Rpc), f"{name}.{method.name} is not implemented"


def test_a_table_entry_is_an_async_method_of_the_servicer_instance() -> None:
    servicer = OrderCommandServicer(handler=None)  # type: ignore[arg-type]  # never run here
    method = servicer.PlaceOrder
    assert inspect.iscoroutinefunction(method), "grpc.aio runs a plain function in its thread pool"
    assert method.__name__ == "PlaceOrder"
    assert OrderCommandServicer.PlaceOrder.name == "PlaceOrder"


@pytest.mark.parametrize(
    "path",
    sorted(
        str(p.relative_to(ROOT))
        for package in ("command_service", "query_service")
        for p in (ROOT / package / "api").glob("*.py")
    ),
)
def test_the_adapters_import_no_database_driver(path: str) -> None:
    tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    drivers = {name for name in imported if name.split(".")[0] in ("asyncpg", "pymongo", "nats")}
    assert not drivers, f"{path} imports {sorted(drivers)}: translate the driver's errors in its store instead"


def test_an_unreachable_mongodb_is_a_dependency_outage_that_names_only_the_read_model() -> None:
    cause = ServerSelectionTimeoutError("127.0.0.1:27017: [Errno 111] Connection refused, Topology Description: ...")
    with pytest.raises(DependencyUnavailable) as raised, read_model_outage():
        raise cause
    assert raised.value.message == "read model (MongoDB) is unavailable; retry later"
    assert raised.value.dependency == "read model (MongoDB)"
    assert "Connection refused" in raised.value.detail and "Topology Description" not in raised.value.detail
    assert raised.value.__cause__ is cause


def test_other_mongodb_errors_pass_the_read_model_boundary_unchanged() -> None:
    with pytest.raises(OperationFailure), read_model_outage():
        raise OperationFailure("bad query", code=2)
