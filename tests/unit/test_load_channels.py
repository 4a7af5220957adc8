"""`cqrs load --command-addr`: one address, or several replicas' IP:port spread round robin per request."""

from __future__ import annotations

import pytest

from cqrsctl.load.channels import check_target
from cqrsctl.load.config import ConfigError, LoadConfig


@pytest.mark.parametrize("target", ["127.0.0.1:50051", "command:50051", "127.0.0.1:1,127.0.0.1:2", "[::1]:1,[::1]:2"])
def test_one_address_or_several_ip_addresses_are_accepted(target: str) -> None:
    assert check_target(target) is None


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("", "must be host:port"),
        ("127.0.0.1:1, ", "must be host:port"),
        ("host a:1", "must be host:port"),
        ("command-0:1,command-1:1", "'command-0:1' is not"),
        ("127.0.0.1:1,127.0.0.1", "has no port"),
        ("127.0.0.1:1,[::1]:2", "all IPv4 or all IPv6"),
    ],
)
def test_anything_else_says_what_is_wrong(target: str, why: str) -> None:
    problem = check_target(target)
    assert problem is not None and why in problem
    with pytest.raises(ConfigError, match="command-addr"):
        LoadConfig(command_addr=target, mode="closed", duration=1).validate()
