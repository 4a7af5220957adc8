"""cqrs_client retry policy and call plumbing, against a real in-process grpc.aio server (no databases)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import pytest
from cqrs.orders.v1 import command_service_pb2 as cpb
from cqrs.orders.v1 import command_service_pb2_grpc as cgrpc
from cqrs.orders.v1 import query_service_pb2 as qpb
from cqrs.orders.v1 import query_service_pb2_grpc as qgrpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from cqrs_client import NO_RETRY, FieldViolation, OrdersClient, RetryPolicy, field_violations

FAST = RetryPolicy(max_attempts=5, initial_backoff=0.01, max_backoff=0.05, total_timeout=5.0)


@dataclass
class Flaky(cgrpc.OrderCommandServiceServicer, qgrpc.OrderQueryServiceServicer):
    """Fails the first `failures` calls with `code`, then answers; records what it received."""

    failures: int = 0
    code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE
    request_ids: list[str] = field(default_factory=list)
    attempt_times: list[float] = field(default_factory=list)
    metadata: list[dict[str, str]] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)
    counter: int = 0
    hold: bool = False  # every call waits until the client gives up on it
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set by the first call

    async def _maybe_fail(self, context: grpc.aio.ServicerContext[object, object]) -> None:
        self.attempt_times.append(time.monotonic())
        self.metadata.append({k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)})
        self.arrived.set()
        if self.hold:
            await asyncio.Event().wait()
        if len(self.attempt_times) <= self.failures:
            await context.abort(self.code, "try again")

    def _result(self, order_id: str) -> cpb.CommandResult:
        self.counter += 1
        return cpb.CommandResult(
            order_id=order_id, version=self.counter, consistency_token=f"tok-{order_id}-{self.counter}"
        )

    async def CreateOrder(
        self, request: cpb.CreateOrderRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> cpb.CreateOrderResponse:
        self.request_ids.append(request.request_id)
        await self._maybe_fail(context)
        return cpb.CreateOrderResponse(result=self._result("o-1"))

    async def PlaceOrder(
        self, request: cpb.PlaceOrderRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> cpb.PlaceOrderResponse:
        self.request_ids.append(request.request_id)
        await self._maybe_fail(context)
        return cpb.PlaceOrderResponse(result=self._result(request.order_id))

    async def AddOrderItem(
        self, request: cpb.AddOrderItemRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> cpb.AddOrderItemResponse:
        violations = error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field="quantity", description="must be > 0")]
        )
        detail = any_pb2.Any()
        detail.Pack(violations)
        status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="bad item", details=[detail])
        await context.abort_with_status(rpc_status.to_status(status))  # type: ignore[attr-defined]
        raise AssertionError("unreachable")

    async def GetOrder(
        self, request: qpb.GetOrderRequest, context: grpc.aio.ServicerContext[object, object]
    ) -> qpb.GetOrderResponse:
        self.tokens.append(list(request.consistency.consistency_tokens))
        await self._maybe_fail(context)
        return qpb.GetOrderResponse()


@pytest.fixture
async def served() -> AsyncIterator[tuple[Flaky, str]]:
    servicer = Flaky()  # type: ignore[abstract]  # only the RPCs under test
    server = grpc.aio.server()
    cgrpc.add_OrderCommandServiceServicer_to_server(servicer, server)
    qgrpc.add_OrderQueryServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


def test_backoff_grows_exponentially_within_jitter_and_cap() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.2)
    for n, base in [(1, 0.1), (2, 0.2), (3, 0.4), (4, 0.8), (5, 1.0), (9, 1.0)]:
        assert policy.backoff(n, rand=lambda: 0.0) == pytest.approx(base)
        assert policy.backoff(n, rand=lambda: 0.999999) == pytest.approx(base * 0.8, rel=1e-5)
        assert base * 0.8 - 1e-9 <= policy.backoff(n) <= base + 1e-9


@pytest.mark.parametrize(
    "kwargs",
    [{"max_attempts": 0}, {"initial_backoff": 2.0, "max_backoff": 1.0}, {"jitter": 1.5}, {"total_timeout": 0}],
)
def test_policy_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED])
async def test_unavailable_and_a_servers_cancel_are_retried_with_the_same_request_id(
    served: tuple[Flaky, str], code: grpc.StatusCode
) -> None:
    servicer, address = served
    servicer.failures, servicer.code = 2, code
    async with OrdersClient.connect(address, address, retry=FAST) as client:
        result = await client.create_order("c-1", "EUR")
    assert result.order_id == "o-1"
    assert len(servicer.request_ids) == 3
    assert len(set(servicer.request_ids)) == 1, "every retry must carry the first attempt's request_id"
    gaps = [b - a for a, b in zip(servicer.attempt_times, servicer.attempt_times[1:], strict=False)]
    assert all(gap >= 0.01 * 0.8 - 0.002 for gap in gaps), gaps


async def test_given_request_id_is_sent_as_is(served: tuple[Flaky, str]) -> None:
    servicer, address = served
    servicer.failures = 1
    async with OrdersClient.connect(address, address, retry=FAST) as client:
        await client.place_order("o-9", request_id="my-key")
    assert servicer.request_ids == ["my-key", "my-key"]


@pytest.mark.parametrize(
    "code",
    [grpc.StatusCode.ABORTED, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.INTERNAL],
)
async def test_other_codes_are_not_retried(served: tuple[Flaky, str], code: grpc.StatusCode) -> None:
    servicer, address = served
    servicer.failures, servicer.code = 1, code
    async with OrdersClient.connect(address, address, retry=FAST) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.create_order("c-1", "EUR")
    assert raised.value.code() == code
    assert len(servicer.request_ids) == 1


async def test_a_call_the_caller_cancels_is_not_retried(served: tuple[Flaky, str]) -> None:
    """Only a CANCELLED the server sent is retried: the caller's own cancellation ends the call at once."""
    servicer, address = served
    servicer.hold = True
    async with OrdersClient.connect(address, address, retry=FAST) as client:
        call = asyncio.create_task(client.create_order("c-1", "EUR"))
        await asyncio.wait_for(servicer.arrived.wait(), timeout=5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await asyncio.sleep(0.2)  # a retry, had there been one, would have arrived by now
    assert len(servicer.request_ids) == 1


async def test_attempts_are_bounded(served: tuple[Flaky, str]) -> None:
    servicer, address = served
    servicer.failures = 100
    async with OrdersClient.connect(address, address, retry=FAST) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.create_order("c-1", "EUR")
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.request_ids) == FAST.max_attempts


async def test_total_deadline_is_bounded(served: tuple[Flaky, str]) -> None:
    servicer, address = served
    servicer.failures = 100
    policy = RetryPolicy(max_attempts=100, initial_backoff=0.1, max_backoff=0.1, total_timeout=0.5)
    started = time.monotonic()
    async with OrdersClient.connect(address, address, retry=policy) as client:
        with pytest.raises(grpc.aio.AioRpcError):
            await client.create_order("c-1", "EUR")
    assert time.monotonic() - started < 1.0
    assert 2 <= len(servicer.request_ids) <= 6


async def test_no_retry_policy_tries_once(served: tuple[Flaky, str]) -> None:
    servicer, address = served
    servicer.failures = 1
    async with OrdersClient.connect(address, address, retry=NO_RETRY) as client:
        with pytest.raises(grpc.aio.AioRpcError):
            await client.create_order("c-1", "EUR")
    assert len(servicer.request_ids) == 1


async def test_unreachable_server_fails_within_the_deadline() -> None:
    started = time.monotonic()
    policy = RetryPolicy(max_attempts=3, initial_backoff=0.01, max_backoff=0.02, total_timeout=2.0)
    async with OrdersClient.connect("127.0.0.1:1", "127.0.0.1:1", retry=policy, default_timeout=0.3) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.create_order("c-1", "EUR")
    assert raised.value.code() in {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
    assert time.monotonic() - started < 2.5


async def test_bearer_token_is_sent_and_callable_is_asked_per_attempt(served: tuple[Flaky, str]) -> None:
    servicer, address = served
    servicer.failures = 1
    issued = iter(["t1", "t2"])
    async with OrdersClient.connect(address, address, retry=FAST, bearer_token=lambda: next(issued)) as client:
        await client.create_order("c-1", "EUR")
    assert [m.get("authorization") for m in servicer.metadata] == ["Bearer t1", "Bearer t2"]


async def test_field_violations_are_readable(served: tuple[Flaky, str]) -> None:
    _, address = served
    async with OrdersClient.connect(address, address, retry=FAST) as client:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await client.add_item("o-1", "SKU", "name", 0, 100)
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field_violations(raised.value) == [FieldViolation("quantity", "must be > 0")]


async def test_tokens_last_token_and_session(served: tuple[Flaky, str]) -> None:
    servicer, address = served
    async with OrdersClient.connect(address, address, retry=FAST) as client:
        first = await client.create_order("c-1", "EUR")
        assert client.last_token == first.consistency_token
        await client.get_order("o-1")
        await client.get_order("o-1", read_your_writes=True)
        await client.get_order("o-1", consistency=["explicit", "explicit"])

        session = client.session()
        a = await session.place_order("o-a")
        b1 = await session.place_order("o-b")
        b2 = await session.place_order("o-b")
        assert session.session_tokens == [a.consistency_token, b2.consistency_token]
        assert b1.consistency_token not in session.session_tokens
        await session.get_order("o-a")
        assert client.last_token == first.consistency_token, "a session does not change its client's last_token"
    assert servicer.tokens == [
        [],
        [first.consistency_token],
        ["explicit"],
        [a.consistency_token, b2.consistency_token],
    ]


async def test_a_session_keeps_the_highest_version_per_aggregate_when_replies_arrive_out_of_order(
    served: tuple[Flaky, str],
) -> None:
    _, address = served
    async with OrdersClient.connect(address, address, retry=FAST) as client:
        session = client.session()
        # Two concurrent commands on one order: the reply of version 5 arrives before the one of version 4.
        newer = cpb.CommandResult(order_id="o-x", version=5, consistency_token="tok-o-x-5")
        older = cpb.CommandResult(order_id="o-x", version=4, consistency_token="tok-o-x-4")
        session._order_result(newer)
        session._order_result(older)
        assert session.session_tokens == ["tok-o-x-5"]


async def test_query_retries_on_unavailable(served: tuple[Flaky, str]) -> None:
    servicer, address = served
    servicer.failures = 2
    async with OrdersClient.connect(address, address, retry=FAST) as client:
        await client.get_order("o-1")
    assert len(servicer.tokens) == 3
