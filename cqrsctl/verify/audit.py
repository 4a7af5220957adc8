"""The audit itself: one pass over the stream, the event store and the read model, then re-checks until the
differences that may still be in flight have settled.

Order of work (memory is bounded by the batch size, plus two bits per event position and a few numbers per
customer for the order statistics):

1. at the same time (different servers):
   a. the JetStream stream, message by message: each must carry an event of PostgreSQL (else a stray message);
      the positions seen go into a bit set;
   b. per projection (orders first, as in the projector) the streams of PostgreSQL in batches (keyset on stream
      id): the batch's documents and checkpoints are read from MongoDB, then its events from PostgreSQL, folded
      with the registered projections and compared; streams of types no projection follows are only checked
      against the stream; then the sales report: every report document against the report of the orders folded
      (memory: a few numbers per day, currency and SKU);
2. every event up to the starting horizon not seen in the stream must be in the outbox (still on its way) or too
   old for the stream's retention (counted apart), else it is missing; the stream's tail is read again first;
3. each collection and the checkpoints: documents and checkpoints without events;
4. re-checks (`settle`): every stream that differed is read again (MongoDB first, then PostgreSQL, so a
   document can never look ahead of the store by a race), with the streams it depends on (an order's customer,
   a customer's orders, a report day's orders); a difference that is not explained by the projector being
   behind is reported at once, one that is is re-checked until `settle_seconds` have passed;
5. the outbox (rows older than the threshold) and the dead letters (and parked streams).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Iterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime

from core.backoff import exponential
from core.envelope import HEADER_STREAM_ID, RecordedEvent
from core.projections.sales import parse_key
from cqrsctl.verify.compare import Assessment, PositionSet, StreamState, assess
from cqrsctl.verify.expected import (
    CUSTOMER_TYPE,
    ORDER_CUSTOMER_EVENT,
    ORDER_CUSTOMER_FIELD,
    ORDER_TYPE,
    REGISTRY,
    REPORT,
    REPORT_EVENTS,
    Folded,
    OrderStatsAccumulator,
    SalesAccumulator,
    expected_customer,
    expected_for,
    fold_all,
    order_customer_id,
    projections_by_type,
)
from cqrsctl.verify.model import Document, ExpectedDoc, Finding, FindingKind, VerifyConfig, VerifyResult
from cqrsctl.verify.own_sources import view_of
from cqrsctl.verify.progress import Progress
from cqrsctl.verify.sources import EventStoreReader, ReadModelReader, SortedReader
from cqrsctl.verify.stream_scanner import StreamFacts, StreamMessage, StreamScanner
from projector.checkpoints import COLLECTION as CHECKPOINTS

# Customers folded for their orders' customer fields, kept for the next batches (their orders cluster).
CUSTOMER_CACHE_SIZE = 4096
# Kinds that can come in the millions (a stream purged or replaced): listed up to `max_listed`, then counted.
CAPPED_KINDS = frozenset({FindingKind.MISSING_FROM_STREAM, FindingKind.STRAY_MESSAGE})
SETTLE_FIRST_DELAY = 0.2
SETTLE_MAX_DELAY = 2.0


def chunks(items: Sequence[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield list(items[start : start + size])


class Audit:
    def __init__(
        self,
        config: VerifyConfig,
        events: EventStoreReader,
        stream: StreamScanner,
        read_model: ReadModelReader,
        progress: Progress,
    ) -> None:
        self._config = config
        self._pg = events
        self._stream = stream
        self._mongo = read_model
        self._progress = progress
        self.result = VerifyResult()
        self._positions = PositionSet()  # event positions seen in the stream
        self._unseen = PositionSet()  # positions the document pass did not find in the stream (yet)
        self._facts: StreamFacts | None = None
        self._first_message_at: datetime | None = None
        self._horizon = 0
        # stream type (or REPORT, for report ids) -> ids to re-check
        self._candidates: dict[str, set[str]] = {p.stream_type: set() for p in REGISTRY}
        self._candidates[REPORT] = set()
        self._stats = OrderStatsAccumulator()
        self._sales = SalesAccumulator()
        self._stats_only: set[str] = set()
        self._customer_cache: OrderedDict[str, Folded | None] = OrderedDict()
        self._by_type = projections_by_type()
        self._bytewise = False
        self._listed: dict[FindingKind, int] = {}

    async def run(self) -> VerifyResult:
        started = time.monotonic()
        self._horizon = await self._pg.horizon()
        # Stream ids in byte order (MongoDB's) even when the database collates otherwise (slower, no index).
        self._bytewise = not await self._pg.byte_ordered()
        self._facts = await self._stream.open()
        self._progress.phase("events", self._horizon)
        # The stream (NATS) and the documents (MongoDB, PostgreSQL) are read at the same time; events the
        # document pass finds not yet seen in the stream are settled once both are done.
        stream = asyncio.create_task(self._timed("stream", self._scan_stream()))
        try:
            await self._timed("events", self._scan_events())
            await stream
        finally:
            if not stream.done():
                stream.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await stream
        await self._timed("published", self._check_unseen())
        await self._timed("orphans", self._scan_orphans())
        self._progress.phase("settle")
        await self._timed("settle", self._settle())
        await self._timed("outbox", self._check_outbox())
        await self._timed("dead_letters", self._check_dead_letters())
        self._summarise_capped()
        self._progress.close()
        self.result.elapsed_seconds = time.monotonic() - started
        return self.result

    async def _timed(self, phase: str, work: Awaitable[None]) -> None:
        started = time.monotonic()
        await work
        self.result.phase_seconds[phase] = round(time.monotonic() - started, 3)

    async def _scan_events(self) -> None:
        await self._scan_unprojected()
        for projection in REGISTRY:
            await self._scan_projection(projection.stream_type)
        await self._scan_statistics_only()
        await self._scan_sales()

    # ---- 1. the stream ---------------------------------------------------------------------------------------

    async def _scan_stream(self) -> None:
        while batch := await self._stream.fetch():
            await self._take_messages(batch)

    async def _take_messages(self, batch: Sequence[StreamMessage]) -> None:
        refs = await self._pg.refs_at(m.event.position for m in batch if m.event is not None)
        for message in batch:
            self.result.messages_checked += 1
            if self._first_message_at is None:
                self._first_message_at = message.timestamp
            where = f"stream message #{message.seq} on {message.subject}"
            event = message.event
            if event is None:
                self._find(FindingKind.STRAY_MESSAGE, _subject_id(message.subject), f"{where}: {message.error}")
                continue
            ref = refs.get(event.position)
            if ref is None:
                self._find(
                    FindingKind.STRAY_MESSAGE, event.stream_id,
                    f"{where}: no event at position {event.position} in PostgreSQL",
                )  # fmt: skip
            elif ref != event:
                self._find(
                    FindingKind.STRAY_MESSAGE, event.stream_id,
                    f"{where}: carries {event.event_id} v{event.version}, PostgreSQL has {ref.event_id} "
                    f"v{ref.version} of {ref.stream_id} at position {event.position}",
                )  # fmt: skip
            elif not self._positions.add(event.position):
                self.result.duplicate_messages += 1

    async def _follow_stream(self) -> None:
        """Reads what was published since the stream was scanned (events the relay sent meanwhile)."""
        await self._stream.refresh()
        while batch := await self._stream.fetch():
            await self._take_messages(batch)

    # ---- 2. the event store, stream by stream ----------------------------------------------------------------

    async def _scan_unprojected(self) -> None:
        """Streams of types no read model follows: only checked against the JetStream stream."""
        after = ""
        types = [p.stream_type for p in REGISTRY]
        while ids := await self._pg.stream_ids(after, self._config.batch_size, stream_types=types, exclude=True):
            after = ids[-1]
            events = await self._pg.events_of(ids)
            self._check_published(events.values())
            count = sum(len(e) for e in events.values())
            self.result.events_checked += count
            self._progress.advance(count)

    async def _scan_projection(self, stream_type: str) -> None:
        collection = self._by_type[stream_type].collection
        size = self._config.batch_size
        # The documents and checkpoints come from sorted cursors, merged with the keyset over PostgreSQL in the
        # same byte order; each batch is read from MongoDB before its events are read from PostgreSQL.
        documents = self._mongo.sorted_reader(collection, size)
        checkpoints_of = self._mongo.sorted_reader(CHECKPOINTS, size, {"stream_type": stream_type}, {"version": 1})
        try:
            await self._scan_streams(stream_type, collection, documents, checkpoints_of)
        finally:
            await documents.close()
            await checkpoints_of.close()

    async def _scan_streams(
        self, stream_type: str, collection: str, documents: SortedReader, checkpoints_of: SortedReader
    ) -> None:
        after = ""
        size = self._config.batch_size
        while ids := await self._pg.stream_ids(after, size, stream_types=[stream_type], bytewise=self._bytewise):
            after = ids[-1]
            docs = await documents.upto(after)
            checkpoints = {i: int(d.get("version", 0)) for i, d in (await checkpoints_of.upto(after)).items()}
            events = await self._pg.events_of(ids)
            self._check_published(events.values())
            folded = fold_all(events)
            customers = await self._customers_of(folded.values()) if stream_type == ORDER_TYPE else {}
            for stream_id in ids:
                f = folded.get(stream_id)
                if f is None:
                    continue  # no events any more (cannot happen: events are never deleted)
                if stream_type == ORDER_TYPE:
                    self._stats.add(f)
                    self._sales.add(f)
                expected = expected_for(f, customers, self._stats)
                if stream_type == CUSTOMER_TYPE:
                    self._stats.pop(stream_id)  # done with it: what is left are customers known only by orders
                state = StreamState(
                    collection, stream_id, f.pg_version, expected, docs.get(stream_id), checkpoints.get(stream_id),
                    fold_error=f.error,
                )  # fmt: skip
                if assess(state).findings:
                    self._candidates[stream_type].add(stream_id)
            count = sum(len(e) for e in events.values())
            self.result.events_checked += count
            self.result.documents_checked += len(folded)
            self._progress.advance(count)

    async def _customers_of(self, orders: Iterable[Folded]) -> dict[str, Folded]:
        """The folded customers of these orders (for their customer fields), through a small cache."""
        wanted = {cid for f in orders if (cid := order_customer_id(f)) is not None}
        missing = [cid for cid in wanted if cid not in self._customer_cache]
        if missing:
            folded = fold_all(await self._pg.events_of(missing))
            for cid in missing:
                self._customer_cache[cid] = folded.get(cid)
        out: dict[str, Folded] = {}
        for cid in wanted:
            self._customer_cache.move_to_end(cid)
            if (f := self._customer_cache[cid]) is not None:
                out[cid] = f
        while len(self._customer_cache) > CUSTOMER_CACHE_SIZE:
            self._customer_cache.popitem(last=False)
        return out

    async def _scan_statistics_only(self) -> None:
        """Customers with orders but no events of their own: a document holding only the order statistics."""
        collection = self._by_type[CUSTOMER_TYPE].collection
        for ids in chunks(self._stats.customers(), self._config.batch_size):
            docs = await self._mongo.documents(collection, ids)
            checkpoints = await self._mongo.checkpoints(ids)
            for customer_id in ids:
                expected = expected_customer(customer_id, None, self._stats)
                state = StreamState(
                    collection, customer_id, 0, expected, docs.get(customer_id), checkpoints.get(customer_id)
                )
                if assess(state).findings:
                    self._candidates[CUSTOMER_TYPE].add(customer_id)
                self._stats.pop(customer_id)
                self._stats_only.add(customer_id)
            self.result.documents_checked += len(ids)

    async def _scan_sales(self) -> None:
        """Every report document, and every one the orders folded above make, compared (differences are settled
        like the others: orders placed meanwhile may make a document look ahead or behind)."""
        expected = self._sales.expected()
        self._sales = SalesAccumulator()  # done with the rows
        ids = set(expected)
        async for batch in self._mongo.id_batches(REPORT, self._config.batch_size):
            ids.update(batch)
        for chunk in chunks(sorted(ids), self._config.batch_size):
            docs = await self._mongo.documents(REPORT, chunk)
            for key_id in chunk:
                if assess(_report_state(key_id, expected.get(key_id), docs.get(key_id))).findings:
                    self._candidates[REPORT].add(key_id)
            self.result.documents_checked += len(chunk)

    def _check_published(self, streams: Iterable[Sequence[RecordedEvent]]) -> None:
        """Notes the events up to the horizon the stream scan has not shown (yet): see `_check_unseen`."""
        for events in streams:
            for e in events:
                if e.position <= self._horizon and e.position not in self._positions:
                    self._unseen.add(e.position)

    async def _check_unseen(self) -> None:
        """Every event up to the horizon is in the stream, in the outbox, or older than the stream keeps."""
        left = (p for p in self._unseen if p not in self._positions)
        while chunk := list(itertools.islice(left, self._config.batch_size)):
            # Outbox first, then the stream's tail: an event that left the outbox was acked by JetStream before.
            unpublished = await self._pg.unpublished(chunk)
            if unpublished:
                await self._follow_stream()
            for position, stream_id, version, recorded_at in unpublished:
                if position in self._positions:
                    continue
                if self._expired(recorded_at):
                    self.result.expired_events += 1
                    continue
                self._find(
                    FindingKind.MISSING_FROM_STREAM, stream_id,
                    f"event v{version} at position {position} is neither in the stream nor in the outbox",
                )  # fmt: skip

    def _expired(self, recorded_at: datetime) -> bool:
        """Whether the stream's retention may have removed an event this old (then it is not a finding)."""
        facts = self._facts
        if facts is None:
            return False
        age = (datetime.now(UTC) - recorded_at).total_seconds()
        if facts.max_age_seconds > 0 and age >= facts.max_age_seconds:
            return True
        first = self._first_message_at
        return facts.count_limited and (first is None or recorded_at < first)

    # ---- 3. documents and checkpoints without events ---------------------------------------------------------

    async def _scan_orphans(self) -> None:
        for projection in REGISTRY:
            async for ids in self._mongo.id_batches(projection.collection, self._config.batch_size):
                existing = await self._pg.existing_streams(ids)
                for stream_id in ids:
                    if stream_id not in existing and stream_id not in self._stats_only:
                        self._candidates[projection.stream_type].add(stream_id)
        async for ids in self._mongo.id_batches(CHECKPOINTS, self._config.batch_size):
            existing = await self._pg.existing_streams(ids)
            for stream_id in ids:
                if stream_id not in existing:
                    self._find(
                        FindingKind.CHECKPOINT_AHEAD, stream_id, "checkpoint of a stream with no events", CHECKPOINTS
                    )

    # ---- 4. re-checks until the differences settle -----------------------------------------------------------

    async def _settle(self) -> None:
        deadline = time.monotonic() + self._config.settle_seconds
        pending = {t: set(ids) for t, ids in self._candidates.items() if ids}
        while pending:
            final = time.monotonic() >= deadline
            self.result.settle_rounds += 1
            still: dict[str, set[str]] = {}
            outlasting: dict[str, dict[str, list[Finding]]] = {}  # derived view -> id -> its findings
            for stream_type, ids in pending.items():
                for chunk in chunks(sorted(ids), self._config.batch_size):
                    for stream_id, outcome in (await self._recheck(stream_type, chunk)).items():
                        if not outcome.findings:
                            continue
                        if outcome.pending and not final:
                            still.setdefault(stream_type, set()).add(stream_id)
                            continue
                        if outcome.pending and (view := _derived_view(outcome.findings)) is not None:
                            outlasting.setdefault(view, {})[stream_id] = outcome.findings
                            continue
                        self._still_so(outcome.findings, outcome.pending)
            await self._hot_keys(outlasting)
            pending = still
            self._progress.advance()
            if pending:
                delay = exponential(self.result.settle_rounds, SETTLE_FIRST_DELAY, SETTLE_MAX_DELAY)
                await asyncio.sleep(max(0.0, min(delay, deadline - time.monotonic())))

    def _still_so(self, findings: Iterable[Finding], pending: bool) -> None:
        note = f" (still so after {self._config.settle_seconds:g}s)" if pending else ""
        self.result.findings.extend(replace(f, detail=f.detail + note) for f in findings)

    async def _hot_keys(self, outlasting: dict[str, dict[str, list[Finding]]]) -> None:
        """Derived documents whose sources never all caught up while re-checked (a busy customer's statistics, the
        day's report under load): one that equals this release's fold of its sources as stored (each of which is
        checked against PostgreSQL on its own) is counted in flight, not reported."""
        for view, findings in outlasting.items():
            held = await self._mongo.held_on_own_sources(view, sorted(findings))
            self.result.hot_keys_in_flight += len(held)
            for doc_id, its_findings in findings.items():
                if doc_id not in held:
                    self._still_so(its_findings, True)

    async def _recheck(self, stream_type: str, ids: list[str]) -> dict[str, Assessment]:
        """Reads these streams again with everything their documents depend on, MongoDB first."""
        if stream_type == REPORT:
            return await self._recheck_reports(ids)
        projection = self._by_type[stream_type]
        customer_of: dict[str, str] = {}
        orders_of: dict[str, str] = {}  # order id -> customer id, for the customers re-checked
        if stream_type == ORDER_TYPE:
            customer_of = await self._pg.linked(ORDER_CUSTOMER_EVENT, ORDER_CUSTOMER_FIELD, stream_ids=ids)
        elif stream_type == CUSTOMER_TYPE:
            orders_of = await self._pg.linked(ORDER_CUSTOMER_EVENT, ORDER_CUSTOMER_FIELD, values=ids)
        related = set(ids) | set(customer_of.values()) | set(orders_of)
        docs = await self._mongo.documents(projection.collection, ids)
        checkpoints = await self._mongo.checkpoints(related)
        # Then PostgreSQL: at least as new as what MongoDB showed.
        events = await self._pg.events_of(related)
        late_orders: set[str] = set()
        if stream_type == CUSTOMER_TYPE:
            now_linked = await self._pg.linked(ORDER_CUSTOMER_EVENT, ORDER_CUSTOMER_FIELD, values=ids)
            late_orders = {now_linked[o] for o in set(now_linked) - set(orders_of)}  # their customers wait
        folded = fold_all(events)

        def behind(stream_id: str) -> bool:
            f = folded.get(stream_id)
            return f is not None and checkpoints.get(stream_id, 0) < f.pg_version

        stats = OrderStatsAccumulator()
        for order_id in orders_of:
            if (f := folded.get(order_id)) is not None and f.stream_type == ORDER_TYPE:
                stats.add(f)
        out: dict[str, Assessment] = {}
        for stream_id in ids:
            f = folded.get(stream_id)
            if f is not None and f.stream_type != stream_type:
                f = None  # an id of another aggregate type: this collection has no business with it
            if stream_type == CUSTOMER_TYPE:
                expected = expected_customer(stream_id, f, stats)
                deps_behind = stream_id in late_orders or any(behind(o) for o, c in orders_of.items() if c == stream_id)
            else:
                expected = expected_for(f, folded, stats) if f is not None else None
                customer_id = customer_of.get(stream_id)
                deps_behind = customer_id is not None and behind(customer_id)
            state = StreamState(
                projection.collection, stream_id, f.pg_version if f else 0, expected, docs.get(stream_id),
                checkpoints.get(stream_id), deps_behind, f.error if f else None,
            )  # fmt: skip
            out[stream_id] = assess(state)
        return out

    async def _recheck_reports(self, ids: list[str]) -> dict[str, Assessment]:
        """Reads these report documents again with the orders placed or cancelled on their days: the orders and
        their checkpoints first, then the documents, then the orders again (found late: still in flight)."""
        days = {key.day for key_id in ids if (key := parse_key(key_id)) is not None}
        before = await self._pg.streams_with_events_on(ORDER_TYPE, REPORT_EVENTS, days)
        checkpoints = await self._mongo.checkpoints(before)
        docs = await self._mongo.documents(REPORT, ids)
        after = await self._pg.streams_with_events_on(ORDER_TYPE, REPORT_EVENTS, days)
        folded = fold_all(await self._pg.events_of(after))
        sales = SalesAccumulator()
        for f in folded.values():
            sales.add(f)
        expected = sales.expected()
        # A day's report waits for every order of that day: one behind (or new) may explain any difference.
        behind = bool(after - before) or any(checkpoints.get(sid, 0) < f.pg_version for sid, f in folded.items())
        return {key_id: assess(_report_state(key_id, expected.get(key_id), docs.get(key_id), behind)) for key_id in ids}

    # ---- 5. outbox and dead letters --------------------------------------------------------------------------

    async def _check_outbox(self) -> None:
        threshold = self._config.outbox_age_seconds
        count, rows = await self._pg.stale_outbox(threshold, self._config.max_listed)
        for row in rows:
            self._find(
                FindingKind.OUTBOX_STALE, row.stream_id,
                f"outbox row at position {row.position} waiting {row.age_seconds:.0f}s (threshold {threshold:g}s)",
            )  # fmt: skip
        if count > len(rows):
            self._find(FindingKind.OUTBOX_STALE, "", f"{count - len(rows)} more outbox rows older than {threshold:g}s")

    async def _check_dead_letters(self) -> None:
        count, letters = await self._mongo.dead_letters(self._config.max_listed)
        for letter in letters:
            headers = letter.get("headers") or {}
            stream_id = str(headers.get(HEADER_STREAM_ID) or _subject_id(str(letter.get("subject", ""))))
            self._find(
                FindingKind.DEAD_LETTER, stream_id,
                f"stream message #{letter.get('stream_seq', letter['_id'])} parked: {letter.get('reason', '')}",
                "dead_letters",
            )  # fmt: skip
        if count > len(letters):
            self._find(FindingKind.DEAD_LETTER, "", f"{count - len(letters)} more dead letters", "dead_letters")
        count, parked = await self._mongo.parked_streams(self._config.max_listed)
        for checkpoint in parked:
            park = checkpoint.get("parked") or {}
            self._find(
                FindingKind.DEAD_LETTER, str(checkpoint["_id"]),
                f"stream parked at version {park.get('version', '?')} ({park.get('kind', '?')}): "
                f"{park.get('reason', '')}",
                CHECKPOINTS,
            )  # fmt: skip
        if count > len(parked):
            self._find(FindingKind.DEAD_LETTER, "", f"{count - len(parked)} more parked streams", CHECKPOINTS)

    def _find(self, kind: FindingKind, stream_id: str, detail: str, collection: str | None = None) -> None:
        if kind in CAPPED_KINDS:
            self._listed[kind] = self._listed.get(kind, 0) + 1
            if self._listed[kind] > self._config.max_listed:
                return  # counted; summarised by `_summarise_capped`
        self.result.findings.append(Finding(kind, stream_id, collection, detail))

    def _summarise_capped(self) -> None:
        for kind, count in self._listed.items():
            if count > self._config.max_listed:
                self.result.findings.append(
                    Finding(kind, "", None, f"{count - self._config.max_listed} more not listed ({count} in all)")
                )


def _report_state(
    key_id: str, expected: ExpectedDoc | None, actual: Document | None, orders_behind: bool = False
) -> StreamState:
    """A report document as a `StreamState`: no stream, no checkpoint of its own, its orders as dependencies."""
    return StreamState(REPORT, key_id, 0, expected, actual, None, orders_behind, checkpointed=False)


def _derived_view(findings: Sequence[Finding]) -> str | None:
    """The derived view one document's findings all lie in, if they are differences in its fields only."""
    if len(findings) != 1 or findings[0].kind is not FindingKind.DOCUMENT_DIFFERS or findings[0].collection is None:
        return None
    return view_of(findings[0].collection, (d.path for d in findings[0].diffs), both_present=True)


def _subject_id(subject: str) -> str:
    """The stream id at the end of an event subject (`<prefix>.<type>.<id>`)."""
    return subject.rsplit(".", 1)[-1] if subject else ""
