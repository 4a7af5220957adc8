"""gRPC load for the fault scenarios: concurrent clients recording every reply (`Load`)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from cqrs.orders.v1 import (
    command_service_pb2,
    command_service_pb2_grpc,
    customer_service_pb2,
    customer_service_pb2_grpc,
)

from tests.faults.support import ADDRESS, CHANNEL_OPTIONS, RPC_TIMEOUT, STOP_CANCEL_MARGIN_SECONDS, Service, wait_until


@dataclass(frozen=True)
class Ack:
    """A command that got OK: where the reply says its event is."""

    rpc: str
    request_id: str
    stream_id: str
    version: int


@dataclass(frozen=True)
class Failure:
    rpc: str
    request_id: str
    code: grpc.StatusCode
    details: str
    seconds: float  # how long the call took
    at: float  # time.monotonic() when it ended
    address: str  # the command_service replica it was sent to


@dataclass(frozen=True)
class Stopping:
    """A command_service replica being stopped gracefully, from the signal to its exit (time.monotonic())."""

    address: str
    since: float
    until: float

    def cancelled(self, failure: Failure) -> bool:
        """Whether `failure` is a CANCELLED this stop explains (see STOP_CANCEL_MARGIN_SECONDS)."""
        return (
            failure.code == grpc.StatusCode.CANCELLED
            and failure.address == self.address
            and self.since <= failure.at <= self.until + STOP_CANCEL_MARGIN_SECONDS
        )


@dataclass
class Load:
    """Concurrent clients issuing RegisterCustomer / CreateOrder / AddOrderItem / PlaceOrder / CancelOrder.

    Each client works on its own customer and orders (no write conflicts between clients), never retries a call
    (a failed call is recorded and its order abandoned, since the command may or may not have been applied), and
    paces itself a little so that the load stays modest on two cores.
    """

    addresses: Sequence[str]
    workers: int = 4
    seed: int = field(default_factory=lambda: random.randrange(1 << 30))
    pause: float = 0.02
    acks: list[Ack] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    stops: list[Stopping] = field(default_factory=list)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> Load:
        self._tasks = [asyncio.create_task(self._worker(i), name=f"load-{i}") for i in range(self.workers)]
        return self

    async def stop(self) -> None:
        self._stop.set()
        done, pending = await asyncio.wait(self._tasks, timeout=RPC_TIMEOUT + 5)
        for task in pending:
            task.cancel()
        for task in done:
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]  # a bug in the load itself
        assert not pending, f"{len(pending)} load workers did not stop within {RPC_TIMEOUT + 5}s"

    async def progress(self, count: int, *, timeout: float = 30.0, what: str = "") -> None:
        """Waits until `count` more commands got OK (proof that the system accepts commands right now)."""
        target = len(self.acks) + count
        await wait_until(
            lambda: _now(len(self.acks) >= target, f"{len(self.acks)}/{target} acked; {self.failure_summary()}"),
            what=f"{count} more acknowledged commands{' ' + what if what else ''}",
            timeout=timeout,
            interval=0.05,
        )

    def failure_summary(self) -> str:
        counts = Counter(f.code.name for f in self.failures)
        return ", ".join(f"{code}: {n}" for code, n in sorted(counts.items())) or "no failures"

    def failures_since(self, since: float) -> list[Failure]:
        return [f for f in self.failures if f.at >= since]

    async def stop_gracefully(self, service: Service, timeout: float) -> None:
        """`service.stop_gracefully`, recorded so that the CANCELLED calls of its stop count as retryable."""
        since = time.monotonic()
        try:
            await service.stop_gracefully(timeout)
        finally:
            self.stops.append(Stopping(service.address, since, time.monotonic()))

    async def _worker(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        address = self.addresses[index % len(self.addresses)]
        async with grpc.aio.insecure_channel(address, options=CHANNEL_OPTIONS) as channel:
            orders = command_service_pb2_grpc.OrderCommandServiceStub(channel)
            customers = customer_service_pb2_grpc.CustomerCommandServiceStub(channel)
            customer_id: str | None = None
            while not self._stop.is_set():
                if customer_id is None:
                    rid = _rid()
                    reply = await self._call(
                        address,
                        "RegisterCustomer",
                        rid,
                        customers.RegisterCustomer(
                            customer_service_pb2.RegisterCustomerRequest(
                                request_id=rid, name=f"Fault client {index}", email=f"{rid}@example.com"
                            ),
                            timeout=RPC_TIMEOUT,
                        ),
                    )
                    if reply is not None:
                        customer_id = reply.result.customer_id
                        self._ack("RegisterCustomer", rid, reply.result.customer_id, reply.result.version)
                    continue
                await self._order_lifecycle(address, orders, customer_id, rng)

    async def _order_lifecycle(
        self,
        address: str,
        stub: command_service_pb2_grpc.OrderCommandServiceAsyncStub,
        customer_id: str,
        rng: random.Random,
    ) -> None:
        rid = _rid()
        created = await self._call(
            address,
            "CreateOrder",
            rid,
            stub.CreateOrder(
                command_service_pb2.CreateOrderRequest(
                    request_id=rid, customer_id=customer_id, currency="EUR", shipping_address=ADDRESS
                ),
                timeout=RPC_TIMEOUT,
            ),
        )
        if created is None:
            return
        order_id = created.result.order_id
        self._ack("CreateOrder", rid, order_id, created.result.version)
        for line in range(rng.randint(1, 3)):
            if self._stop.is_set():
                return
            rid = _rid()
            added = await self._call(
                address,
                "AddOrderItem",
                rid,
                stub.AddOrderItem(
                    command_service_pb2.AddOrderItemRequest(
                        request_id=rid, order_id=order_id, sku=f"SKU-{line}", name=f"Item {line}",
                        quantity=rng.randint(1, 4), unit_price_minor=rng.randint(100, 5000),
                    ),
                    timeout=RPC_TIMEOUT,
                ),
            )  # fmt: skip
            if added is None:
                return
            self._ack("AddOrderItem", rid, order_id, added.result.version)
        steps = ["PlaceOrder"] if rng.random() < 0.7 else ["CancelOrder"]
        if steps == ["PlaceOrder"] and rng.random() < 0.3:
            steps.append("CancelOrder")
        for step in steps:
            if self._stop.is_set():
                return
            rid = _rid()
            call: Awaitable[Any]
            if step == "PlaceOrder":
                call = stub.PlaceOrder(
                    command_service_pb2.PlaceOrderRequest(request_id=rid, order_id=order_id), timeout=RPC_TIMEOUT
                )
            else:
                call = stub.CancelOrder(
                    command_service_pb2.CancelOrderRequest(request_id=rid, order_id=order_id, reason="fault test"),
                    timeout=RPC_TIMEOUT,
                )
            reply = await self._call(address, step, rid, call)
            if reply is None:
                return
            self._ack(step, rid, order_id, reply.result.version)

    def _ack(self, rpc: str, rid: str, stream_id: str, version: int) -> None:
        self.acks.append(Ack(rpc, rid, stream_id, int(version)))

    async def _call(self, address: str, rpc: str, rid: str, call: Awaitable[Any]) -> Any:
        started = time.monotonic()
        try:
            reply = await call
        except grpc.aio.AioRpcError as exc:
            now = time.monotonic()
            self.failures.append(Failure(rpc, rid, exc.code(), exc.details() or "", now - started, now, address))
            await asyncio.sleep(0.1)  # pacing after a failure: no hot loop against a server that is down
            return None
        if self.pause:
            await asyncio.sleep(self.pause)
        return reply


def _rid() -> str:
    return str(uuid.uuid4())


async def _now(done: bool, detail: str) -> tuple[bool, str]:
    return done, detail
