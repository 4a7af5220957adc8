"""`cqrs load --command-addr IP:P,IP:P`: one channel whose requests reach every replica in turn (two real gRPC
servers on loopback, IPv4 and IPv6)."""

from __future__ import annotations

import socket
from collections import Counter

import grpc
import pytest

from cqrsctl.load.channels import open_load_channel


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.parametrize("host", ["127.0.0.1", "[::1]"])
async def test_requests_alternate_over_the_replicas(host: str) -> None:
    if host == "[::1]" and not _has_ipv6_loopback():
        pytest.skip("no IPv6 loopback here")
    calls: Counter[str] = Counter()
    servers, addresses = [], []
    for name in ("a", "b"):

        async def answer(_request: bytes, _context: object, name: str = name) -> bytes:
            calls[name] += 1
            return b""

        server = grpc.aio.server()
        port = server.add_insecure_port(f"{host}:0")
        handler = grpc.unary_unary_rpc_method_handler(answer)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.T", {"M": handler}),))
        await server.start()
        servers.append(server)
        addresses.append(f"{host}:{port}")
    try:
        async with open_load_channel(",".join(addresses)) as channel:
            call = channel.unary_unary("/t.T/M", None, None)
            for _ in range(20):
                await call(b"", timeout=5)
    finally:
        for server in servers:
            await server.stop(0)
    assert calls["a"] + calls["b"] == 20 and min(calls["a"], calls["b"]) >= 8
