"""Readiness as the conjunction of named conditions, mirrored into the gRPC health service.

A service is ready (SERVING) only while every one of its conditions holds: its database answers, its essential
background tasks run. Each probe or supervisor sets its own condition; this class alone decides the status and
logs what changed, so two probes can never overwrite each other's verdict.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from grpc_health.v1 import _async as health_aio
from grpc_health.v1 import health_pb2

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Readiness:
    """SERVING for `services` while every declared condition is true (NOT_SERVING until they are known)."""

    def __init__(self, servicer: health_aio.HealthServicer, services: Sequence[str], component: str) -> None:
        self._servicer = servicer
        self._services = tuple(services)
        self._component = component
        self._conditions: dict[str, bool] = {}
        self._published: bool | None = None

    def declare(self, condition: str, initially: bool) -> None:
        """Registers a condition before the first `publish`/`set` (its initial truth)."""
        self._conditions[condition] = initially

    @property
    def serving(self) -> bool:
        return all(self._conditions.values())

    def failing(self) -> list[str]:
        """The conditions that do not hold now, e.g. ["event store (PostgreSQL) reachable"]."""
        return [name for name, ok in self._conditions.items() if not ok]

    async def set(self, condition: str, ok: bool) -> None:
        """Records one condition and publishes the status if the overall verdict changed."""
        if condition not in self._conditions:
            raise KeyError(f"undeclared readiness condition {condition!r}")
        self._conditions[condition] = ok
        await self.publish()

    async def publish(self) -> None:
        serving = self.serving
        if serving == self._published:
            return
        if serving:
            log.info("%s is ready (SERVING)", self._component)
        elif self._published is not None:
            # Conditions are named for what must hold ("... reachable"), so they are listed as the checks that fail.
            log.warning("%s is not ready (NOT_SERVING); failing checks: %s", self._component, "; ".join(self.failing()))
        self._published = serving
        status = SERVING if serving else NOT_SERVING
        for service in self._services:
            await self._servicer.set(service, status)
