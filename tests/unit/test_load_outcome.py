"""`cqrs load`: which replies are errors and which are reads of the run's own writes not visible yet (no I/O)."""

from __future__ import annotations

import random
from typing import Any

import grpc
import pytest
from cqrs.orders.v1 import command_service_pb2 as cpb
from cqrs.orders.v1 import query_service_pb2 as qpb

from core.errors import DependencyUnavailable
from cqrsctl.load.config import LoadConfig, ReadConsistency
from cqrsctl.load.outcome import TOKEN_WAIT_EXPIRED, Outcome, classify
from cqrsctl.load.pool import OrderPool
from cqrsctl.load.runner import make_specs
from cqrsctl.load.worker import Worker
from query_service.consistency import Lag, WaitOutcome

WAIT_EXPIRED = WaitOutcome(4.5, (Lag("Order", "o1", required=3, applied=1),)).describe()
MONGO_DOWN = DependencyUnavailable("read model (MongoDB)", "connection refused").message


def test_the_token_wait_message_is_the_query_service_s() -> None:
    assert WAIT_EXPIRED.startswith(TOKEN_WAIT_EXPIRED)
    assert not MONGO_DOWN.startswith(TOKEN_WAIT_EXPIRED)


@pytest.mark.parametrize(
    ("code", "details", "own", "expected"),
    [
        (None, None, True, Outcome.OK),
        (None, None, False, Outcome.OK),
        # A read of an order this run created, answered before the projector applied it: lag, not failure.
        ("NOT_FOUND", "order o1 not found", True, Outcome.NOT_YET_VISIBLE),
        ("UNAVAILABLE", WAIT_EXPIRED, True, Outcome.NOT_YET_VISIBLE),
        # An id the run never created (or no read at all): NOT_FOUND is a real error.
        ("NOT_FOUND", "order o1 not found", False, Outcome.ERROR),
        ("UNAVAILABLE", WAIT_EXPIRED, False, Outcome.ERROR),
        # Outages and everything else stay errors, own write or not.
        ("UNAVAILABLE", MONGO_DOWN, True, Outcome.ERROR),
        ("UNAVAILABLE", None, True, Outcome.ERROR),
        ("DEADLINE_EXCEEDED", "Deadline Exceeded", True, Outcome.ERROR),
        ("FAILED_PRECONDITION", "order is placed", True, Outcome.ERROR),
        ("INVALID_ARGUMENT", "bad token", True, Outcome.ERROR),
        ("INTERNAL", "internal error", True, Outcome.ERROR),
    ],
)
def test_classify(code: str | None, details: str | None, own: bool, expected: Outcome) -> None:
    assert classify(code, details, reads_own_write=own) is expected


class _Queries:
    """Answers GetOrder with `error` (or an empty order) and keeps the requests."""

    def __init__(self, error: grpc.aio.AioRpcError | None = None) -> None:
        self.requests: list[qpb.GetOrderRequest] = []
        self.error = error

    async def GetOrder(self, request: qpb.GetOrderRequest, **_: Any) -> qpb.GetOrderResponse:
        self.requests.append(request)
        if self.error is not None:
            raise self.error
        return qpb.GetOrderResponse()


class _Commands:
    async def CreateOrder(self, request: cpb.CreateOrderRequest, **_: Any) -> cpb.CreateOrderResponse:
        return cpb.CreateOrderResponse(result=cpb.CommandResult(order_id="new", version=1, consistency_token="t-new"))


def _rpc_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details, None)


def _worker(read_consistency: ReadConsistency, queries: _Queries) -> Worker:
    """A worker whose mix is only `get`, with one pooled order written at version 2 (token "t-o1")."""
    config = LoadConfig(max_requests=10, mix={"get": 1}, read_consistency=read_consistency, ttq_sample=0.0, seed=1)
    worker = Worker(make_specs(config, ("c1",))[0], lambda _: None)
    worker._queries = queries  # type: ignore[assignment]
    worker._commands = _Commands()  # type: ignore[assignment]
    worker._pool.add_new("o1", "c1", version=1, now=0.0, token="t-o1-v1")
    order = worker._pool.get("o1")
    assert order is not None
    order.version, order.token = 2, "t-o1"
    return worker


async def test_a_not_found_read_of_the_run_s_own_order_is_not_yet_visible_not_an_error() -> None:
    queries = _Queries(_rpc_error(grpc.StatusCode.NOT_FOUND, "order o1 not found"))
    worker = _worker("eventual", queries)
    await worker._one(None)
    await worker._one(None)
    assert [r.HasField("consistency") for r in queries.requests] == [False, False]  # eventual: no token
    result = worker._rec.results()["GetOrder"]
    assert (result.count, result.errors_by_code, result.not_yet_visible) == (2, {}, 2)
    tick = worker._rec.take_tick(0, 0)
    assert (tick.requests, tick.errors, tick.not_yet_visible) == (2, 0, 2)


async def test_token_mode_reads_carry_the_order_s_last_token() -> None:
    queries = _Queries()
    worker = _worker("token", queries)
    await worker._one(None)
    assert [list(r.consistency.consistency_tokens) for r in queries.requests] == [["t-o1"]]
    assert worker._rec.results()["GetOrder"].not_yet_visible == 0


async def test_other_read_failures_stay_errors() -> None:
    queries = _Queries(_rpc_error(grpc.StatusCode.UNAVAILABLE, MONGO_DOWN))
    worker = _worker("token", queries)
    await worker._one(None)
    result = worker._rec.results()["GetOrder"]
    assert (result.errors_by_code, result.not_yet_visible) == ({"UNAVAILABLE": 1}, 0)


async def test_created_orders_keep_their_token_for_later_reads() -> None:
    queries = _Queries()
    worker = _worker("token", queries)
    worker._pool = OrderPool(10, random.Random(0))  # empty: `get` falls back to CreateOrder
    await worker._one(None)
    created = worker._pool.get("new")
    assert created is not None and created.token == "t-new"
    await worker._one(None)
    assert [list(r.consistency.consistency_tokens) for r in queries.requests] == [["t-new"]]
