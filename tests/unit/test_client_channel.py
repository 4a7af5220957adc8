"""The shipped client's channel options match what the servers allow (keepalive) and accept (message size)."""

from __future__ import annotations

from core import grpc_server
from cqrs_client import CHANNEL_OPTIONS, MAX_MESSAGE_BYTES, ClientTLS


def test_keepalive_and_limits_are_aligned_with_the_servers() -> None:
    options = dict(CHANNEL_OPTIONS)
    assert options["grpc.keepalive_time_ms"] == grpc_server.KEEPALIVE_TIME_MS
    assert options["grpc.keepalive_time_ms"] >= grpc_server.MIN_PING_INTERVAL_MS, "server would answer too_many_pings"
    assert options["grpc.keepalive_timeout_ms"] == grpc_server.KEEPALIVE_TIMEOUT_MS
    assert options["grpc.keepalive_permit_without_calls"] == 1
    assert options["grpc.http2.max_pings_without_data"] == 0
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == MAX_MESSAGE_BYTES
    assert MAX_MESSAGE_BYTES == 4 * 1024 * 1024


def test_client_package_imports_no_service_code() -> None:
    import ast
    from pathlib import Path

    allowed = ("cqrs_client", "cqrs.orders.v1", "grpc", "google.rpc", "google.protobuf", "__future__")
    package = Path(__file__).resolve().parents[2] / "cqrs_client"
    for source in package.glob("*.py"):
        for node in ast.walk(ast.parse(source.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in {"core", "command_service", "query_service", "projector", "cqrsctl"}:
                    raise AssertionError(f"{source.name} imports {name}: the client must ship without the services")
                stdlib = name.split(".")[0] in {"asyncio", "collections", "dataclasses", "datetime", "pathlib",
                                                "random", "time", "types", "typing", "uuid"}  # fmt: skip
                assert stdlib or name.startswith(allowed), f"{source.name} imports {name}"


def test_mutual_tls_needs_both_files() -> None:
    import pytest

    with pytest.raises(ValueError):
        ClientTLS.from_files(cert_file="only-cert.pem")
