"""The batch pipeline: load, apply, write documents, derived views, parks, checkpoints; then say how to settle.

Per batch (from JetStream, or from a parked stream being resumed):

1. load, in independent calls (sent together, or one after the other: `parallel_calls`): each projection's
   documents, the customers of new orders (prefill), and the batch's streams' `checkpoints` documents
   (checkpoint version and park);
2. streams already parked: their messages are copied to `parked_events` and acknowledged (they hold no slot);
   a stream with an event that cannot be applied (`planning` names the kinds) parks there, and its later
   events wait the same way; a gap waits (nak with backoff) and parks once it has been offered
   `park_after` times; a message that names no stream is recorded in `dead_letters` and terminated;
3. fold each projection (orders first) and write it with one version-guarded bulk write;
4. derived views (`customer_views`, `order_stats`, `sales_views`): fan-out and order statistics of the customers
   the batch touched, the sales report of the days its orders were placed or cancelled on; a stream whose document
   is ahead of its checkpoint (an earlier batch wrote it and may not have finished its views) gets in full each view
   that follows one of the events it is ahead by (`view_planning.lagging_views`: an added item owes its customer's
   statistics nothing, so they take the increment as from its checkpoint). A view MongoDB refuses fails only the
   streams that need it: they are naked (parked after `park_after` offers), and their checkpoints stay where they
   are;
5. checkpoints, last: a checkpoint at v means every document and view reflects the stream up to v. Every write is
   journaled (`projector.mongo_client`): one acknowledged without the journal could be lost by a crash of MongoDB
   after the checkpoints, written to the restarted server, were acknowledged;
6. the settlement (`projector.settlement`): ack applied, duplicates and held copies (once their park is re-read and
   still there), nak what must be re-evaluated, term dead letters.

A MongoDB outage raises `PyMongoError` out of `apply`; the caller naks the whole batch.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.trace import Link, Span, SpanKind
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from core.dependency_metrics import DependencyMetrics
from core.projections import DerivedView, Document, Projection
from core.projections.orders import ORDERS
from core.read_model import ORDER_HISTORY_FIELD
from core.tracing import tracer
from projector.checkpoints import CheckpointWriter
from projector.customer_views import CustomerFields, CustomerViews
from projector.dead_letters import DeadLetterWriter
from projector.mongo_writer import MongoDocument, ReadModelWriter
from projector.order_stats import OrderStatsViews, StatsWrite, StoredStats
from projector.parking import Park, ParkStore, StreamState, held_copy, park_of
from projector.planning import (
    DecodedBatch,
    Delivery,
    Poison,
    ProjectionBatch,
    checkpoints_of,
    doc_checkpoints,
    fold,
    hold_from_failures,
    merge_checkpoints,
    prefill_customer_fields,
    stored_version,
)
from projector.registry import CUSTOMER_ORDER_STATS, ORDER_CUSTOMER_FIELDS, VIEWS
from projector.sales_tags import SalesTagSweeper
from projector.sales_views import SalesViews
from projector.settlement import VIEW_REFUSED, BatchOutcome, Settlement
from projector.view_planning import lagging_views, plan_views, view_steps
from projector.view_sources import ViewSources, ViewWriter

log = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")


def view_writers(customers: CustomerViews, stats: OrderStatsViews, sales: SalesViews) -> dict[str, ViewWriter]:
    """The writer of every view in `projector.registry.VIEWS`, by view name (a test checks none is missing)."""
    return {**customers.writers(), **stats.writers(), **sales.writers()}


class Pipeline:
    """Applies decoded batches to the read model (see the module docstring)."""

    def __init__(
        self,
        database: AsyncDatabase[MongoDocument],
        projections: Mapping[str, Projection],
        deps: DependencyMetrics,
        *,
        stream_name: str,
        park_after: int,
        max_backoff: float,
        parallel_calls: bool = True,
    ) -> None:
        self.projections = dict(projections)
        self.writers = {t: ReadModelWriter(database, p) for t, p in self.projections.items()}
        self.views = CustomerViews(database)
        self.order_stats = OrderStatsViews(database)
        self.sales = SalesViews(database)
        self._view_writers = view_writers(self.views, self.order_stats, self.sales)
        self.checkpoints = CheckpointWriter(database)
        # False: batches write documents and checkpoints only, and `recompute_views` does every view once at the
        # end (a rebuild, which no one reads until it is complete: each batch would recompute the same keys).
        self.derived_views = True
        self.parks = ParkStore(database)
        self.sales_tags = SalesTagSweeper(database)  # swept by the runner's loop, not by batches
        self.dead_letters = DeadLetterWriter(database)
        self._deps = deps
        self._settle = Settlement(stream_name=stream_name, park_after=park_after, max_backoff=max_backoff)
        # Independent MongoDB calls of a batch (its loads; its views) at once, or one after the other (a server
        # that works through requests one at a time only pays for their contention: `ProjectorSettings`).
        self._parallel_calls = parallel_calls

    async def ensure_indexes(self) -> None:
        for writer in self.writers.values():
            await writer.ensure_indexes()
        await self.sales.ensure_indexes()
        await self.parks.ensure_indexes()

    async def recompute_views(
        self, keys_per_write: int = 500, before_each: Callable[[], Awaitable[object]] | None = None
    ) -> int:
        """Recomputes every derived view of every key from the documents as they are; returns the number of keys.
        `before_each`: awaited before each write of `keys_per_write` keys (a rebuild waits there for the live read
        model). Raises `PyMongoError` if MongoDB fails or refuses a view's write."""
        total = 0
        # The report counts facts into shards, each once by its tag: a generation that was read and written before
        # (`cqrs rebuild --generation N` of a retired one) holds facts whose tags a sweep forgot. Counted from none.
        await self.sales.clear()
        for view in VIEWS:
            started = time.monotonic()
            found, carried = await self._view_keys(view)
            listed = time.monotonic()
            keys = sorted(found)
            writer = self._view_writers[view.name]
            for start in range(0, len(keys), keys_per_write):
                chunk = keys[start : start + keys_per_write]
                if before_each is not None:
                    await before_each()
                refused: set[str] = set()
                stamps = {k: carried.get(k, 0) for k in chunk}
                await self._timed(view.name, writer, chunk, stamps, refused, ViewSources())
                if refused:
                    raise PyMongoError(f"MongoDB refused view {view.name} of {len(refused)} key(s)")
            log.info("view %s recomputed for %d keys: listed in %.1fs, written in %.1fs", view.name, len(keys),
                     listed - started, time.monotonic() - listed)  # fmt: skip
            total += len(keys)
        return total

    async def _view_keys(self, view: DerivedView) -> tuple[set[str], dict[str, int]]:
        """Every key of `view`, from every document of each stream type that keys it (change logs left out), and
        for a stamped view the lowest stamp its target documents carry per key (a writer skips keys whose
        targets all carry the key document's current version)."""
        keys: set[str] = set()
        carried: dict[str, int] = {}
        for stream_type in dict.fromkeys([*view.key_fields, *view.triggers]):  # keys_from views name no key field
            projection = self.projections.get(stream_type)
            if projection is None:
                continue
            stamped = view.stamp_field is not None and projection.collection == view.collection
            async for doc in self.writers[stream_type].collection.find({}, {ORDER_HISTORY_FIELD: 0}):
                for key in view.keys_of(stream_type, str(doc["_id"]), doc):
                    keys.add(key)
                    if stamped:
                        stamp = int(doc.get(str(view.stamp_field)) or 0)
                        carried[key] = min(stamp, carried.get(key, stamp))
        return keys, carried

    async def ping(self) -> None:
        await next(iter(self.writers.values())).ping()

    async def apply(
        self,
        decoded: DecodedBatch,
        *,
        spans: Mapping[int, Span] | None = None,
        resuming: Mapping[str, Park] | None = None,
    ) -> BatchOutcome:
        """Applies one batch; `resuming`: parked streams whose events this batch brings back (their park stays
        until the caller removes it). Raises `PyMongoError` if MongoDB fails as a whole."""
        resuming = resuming or {}
        out = BatchOutcome()
        stream_ids = decoded.stream_ids() | set(resuming)
        held_by_failure = hold_from_failures(decoded)  # takes them out of the groups
        batches = {t: ProjectionBatch(p, dict(decoded.groups.get(t, {}))) for t, p in self.projections.items()}
        loaded_at = time.monotonic()
        states, known = await self._load(batches, stream_ids, resuming)

        parked = {sid: st.park for sid, st in states.items() if st.park is not None and sid not in resuming}
        hold: dict[str, list[Delivery | Poison]] = {sid: list(ds) for sid, ds in held_by_failure.items()}
        for batch in batches.values():
            for sid in [sid for sid in batch.groups if sid in parked]:
                hold.setdefault(sid, []).extend(batch.groups.pop(sid))
        self._settle.failures(decoded, parked, out, hold)

        for batch in batches.values():
            batch.result = fold(batch.projection, batch.groups, batch.docs)
            for poison in batch.result.poison:
                self._settle.new_park(out, park_of(poison))
                hold.setdefault(str(poison.stream_id), []).append(poison)
            for delivery in batch.result.held:
                hold.setdefault(delivery.recorded.stream_id, []).append(delivery)
            self._settle.gaps(batch, out, hold)
        checkpoints_read = {sid: state.checkpoint for sid, state in states.items()}
        lagging = lagging_views(batches, checkpoints_read, VIEWS)
        prior = await self._read_prior_stats(batches, lagging, resuming) if self.derived_views else {}
        await self._write_documents(batches, known, spans or {})
        failed_views = (
            await self._write_views(batches, checkpoints_read, lagging, resuming, prior, loaded_at, out)
            if self.derived_views
            else set()
        )
        for sid in failed_views:
            out.unsettled.setdefault(sid, VIEW_REFUSED)
        self._settle.written(batches, out, failed_views, states, hold)

        copies = [c for items in hold.values() for item in items if (c := held_copy(item)) is not None]
        # Only calls that go to MongoDB are timed (an empty one would count as a call in the dependency metrics).
        writes: list[Awaitable[None]] = []
        if out.parks:
            writes.append(self._timed("park", self.parks.park, list(out.parks.values())))
        if copies:
            writes.append(self._timed("park", self.parks.hold, copies))
        if out.dead_letters:
            writes.append(self._timed("dead_letters", self.dead_letters.write, out.dead_letters))
        await self._together(*writes)
        settled = checkpoints_of(batches.values())
        full = (set(settled) | set(resuming)) - failed_views
        checkpoints = merge_checkpoints(
            {sid: cp for sid, cp in settled.items() if sid not in failed_views}, doc_checkpoints(batches.values(), full)
        )
        # Last: a checkpoint promises that every view above reflects its stream up to its version.
        if checkpoints:
            async with self._deps.timed("mongodb", "checkpoints"):
                await self.checkpoints.write(checkpoints)
        self._settle.held(out, hold, await self.parks.parked_ids(hold) if hold else set())
        for batch in batches.values():
            for sid, doc in batch.current_docs().items():
                out.versions[sid] = stored_version(doc)
        return out

    async def _load(
        self, batches: dict[str, ProjectionBatch], stream_ids: set[str], resuming: Mapping[str, Park]
    ) -> tuple[dict[str, StreamState], dict[str, CustomerFields]]:
        """Documents, new orders' customers and the streams' checkpoint states (independent calls: `_together`)."""
        new_orders_of = _new_orders_customers(batches.get(ORDERS.stream_type))
        loads = []
        for t, batch in batches.items():
            ids = set(batch.groups) | {s for s, p in resuming.items() if p.stream_type == t}
            loads.append(self._timed("find", self.writers[t].load, ids) if ids else _none())
        known, states, *docs = await self._together(
            self._timed("customer_fields", self.views.customer_fields, new_orders_of) if new_orders_of else _none(),
            self._timed("checkpoints", self.parks.states, stream_ids) if stream_ids else _none(),
            *loads,
        )
        assert isinstance(known, dict) and isinstance(states, dict)
        for batch, loaded in zip(batches.values(), docs, strict=True):
            assert isinstance(loaded, dict)
            batch.docs = loaded
        return states, known

    async def _write_documents(
        self, batches: dict[str, ProjectionBatch], known: dict[str, CustomerFields], spans: Mapping[int, Span]
    ) -> None:
        """Writes each projection's changes, in projection order (orders first); new orders get their customer."""
        for stream_type, batch in batches.items():
            if known and stream_type == ORDERS.stream_type:
                prefill_customer_fields([c for c in batch.result.changes if c.expected_version is None], known)
            if not batch.result.changes:
                continue
            with _bulk_write_span(batch, spans):
                async with self._deps.timed("mongodb", "bulk_write"):
                    batch.outcome = await self.writers[stream_type].write(batch.result.changes)

    async def _read_prior_stats(
        self, batches: dict[str, ProjectionBatch], lagging: Mapping[str, set[str]], resuming: Mapping[str, Park]
    ) -> dict[str, StoredStats]:
        """The statistics of the customers this batch's order events may change, read before its order writes:
        the base of their increments (`order_stats`). Planned as if every write will succeed (a superset)."""
        keys = plan_views(batches, (CUSTOMER_ORDER_STATS,), lagging, set(resuming)).keys.get(CUSTOMER_ORDER_STATS.name)
        if not keys:
            return {}
        return await self._timed("order_stats_read", self.order_stats.read_order_stats, keys)

    async def _write_views(
        self,
        batches: dict[str, ProjectionBatch],
        checkpoints: Mapping[str, int],
        lagging: Mapping[str, set[str]],
        resuming: Mapping[str, Park],
        prior: Mapping[str, StoredStats],
        loaded_at: float,
        out: BatchOutcome,
    ) -> set[str]:
        """Fan-out, order statistics and sales report (independent calls: `_together`); returns the streams whose
        views MongoDB refused and counts how the statistics were written in `out`. `loaded_at`: when the batch read
        its checkpoints (the sales report counts on them); `checkpoints`: the versions it read, by stream."""
        plan = plan_views(batches, VIEWS, lagging, set(resuming))
        refused: dict[str, set[str]] = {view.name: set() for view in VIEWS}
        stored = {stream_type: _stored_docs(batch) for stream_type, batch in batches.items()}
        stats = CUSTOMER_ORDER_STATS.name
        steps = view_steps(plan, stats, batches.values(), checkpoints, set(resuming), lagging.get(stats, set()))
        due = [(view, keys) for view in VIEWS if (keys := plan.keys.get(view.name))]
        written = await self._together(
            *(
                self._timed(
                    view.name,
                    self._view_writers[view.name],
                    keys,
                    plan.carried[view.name],
                    refused[view.name],
                    ViewSources(
                        {sid: doc for stream_type in view.triggers for sid, doc in stored.get(stream_type, {}).items()},
                        steps if view is CUSTOMER_ORDER_STATS else {},
                        prior if view is CUSTOMER_ORDER_STATS else {},
                        checkpoints,
                        loaded_at,
                    ),
                )
                for view, keys in due
            )
        )
        for (view, _), result in zip(due, written, strict=True):
            if view is CUSTOMER_ORDER_STATS and isinstance(result, StatsWrite):
                out.stats_writes = result.counts()
        if any(refused.values()):
            log.warning(
                "MongoDB refused derived views: %s",
                "; ".join(f"{name} of {', '.join(sorted(keys))}" for name, keys in refused.items() if keys),
            )
        return {sid for sid, needs in plan.depends.items() if any(key in refused[name] for name, key in needs)}

    async def _together(self, *calls: Awaitable[Any]) -> list[Any]:
        """Runs independent MongoDB calls and returns their results in order: concurrently, waiting for all before
        raising the first failure; or one after the other, raising the first failure at once (the calls after it
        are never sent: the batch fails as a whole either way)."""
        if self._parallel_calls:
            gathered = await asyncio.gather(*calls, return_exceptions=True)
            for result in gathered:
                if isinstance(result, BaseException):
                    raise result
            return gathered
        results: list[Any] = []
        pending = list(calls)
        try:
            while pending:
                results.append(await pending.pop(0))
        finally:
            for call in pending:  # not sent after a failure: closed, without a "never awaited" warning
                if inspect.iscoroutine(call):
                    call.close()
        return results

    async def _timed(self, operation: str, call: Callable[P, Awaitable[T]], *args: P.args, **kwargs: P.kwargs) -> T:
        """`call(*args, **kwargs)`, timed as one MongoDB `operation`; called only when this is awaited (so that a
        call `_together` never sends is closed whole)."""
        async with self._deps.timed("mongodb", operation):
            return await call(*args, **kwargs)


def _bulk_write_span(batch: ProjectionBatch, spans: Mapping[int, Span]) -> Any:
    """`mongodb.bulk_write`, a child of the first applied message's span and linked to the others'."""
    own = [spans[id(d.msg)] for applied in batch.result.applied.values() for d in applied if id(d.msg) in spans]
    parent = trace.set_span_in_context(own[0]) if own else None
    return tracer().start_as_current_span(
        "mongodb.bulk_write",
        context=parent,
        kind=SpanKind.CLIENT,
        links=[Link(span.get_span_context()) for span in own[1:]],
        attributes={
            "db.system": "mongodb",
            "db.operation.name": "bulk_write",
            "db.collection.name": batch.projection.collection,
            "cqrs.documents": len(batch.result.changes),
        },
    )


def _stored_docs(batch: ProjectionBatch) -> dict[str, Document]:
    """One projection's documents as this batch left them in MongoDB, by stream id: written, or loaded and left
    alone (a document whose write lost a race or failed is left out: a view writer reads those back)."""
    unwritten = batch.outcome.conflicts | set(batch.outcome.failed)
    return {sid: doc for sid, doc in batch.current_docs().items() if sid not in unwritten}


def _new_orders_customers(orders: ProjectionBatch | None) -> set[str]:
    """The customers of the orders a batch creates: their fields go into the orders' first write (and the
    customer-fields view then finds those orders current)."""
    if orders is None:
        return set()
    key_field = ORDER_CUSTOMER_FIELDS.key_fields[ORDERS.stream_type] or ""
    return {
        str(d.recorded.payload[key_field])
        for deliveries in orders.groups.values() for d in deliveries
        if ORDER_CUSTOMER_FIELDS.triggered_by(ORDERS.stream_type, d.recorded.event_type)
        and d.recorded.payload.get(key_field)
    }  # fmt: skip


async def _none() -> dict[str, Any]:
    """What a load of nothing finds (without a call to MongoDB)."""
    return {}


__all__ = ["Document", "Pipeline", "view_writers"]
