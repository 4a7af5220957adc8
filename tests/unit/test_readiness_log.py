"""`core.health.Readiness` says which of its conditions fail when it turns NOT_SERVING (conditions are named for
what must hold, e.g. "read model (MongoDB) reachable", so the line must not read as if that held)."""

from __future__ import annotations

import logging

import pytest
from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

from core import health


async def test_turning_not_serving_names_the_failing_checks_as_failing(caplog: pytest.LogCaptureFixture) -> None:
    servicer = health_aio.HealthServicer()
    readiness = health.Readiness(servicer, ["orders.v1.OrderQueryService"], "query service")
    readiness.declare("read model (MongoDB) reachable", True)
    readiness.declare("background tasks running", True)
    with caplog.at_level(logging.INFO, logger=health.log.name):
        await readiness.publish()
        await readiness.set("read model (MongoDB) reachable", False)
        await readiness.set("background tasks running", False)  # already NOT_SERVING: nothing new to say
        await readiness.set("read model (MongoDB) reachable", True)
        await readiness.set("background tasks running", True)
    assert [r.getMessage() for r in caplog.records if r.name == health.log.name] == [
        "query service is ready (SERVING)",
        "query service is not ready (NOT_SERVING); failing checks: read model (MongoDB) reachable",
        "query service is ready (SERVING)",
    ]
    request = health_pb2.HealthCheckRequest(service="orders.v1.OrderQueryService")
    assert (await servicer.Check(request, None)).status == health_pb2.HealthCheckResponse.SERVING
