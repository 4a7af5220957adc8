"""One load worker: its own gRPC channels, order pool and histograms, driven open- or closed-loop.

Latency is measured from the intended send time in open loop (so a stalled server or client cannot hide its
queueing: coordinated-omission correction) and from the actual send time in closed loop. Time-to-queryable probes
run as their own tasks, off the measured request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable

import grpc
from cqrs.orders.v1 import command_service_pb2 as cpb
from cqrs.orders.v1 import command_service_pb2_grpc as cgrpc
from cqrs.orders.v1 import consistency_pb2, order_pb2
from cqrs.orders.v1 import query_service_pb2 as qpb
from cqrs.orders.v1 import query_service_pb2_grpc as qgrpc

from cqrsctl.load import histograms as hist
from cqrsctl.load.channels import open_load_channel
from cqrsctl.load.config import COMMAND_RPCS, OPERATIONS
from cqrsctl.load.messages import Done, Ready, RpcResult, Tick, WorkerMessage, WorkerResult, WorkerSpec
from cqrsctl.load.outcome import Outcome, classify
from cqrsctl.load.pool import OrderPool, PooledOrder, Status
from cqrsctl.load.schedule import ArrivalSchedule

ADDRESS = order_pb2.Address(
    recipient="Load Tester", line1="1 Benchmark Way", city="Berlin", postal_code="10115", country="DE"
)
# Codes that say the pool's idea of the order is wrong: drop it rather than fail on it again.
_STALE_CODES = frozenset({"FAILED_PRECONDITION", "NOT_FOUND"})

Emit = Callable[[WorkerMessage], None]


class _Recorder:
    """Per-RPC histograms, error and not-yet-visible counts for the whole run, plus coarse per-second ones for the
    timeline."""

    def __init__(self) -> None:
        self.histograms: dict[str, hist.Histogram] = {}
        self.counts: Counter[str] = Counter()
        self.errors: dict[str, Counter[str]] = {}
        self.not_yet_visible: Counter[str] = Counter()
        self._reset_interval()

    def _reset_interval(self) -> None:
        self.interval_commands = hist.new_histogram(hist.COARSE_DIGITS)
        self.interval_queries = hist.new_histogram(hist.COARSE_DIGITS)
        self.interval_requests = 0
        self.interval_errors = 0
        self.interval_not_yet_visible = 0
        self.interval_dropped = 0

    def record(self, rpc: str, seconds: float, outcome: Outcome, code: str | None = None) -> None:
        """One completed request; `code` names the status of an ERROR."""
        histogram = self.histograms.get(rpc)
        if histogram is None:
            histogram = self.histograms[rpc] = hist.new_histogram()
            self.errors[rpc] = Counter()
        hist.record_seconds(histogram, seconds)
        self.counts[rpc] += 1
        self.interval_requests += 1
        if outcome is Outcome.ERROR:
            self.errors[rpc][code or "UNKNOWN"] += 1
            self.interval_errors += 1
        elif outcome is Outcome.NOT_YET_VISIBLE:
            self.not_yet_visible[rpc] += 1
            self.interval_not_yet_visible += 1
        hist.record_seconds(self.interval_commands if rpc in COMMAND_RPCS else self.interval_queries, seconds)

    def take_tick(self, worker_id: int, second: int, *, final: bool = False, pending_probes: int = 0) -> Tick:
        tick = Tick(
            worker_id=worker_id,
            second=second,
            requests=self.interval_requests,
            errors=self.interval_errors,
            dropped=self.interval_dropped,
            commands=hist.encode(self.interval_commands),
            queries=hist.encode(self.interval_queries),
            final=final,
            pending_probes=pending_probes,
            not_yet_visible=self.interval_not_yet_visible,
        )
        self._reset_interval()
        return tick

    def results(self) -> dict[str, RpcResult]:
        return {
            rpc: RpcResult(self.counts[rpc], dict(self.errors[rpc]), hist.encode(h), self.not_yet_visible[rpc])
            for rpc, h in self.histograms.items()
        }


class Worker:
    def __init__(self, spec: WorkerSpec, emit: Emit) -> None:
        self.spec = spec
        self._emit = emit
        self._rng = random.Random(spec.seed)
        self._pool = OrderPool(spec.pool_size, self._rng)
        self._rec = _Recorder()
        self._ops = [op for op, _ in spec.mix]
        self._cum_weights = list(itertools.accumulate(w for _, w in spec.mix))
        self._in_flight: set[asyncio.Task[None]] = set()
        self._probes: set[asyncio.Task[None]] = set()
        self._ttq = hist.new_histogram()
        self._ttq_timeouts = 0
        self._ttq_skipped = 0
        self._ttq_polls = 0
        self._fallbacks = 0
        self._dropped = 0
        self._issued = 0
        self._ticks = 0
        self._start = 0.0
        self._last_completion = 0.0

    async def run(self, wait_start: Callable[[], Awaitable[bool]]) -> WorkerResult:
        spec = self.spec
        async with (
            open_load_channel(spec.command_addr) as command_channel,
            open_load_channel(spec.query_addr) as query_channel,
        ):
            self._commands = cgrpc.OrderCommandServiceStub(command_channel)
            self._queries = qgrpc.OrderQueryServiceStub(query_channel)
            await asyncio.wait_for(
                asyncio.gather(command_channel.channel_ready(), query_channel.channel_ready()), spec.start_timeout
            )
            self._emit(Ready(spec.worker_id))
            if not await wait_start():
                raise TimeoutError(f"worker {spec.worker_id}: no start signal within {spec.start_timeout:g}s")
            self._start = self._last_completion = time.perf_counter()
            ticker = asyncio.create_task(self._ticker())
            try:
                if spec.mode == "open":
                    await self._open_loop()
                else:
                    await self._closed_loop()
                if self._in_flight:
                    await asyncio.gather(*self._in_flight)
                elapsed = self._last_completion - self._start
            finally:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            self._emit(self._rec.take_tick(spec.worker_id, self._ticks, final=True, pending_probes=len(self._probes)))
            if self._probes:  # each probe ends by itself within ttq_timeout
                await asyncio.gather(*self._probes)
        return WorkerResult(
            worker_id=spec.worker_id,
            elapsed_s=elapsed,
            dropped=self._dropped,
            rpcs=self._rec.results(),
            ttq_histogram=hist.encode(self._ttq),
            ttq_timeouts=self._ttq_timeouts,
            ttq_skipped=self._ttq_skipped,
            ttq_polls=self._ttq_polls,
            fallbacks=self._fallbacks,
            evicted=self._pool.evicted,
            pool_size=len(self._pool),
            ticks=self._ticks + 1,
        )

    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(max(0.0, self._start + self._ticks + 1 - time.perf_counter()))
            self._emit(self._rec.take_tick(self.spec.worker_id, self._ticks))
            self._ticks += 1

    async def _open_loop(self) -> None:
        spec = self.spec
        schedule = ArrivalSchedule(self._start, spec.rate, spec.phase)
        end = self._start + spec.duration
        for index in range(spec.max_requests):
            intended = schedule.intended(index)
            if intended >= end:
                break
            delay = intended - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if len(self._in_flight) >= spec.max_in_flight:
                # Queueing it would only hide the overload; the arrival is lost and reported.
                self._dropped += 1
                self._rec.interval_dropped += 1
                continue
            task = asyncio.create_task(self._one(intended))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)

    async def _closed_loop(self) -> None:
        end = self._start + self.spec.duration

        async def caller() -> None:
            while time.perf_counter() < end and self._issued < self.spec.max_requests:
                self._issued += 1
                await self._one(None)

        await asyncio.gather(*(caller() for _ in range(self.spec.concurrency)))

    def _choose(self) -> str:
        return self._rng.choices(self._ops, cum_weights=self._cum_weights)[0]

    async def _one(self, intended: float | None) -> None:
        """Sends one operation and records its latency, from `intended` when given, else from the send."""
        operation = self._choose()
        order: PooledOrder | None = None  # the order a command acts on
        read: PooledOrder | None = None  # the order a `get` reads: one this run created
        if operation in ("add", "change", "place", "cancel"):
            order = self._pool.take(operation)
        elif operation == "get":
            read_id = self._pool.pick_for_read(time.perf_counter())
            read = None if read_id is None else self._pool.get(read_id)
        if (order is None and operation in ("add", "change", "place", "cancel")) or (
            operation == "get" and read is None
        ):
            operation = "create"
            self._fallbacks += 1
        rpc = OPERATIONS[operation]
        sent = time.perf_counter()
        code: str | None = None
        details = ""
        version = 0
        order_id = token = ""
        try:
            order_id, version, token = await self._send(operation, order, read)
        except grpc.aio.AioRpcError as exc:
            code, details = exc.code().name, exc.details() or ""
        done = time.perf_counter()
        self._last_completion = max(self._last_completion, done)
        outcome = classify(code, details, reads_own_write=read is not None)
        self._rec.record(rpc, done - (sent if intended is None else intended), outcome, code)
        if order is not None:
            if code is None:
                order.version, order.token = version, token
            self._pool.release(order, keep=code not in _STALE_CODES)
        if code is None and rpc in COMMAND_RPCS and self._rng.random() < self.spec.ttq_sample:
            self._start_probe(order_id, version, token, done)

    async def _send(self, operation: str, order: PooledOrder | None, read: PooledOrder | None) -> tuple[str, int, str]:
        """Sends `operation`; returns (order id, version, consistency token) of a command's result; updates `order`
        on success. A `get` of `read` carries its last token in token mode (the query service then waits until
        the read model reflects that command), none in eventual mode."""
        timeout = self.spec.deadline
        if operation == "create":
            customer = self._rng.choice(self.spec.customer_ids)
            created = await self._commands.CreateOrder(
                cpb.CreateOrderRequest(
                    request_id=_rid(), customer_id=customer, currency="EUR", shipping_address=ADDRESS
                ),
                timeout=timeout,
            )
            result = created.result
            self._pool.add_new(result.order_id, customer, result.version, time.perf_counter(), result.consistency_token)
            return result.order_id, result.version, result.consistency_token
        if operation == "get":
            assert read is not None
            token = read.token if self.spec.read_consistency == "token" else ""
            await self._queries.GetOrder(_get_order_request(read.order_id, token), timeout=timeout)
            return read.order_id, 0, ""
        if operation == "list":
            customer = self._rng.choice(self.spec.customer_ids)
            await self._queries.ListOrders(qpb.ListOrdersRequest(customer_id=customer, page_size=20), timeout=timeout)
            return "", 0, ""
        assert order is not None
        oid = order.order_id
        if operation == "add":
            sku = order.next_sku()
            added = await self._commands.AddOrderItem(
                cpb.AddOrderItemRequest(
                    request_id=_rid(), order_id=oid, sku=sku, name="Load test item",
                    quantity=self._rng.randint(1, 5), unit_price_minor=self._rng.randint(100, 10_000),
                ),
                timeout=timeout,
            )  # fmt: skip
            order.skus.append(sku)
            return oid, added.result.version, added.result.consistency_token
        if operation == "change":
            changed = await self._commands.ChangeItemQuantity(
                cpb.ChangeItemQuantityRequest(
                    request_id=_rid(), order_id=oid, sku=self._rng.choice(order.skus), quantity=self._rng.randint(1, 9)
                ),
                timeout=timeout,
            )
            return oid, changed.result.version, changed.result.consistency_token
        if operation == "place":
            placed = await self._commands.PlaceOrder(
                cpb.PlaceOrderRequest(request_id=_rid(), order_id=oid), timeout=timeout
            )
            order.status = Status.PLACED
            return oid, placed.result.version, placed.result.consistency_token
        if operation == "cancel":
            cancelled = await self._commands.CancelOrder(
                cpb.CancelOrderRequest(request_id=_rid(), order_id=oid, reason="load test"), timeout=timeout
            )
            order.status = Status.CANCELLED
            return oid, cancelled.result.version, cancelled.result.consistency_token
        raise ValueError(f"unknown operation {operation!r}")

    def _start_probe(self, order_id: str, version: int, token: str, replied_at: float) -> None:
        if len(self._probes) >= self.spec.max_ttq_probes:
            self._ttq_skipped += 1
            return
        task = asyncio.create_task(self._probe(order_id, version, token, replied_at))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, order_id: str, version: int, token: str, replied_at: float) -> None:
        """One GetOrder carrying the command's consistency token: the query service answers once the read model
        reflects the command, so the call returns at the moment a query can see it; records that wait.

        One call per probe (the server's waiting is shared by all callers), where polling would add load to the
        very read model whose lag it measures. The call is repeated only if the server gives up waiting first.
        """
        spec = self.spec
        give_up = replied_at + spec.ttq_timeout
        request = _get_order_request(order_id, token)
        while True:
            remaining = give_up - time.perf_counter()
            if remaining <= 0:
                self._ttq_timeouts += 1
                return
            self._ttq_polls += 1
            try:
                reply = await self._queries.GetOrder(request, timeout=remaining)
                if reply.order.version >= version:
                    hist.record_seconds(self._ttq, time.perf_counter() - replied_at)
                    return
            except grpc.aio.AioRpcError:
                pass  # UNAVAILABLE once the server's own wait ran out: ask again until our timeout
            await asyncio.sleep(_PROBE_RETRY_SECONDS)


# Pause before repeating a time-to-queryable probe the server could not answer yet (its wait ran out, or an error).
_PROBE_RETRY_SECONDS = 0.01


def _get_order_request(order_id: str, token: str) -> qpb.GetOrderRequest:
    """GetOrder for `order_id`; with a `token`, answered once the read model reflects that command."""
    if not token:
        return qpb.GetOrderRequest(order_id=order_id)
    return qpb.GetOrderRequest(
        order_id=order_id, consistency=consistency_pb2.ConsistencyRequirement(consistency_tokens=[token])
    )


def _rid() -> str:
    return str(uuid.uuid4())


async def run_worker(spec: WorkerSpec, emit: Emit, wait_start: Callable[[], Awaitable[bool]]) -> None:
    """Runs one worker to the end and emits Ready, one Tick per second, then Done."""
    result = await Worker(spec, emit).run(wait_start)
    emit(Done(result))
