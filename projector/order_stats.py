"""The order statistics on customers (`projector.registry.CUSTOMER_ORDER_STATS`): per customer, its orders by
status and its placed totals by currency, written after the order documents of a batch (`projector.customer_views`
writes the other view that joins the two aggregates).

They are idempotent: a redelivered batch whose streams are ahead of their checkpoints (an earlier batch wrote the
documents and stopped before its views) writes them again; a duplicate of a stream at its checkpoint writes none
(the checkpoint says they count it already). Every write of a customer's statistics is a compare-and-set on
`order_stats_seq`, a counter each write increments: it applies only if no other write came between the read of
the counter and it. Two ways to compute them:

- *increment*: when every order of the customer in the batch went from a document the statistics count as it is
  (at its checkpoint, or ahead of it only by events the statistics do not follow, such as an added item:
  `view_planning.lagging_views`) to the one this batch wrote, the statistics read *before* the batch's order writes
  plus those orders' changes. Reading before the writes is what makes this exact: no statistics written after one
  of our order writes can be the base (they might count it already), and the checkpoints say the base counts
  each order as at its checkpoint, which for the statistics is as the batch found it. Cost: independent of how
  many orders the customer has.
- *recompute*: one aggregation over every order of the customer, after reading the counter. Used for the rest
  (an order ahead of its checkpoint by an event they follow, a stream being resumed, a write another replica won,
  a customer never counted with a counter yet); a recompute whose compare-and-set fails reads the counter and
  recomputes again, a bounded number of times, and then the customer is refused (its streams are retried later,
  as for any refused view). Its cost grows with the customer's orders: one aggregation reads at most about
  `ORDERS_PER_AGGREGATION` of them (by the customers' last statistics), a bigger customer on its own.

An increment whose compare-and-set fails (another replica wrote the statistics after our read: the orders of
one customer hash to every partition, so with several replicas this is the common case for a busy customer) is
made again on the statistics as they are now, when every write since our read was an increment
(`order_stats_increments`): those counted other orders' changes, never ours (an order's change is written by
one batch, and a batch counts only changes from a document the statistics count as it is, see above), so ours
adds on top exactly.
A recompute since our read may have counted our orders already: then we recompute too.

`order_stats_version` stays as a stamp of how far the statistics are: it only grows and never exceeds the sum of
the versions of the customer's orders (a recompute sets that sum; an increment adds each order's version step).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pymongo import UpdateOne
from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import BulkWriteError, PyMongoError

from core.mongo_ids import IDS_PER_QUERY, find_in
from core.projections import Document
from core.projections.customers import COLLECTION as CUSTOMERS_COLLECTION
from core.projections.customers import STATS_INCREMENTS_FIELD, STATS_SEQ_FIELD, STATS_VERSION_FIELD, empty_order_stats
from core.projections.orders import COLLECTION as ORDERS_COLLECTION
from core.read_model import ORDER_STATUS_COUNTERS
from projector.mongo_writer import MongoDocument, duplicate_indexes, refused_indexes
from projector.registry import CUSTOMER_ORDER_STATS
from projector.view_sources import Step, ViewSources, ViewWriter

log = logging.getLogger(__name__)

# One counter per order status, from the read-model contract.
STATUS_COUNTERS: dict[str, str] = {str(status): counter for status, counter in ORDER_STATUS_COUNTERS.items()}

# A recompute whose compare-and-set keeps losing (replicas writing the same customer) tries this often in all.
STATS_ATTEMPTS = 4
# A recompute's aggregation reads every order of its customers. The MongoDB-wire test server spends 0.08 to 0.14 ms
# of its CPU per order read and serves one request at a time, so on a busy server four customers of 8,000 to 10,000
# orders in one call outlasted the projector's socket timeout: the batch failed, its streams were left ahead of their
# checkpoints, and the retry recomputed them again, for ever (a ten-minute soak's projectors fell to 4 events/s).
# One call reads about this many orders at most.
ORDERS_PER_AGGREGATION = 2_000


@dataclass(frozen=True, slots=True)
class OrderStats:
    stats: dict[str, Any]
    source_version: int  # sum of the versions of every order of the customer, deleted ones included


def order_stats_from_groups(customer_ids: Iterable[str], groups: Iterable[Mapping[str, Any]]) -> dict[str, OrderStats]:
    """Builds each customer's statistics from the `$group` rows of `order_stats_pipeline` (pure).

    A customer without rows (no orders) gets empty statistics at source version 0.
    """
    counts: dict[str, dict[str, int]] = {}
    totals: dict[str, dict[str, int]] = {}
    source: dict[str, int] = {}
    for row in groups:
        key = row["_id"]
        customer_id = str(key["customer_id"])
        source[customer_id] = source.get(customer_id, 0) + int(row["versions"])
        if key.get("deleted"):
            continue  # a tombstone counts for the source version only
        counter = STATUS_COUNTERS.get(str(key.get("status")))
        if counter is None:
            continue
        per_status = counts.setdefault(customer_id, {})
        per_status[counter] = per_status.get(counter, 0) + int(row["orders"])
        if counter == "placed_orders":
            currency = str(key["currency"])
            per_currency = totals.setdefault(customer_id, {})
            per_currency[currency] = per_currency.get(currency, 0) + int(row["total_minor"])
    result: dict[str, OrderStats] = {}
    for customer_id in customer_ids:
        stats = empty_order_stats()
        stats.update(counts.get(customer_id, {}))
        stats["placed_totals"] = [
            {"currency": currency, "total_minor": total}
            for currency, total in sorted(totals.get(customer_id, {}).items())
        ]
        result[customer_id] = OrderStats(stats, source.get(customer_id, 0))
    return result


def counted_orders(stats: Mapping[str, Any] | None) -> int:
    """How many orders a customer's statistics count (every status counter; deleted orders are not counted)."""
    return sum(int((stats or {}).get(counter) or 0) for counter in STATUS_COUNTERS.values())


def stats_chunks(customer_ids: Iterable[str], sizes: Mapping[str, int]) -> list[list[str]]:
    """The distinct customers, sorted, in groups of at most `IDS_PER_QUERY` whose orders by `sizes` (their last
    statistics; 0 when unknown) stay within `ORDERS_PER_AGGREGATION`; a bigger customer is a group of its own."""
    chunks: list[list[str]] = []
    chunk: list[str] = []
    orders = 0
    for customer_id in sorted(set(customer_ids)):
        size = max(0, sizes.get(customer_id, 0))
        if chunk and (orders + size > ORDERS_PER_AGGREGATION or len(chunk) >= IDS_PER_QUERY):
            chunks.append(chunk)
            chunk, orders = [], 0
        chunk.append(customer_id)
        orders += size
    if chunk:
        chunks.append(chunk)
    return chunks


async def order_stats_groups(
    orders: AsyncCollection[MongoDocument], customer_ids: Iterable[str], sizes: Mapping[str, int] | None = None
) -> list[MongoDocument]:
    """The rows of `order_stats_pipeline` for these customers, one aggregation per `stats_chunks` group."""
    rows: list[MongoDocument] = []
    for chunk in stats_chunks(customer_ids, sizes or {}):
        cursor = await orders.aggregate(order_stats_pipeline(chunk))
        rows.extend([row async for row in cursor])
    return rows


def order_stats_pipeline(customer_ids: list[str]) -> list[MongoDocument]:
    """One `$group` row per customer, status, currency and deleted flag: order count, total, sum of versions."""
    return [
        {"$match": {"customer_id": {"$in": customer_ids}}},
        {
            "$group": {
                "_id": {
                    "customer_id": "$customer_id",
                    "status": "$status",
                    "currency": "$currency",
                    "deleted": "$deleted",
                },
                "orders": {"$sum": 1},
                "total_minor": {"$sum": "$total_minor"},
                "versions": {"$sum": "$version"},
            }
        },
    ]


@dataclass(frozen=True, slots=True)
class StatsWrite:
    """How `write_order_stats` wrote each customer's statistics: by increment on the statistics read before the batch
    (`incremented`), by increment again on the current ones after another write overtook it (`redone`), or from the
    orders (`recomputed`). A customer whose write was refused or given up is in none (but in `failed`)."""

    incremented: list[str]
    redone: list[str]
    recomputed: list[str]

    def counts(self) -> dict[str, int]:
        """Customers per way of writing (the projector's `cqrs_projector_customer_stats_writes_total{how}`)."""
        return {"increment": len(self.incremented), "redone": len(self.redone), "recompute": len(self.recomputed)}


@dataclass(frozen=True, slots=True)
class StoredStats:
    """A customer's statistics as stored, read before a batch's order writes."""

    stats: dict[str, Any]
    seq: int | None  # the compare-and-set counter; None: written without one, or never (a recompute starts it)
    stamp: int  # `order_stats_version`
    # Every write with a counter above this one was an increment (None: the latest write was not one).
    increments_since: int | None = None

    def only_increments_since(self, seq: int | None) -> bool:
        """Whether every write of these statistics after counter `seq` was an increment."""
        return seq is not None and self.increments_since is not None and self.increments_since <= seq


def _contribution(doc: Document | None) -> tuple[str, str | None, int] | None:
    """What one order counts for in its customer's statistics: (counter, currency of a placed total, total)."""
    if doc is None or doc.get("deleted"):
        return None
    counter = STATUS_COUNTERS.get(str(doc.get("status")))
    if counter is None:
        return None
    if counter == "placed_orders":
        return counter, str(doc.get("currency")), int(doc.get("total_minor") or 0)
    return counter, None, 0


def incremented_stats(stats: Mapping[str, Any], steps: Iterable[Step]) -> dict[str, Any] | None:
    """`stats` with each order's contribution moved from its document before to its document after (pure).

    None when the result is not certain to equal a recompute: a counter below zero, or a currency whose placed
    total ends at zero or below (a recompute lists a currency only while it has placed orders, and an order may
    total zero, so a zero total does not say whether any remain).
    """
    counts = {counter: int(stats.get(counter, 0)) for counter in STATUS_COUNTERS.values()}
    totals = {str(t["currency"]): int(t["total_minor"]) for t in stats.get("placed_totals", [])}
    touched: set[str] = set()
    for before, after in steps:
        for doc, sign in ((before, -1), (after, 1)):
            part = _contribution(doc)
            if part is None:
                continue
            counter, currency, total = part
            counts[counter] += sign
            if currency is not None:
                totals[currency] = totals.get(currency, 0) + sign * total
                touched.add(currency)
    if any(count < 0 for count in counts.values()) or any(totals[currency] <= 0 for currency in touched):
        return None
    result = empty_order_stats()
    result.update(counts)
    result["placed_totals"] = [
        {"currency": currency, "total_minor": total} for currency, total in sorted(totals.items())
    ]
    return result


def version_step(steps: Iterable[Step]) -> int:
    """How far the orders' versions moved in these steps (what an increment adds to `order_stats_version`)."""
    return sum(int(after.get("version", 0)) - int((before or {}).get("version", 0)) for before, after in steps)


class OrderStatsViews:
    """Reads and writes the customers' order statistics; every method raises `PyMongoError` if MongoDB fails."""

    def __init__(self, database: AsyncDatabase[MongoDocument]) -> None:
        self._orders = database[ORDERS_COLLECTION]
        self._customers = database[CUSTOMERS_COLLECTION]

    def writers(self) -> dict[str, ViewWriter]:
        """The writer of the statistics view, by view name (`projector.pipeline.view_writers`)."""

        async def order_stats(
            keys: Iterable[str], _carried: Mapping[str, int], failed: set[str], sources: ViewSources
        ) -> object:
            return await self.write_order_stats(keys, failed, sources.steps, sources.prior)

        return {CUSTOMER_ORDER_STATS.name: order_stats}

    async def read_order_stats(self, customer_ids: Iterable[str]) -> dict[str, StoredStats]:
        """The stored statistics of these customers (a round trip per `IDS_PER_QUERY` of them); a customer without
        a document is left out."""
        cursor = find_in(
            self._customers, customer_ids,
            {"order_stats": 1, STATS_SEQ_FIELD: 1, STATS_VERSION_FIELD: 1, STATS_INCREMENTS_FIELD: 1},
        )  # fmt: skip
        return {
            str(doc["_id"]): StoredStats(
                doc.get("order_stats") or empty_order_stats(),
                _seq(doc),
                int(doc.get(STATS_VERSION_FIELD) or 0),
                _increments_since(doc),
            )
            async for doc in cursor
        }

    async def write_order_stats(
        self,
        customer_ids: Iterable[str],
        failed: set[str] | None = None,
        steps: Mapping[str, Sequence[Step]] | None = None,
        prior: Mapping[str, StoredStats] | None = None,
    ) -> StatsWrite:
        """Stores the statistics of these customers: by increment where `steps` and `prior` allow it (see the
        module docstring), again by increment on the current statistics when another write overtook one and every
        write since `prior` was an increment, by recompute for the others.

        `prior`: the customers' statistics read before the batch's order writes. `failed`: where to record
        customers whose write was refused (instead of raising for them).
        """
        steps = steps or {}
        prior = prior or {}
        increments: dict[str, StatsCas] = {}
        recompute: list[str] = []
        for customer_id in sorted(set(customer_ids)):
            base, own = prior.get(customer_id), steps.get(customer_id)
            cas = _increment(base, own) if base is not None and own is not None else None
            if cas is None:
                recompute.append(customer_id)
            else:
                increments[customer_id] = cas
        known = {c: prior[c] for c in recompute if c in prior}
        overtaken = await self._compare_and_set(increments, failed)
        redone: set[str] = set()
        for _ in range(STATS_ATTEMPTS - 1):
            if not overtaken:
                break
            current = await self.read_order_stats(overtaken)
            again: dict[str, StatsCas] = {}
            for customer_id in overtaken:
                now = current.get(customer_id)
                cas = None
                if now is not None and now.only_increments_since(prior[customer_id].seq):
                    cas = _increment(now, steps[customer_id])
                if cas is None:
                    recompute.append(customer_id)
                else:
                    again[customer_id] = cas
            redone.update(again)
            overtaken = await self._compare_and_set(again, failed)
        recompute += overtaken
        await self.recompute_order_stats(recompute, failed, known)
        recomputed, unwritten = set(recompute), failed or set()
        return StatsWrite(
            sorted(set(increments) - redone - recomputed - unwritten),
            sorted(redone - recomputed - unwritten),
            sorted(recomputed - unwritten),
        )

    async def recompute_order_stats(
        self,
        customer_ids: Iterable[str],
        failed: set[str] | None = None,
        prior: Mapping[str, StoredStats] | None = None,
    ) -> dict[str, OrderStats]:
        """Recomputes and stores the order statistics of these customers: read the counter, aggregate, then
        compare-and-set; retried for the customers another write overtook, `STATS_ATTEMPTS` times in all.

        `prior`: statistics already read (before the batch's order writes, which only makes the compare stricter).
        `failed`: where to record customers whose write was refused or kept being overtaken (instead of raising).
        """
        todo = sorted(set(customer_ids))
        known: dict[str, int | None] = {c: stored.seq for c, stored in (prior or {}).items()}
        sizes = {c: counted_orders(stored.stats) for c, stored in (prior or {}).items()}
        computed: dict[str, OrderStats] = {}
        for _ in range(STATS_ATTEMPTS):
            if not todo:
                return computed
            unread = [c for c in todo if c not in known]
            if unread:
                stored = await self.read_order_stats(unread)
                known.update({c: stored[c].seq if c in stored else None for c in unread})
                sizes.update({c: counted_orders(stored[c].stats) for c in unread if c in stored})
            stats = order_stats_from_groups(todo, await order_stats_groups(self._orders, todo, sizes))
            computed.update(stats)
            sizes.update({c: counted_orders(stats[c].stats) for c in todo})
            todo = await self._compare_and_set(
                {c: StatsCas(known[c], stats[c].stats, stats[c].source_version) for c in todo}, failed
            )
            known = {}
        if not todo:  # the last attempt wrote them all
            return computed
        message = f"the order statistics of {', '.join(todo)} kept changing while being recomputed"
        if failed is None:
            raise PyMongoError(message)
        # Not a refusal by MongoDB: other replicas kept writing them. The streams are retried like refused ones.
        log.warning(
            "%s (%d attempts, other replicas writing them); their order streams are retried", message, STATS_ATTEMPTS
        )
        failed.update(todo)
        return computed

    async def _compare_and_set(self, entries: Mapping[str, StatsCas], failed: set[str] | None) -> list[str]:
        """Writes each customer's statistics where the counter still is the one read; returns the customers whose
        counter has moved since (the upsert then collides with the stored `_id`)."""
        order = sorted(entries)
        if not order:
            return []
        ops = [_stats_update(c, entries[c]) for c in order]
        try:
            await self._customers.bulk_write(ops, ordered=False)
        except BulkWriteError as exc:
            refused = [order[index] for index in refused_indexes(exc, failed, retry_duplicates=True)]
            overtaken = {order[index] for index in duplicate_indexes(exc)}
            if failed is not None:
                failed.update(c for c in refused if c not in overtaken)
            return sorted(overtaken)
        return []


def _seq(doc: Mapping[str, Any]) -> int | None:
    value = doc.get(STATS_SEQ_FIELD)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _increments_since(doc: Mapping[str, Any]) -> int | None:
    """Where the run of increments that ends with the latest write begins (None: the latest was no increment)."""
    run = doc.get(STATS_INCREMENTS_FIELD)
    if not isinstance(run, Mapping) or run.get("until") != _seq(doc) or _seq(doc) is None:
        return None
    since = run.get("since")
    return since if isinstance(since, int) and not isinstance(since, bool) else None


@dataclass(frozen=True, slots=True)
class StatsCas:
    """One compare-and-set of a customer's statistics."""

    seq: int | None  # the counter it expects (None: a document without one)
    stats: dict[str, Any]
    stamp: int  # `order_stats_version`
    increments_since: int | None = None  # an increment: where the run of increments it extends begins


def _increment(base: StoredStats, steps: Sequence[Step]) -> StatsCas | None:
    """The increment of `base` by these orders' changes; None when only a recompute is certain to be right."""
    stats = incremented_stats(base.stats, steps)
    if stats is None or base.seq is None:
        return None
    since = base.seq if base.increments_since is None else base.increments_since
    return StatsCas(base.seq, stats, base.stamp + version_step(steps), since)


def _stats_update(customer_id: str, cas: StatsCas) -> UpdateOne:
    """The compare-and-set of one customer's statistics; an upsert, so that orders may come before their customer.

    A document whose counter has moved makes the upsert collide with its `_id` (a duplicate key error). An
    increment extends the run of increments; a recompute leaves it behind (its `until` no longer the counter).
    """
    seq = cas.seq
    guard: MongoDocument = {STATS_SEQ_FIELD: seq} if seq is not None else {STATS_SEQ_FIELD: {"$exists": False}}
    fields: MongoDocument = {"order_stats": cas.stats, STATS_SEQ_FIELD: (seq or 0) + 1, STATS_VERSION_FIELD: cas.stamp}
    if cas.increments_since is not None:
        fields[STATS_INCREMENTS_FIELD] = {"since": cas.increments_since, "until": (seq or 0) + 1}
    return UpdateOne({"_id": customer_id, **guard}, {"$set": fields}, upsert=True)
