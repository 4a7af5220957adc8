"""The load's gRPC channels: one address, or several replicas' addresses that each request is spread over.

Several addresses (`127.0.0.1:5001,127.0.0.1:5002`) make one channel whose requests go round robin, one per
replica in turn, the way a client-side balancer over a headless Kubernetes service sends them: consecutive
commands on one aggregate reach different replicas (what a replica's stream cache has to cope with)."""

from __future__ import annotations

import ipaddress

import grpc

ROUND_ROBIN = (("grpc.lb_policy_name", "round_robin"),)


def addresses(target: str) -> list[str]:
    return [part.strip() for part in target.split(",")]


def check_target(target: str) -> str | None:
    """Why `target` is not one host:port or a list of IP:port (None when it is fine)."""
    parts = addresses(target)
    if not target or any(not part or any(c.isspace() for c in part) for part in parts):
        return f"must be host:port, or IP:port,IP:port,... for several replicas; got {target!r}"
    if len(parts) > 1:
        versions = set()
        for part in parts:
            host, sep, port = part.rpartition(":")
            if not sep or not port.isdigit():
                return f"several replicas are given as IP:port each; {part!r} has no port"
            try:
                versions.add(ipaddress.ip_address(host.strip("[]")).version)
            except ValueError:
                return f"several replicas are given as IP:port each; {part!r} is not"
        if len(versions) > 1:
            return f"several replicas are all IPv4 or all IPv6 addresses; got {target!r}"
    return None


def open_load_channel(target: str) -> grpc.aio.Channel:
    """A plaintext channel to one address, or round robin per request over several (gRPC's ipv4:/ipv6: lists)."""
    parts = addresses(target)
    if len(parts) == 1:
        return grpc.aio.insecure_channel(target)
    scheme = "ipv6" if parts[0].startswith("[") else "ipv4"
    return grpc.aio.insecure_channel(f"{scheme}:" + ",".join(parts), options=ROUND_ROBIN)
