"""WatchOrder's shared feed: one background task per server turns changes of `orders` into per-order queues.

Every WatchOrder stream subscribes to one order id and gets a bounded queue. The hub runs one feed task, only while
someone watches, that follows a MongoDB change stream on `orders` (`full_document="updateLookup"`) and puts each
changed document into the queues of that order's watchers. Where change streams are not supported (a standalone
`mongod`), it falls back to one shared poll of `find({_id: {$in: watched ids}}, {version: 1})` every
`poll_interval` seconds, reading the full documents of the orders whose version moved.

The dispatcher never blocks: a watcher whose queue is full gets only the latest document (its older, unread ones
are dropped; versions only grow, so the latest one contains every change). A watcher reads the current document
itself *after* `subscribe` returns, which is once the feed is open, so no change falls between the two; the
stream's handler drops documents at or below the version it already sent (duplicates and stale lookups).

With `updateLookup` the document is looked up when the change is read, not when it was made: changes faster than
the feed reads them may arrive as one (the latest) document. That is the same coalescing a slow watcher gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Final

from pymongo.asynchronous.collection import AsyncCollection
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import OperationFailure

from core.error_text import describe_error
from core.errors import DependencyUnavailable, Unavailable
from core.mongo_ids import find_in
from core.tracing import detached_task
from query_service.consistency import TooManyWaiters
from query_service.read_model import READ_MODEL, Document, is_mongo_unavailable

log = logging.getLogger(__name__)

_CHANGE_TYPES: Final = ["insert", "update", "replace", "delete"]
# How long one getMore of the change stream waits for changes; also how quickly the feed notices it has no
# watchers left (or is closing). Must stay below the client's operation timeout.
_MAX_AWAIT_MS: Final = 200


class Removed:
    """Marker queued when an order document disappeared altogether (the projector keeps tombstones instead)."""


REMOVED: Final = Removed()


@dataclass(eq=False)
class Subscription:
    """One watcher of one order: a bounded queue that coalesces when full, plus how it ended."""

    order_id: str
    capacity: int
    _queue: asyncio.Queue[Document | Removed] = field(init=False, repr=False)
    _ready: asyncio.Future[None] = field(init=False, repr=False)
    _ended: asyncio.Event = field(init=False, repr=False)
    _error: BaseException | None = field(default=None, init=False, repr=False)
    coalesced: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self._queue = asyncio.Queue(maxsize=self.capacity)
        self._ready = asyncio.get_running_loop().create_future()
        self._ended = asyncio.Event()

    def offer(self, item: Document | Removed) -> None:
        """Queues a change without ever blocking: when full, only the newest item is kept."""
        if self._ended.is_set():
            return
        if self._queue.full():
            self.coalesced += self._queue.qsize()
            while not self._queue.empty():
                self._queue.get_nowait()
        self._queue.put_nowait(item)

    def mark_ready(self) -> None:
        if not self._ready.done():
            self._ready.set_result(None)

    def end(self, error: BaseException) -> None:
        """Ends the subscription: the next `next()` raises `error` (queued items are dropped)."""
        if self._ended.is_set():
            return
        self._error = error
        self._ended.set()
        if not self._ready.done():
            self._ready.set_exception(error)
            self._ready.exception()  # retrieved: no "never retrieved" warning if nobody awaits it any more

    async def wait_ready(self) -> None:
        await self._ready

    async def next(self) -> Document | Removed:
        """The next change; raises the error the subscription was ended with."""
        if self._ended.is_set():
            assert self._error is not None
            raise self._error
        getter = asyncio.ensure_future(self._queue.get())
        ended = asyncio.ensure_future(self._ended.wait())
        try:
            await asyncio.wait({getter, ended}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended.cancel()
            if not getter.done():
                getter.cancel()
        if getter.done() and not getter.cancelled() and not self._ended.is_set():
            return getter.result()
        assert self._error is not None
        raise self._error


@dataclass(eq=False)
class _Feed:
    """One generation of the feed task.

    `accepting` turns False (synchronously) once it decides to end, so a new subscriber starts a new feed;
    `open` is True while it delivers every change (a subscriber is ready at once).
    """

    task: asyncio.Task[None] | None = None
    accepting: bool = True
    open: bool = False
    opened_before: bool = False


class OrderWatchHub:
    """All WatchOrder subscriptions of one server and the one feed that serves them."""

    def __init__(
        self,
        orders: AsyncCollection[dict[str, Any]],
        *,
        queue_size: int = 64,
        poll_interval: float = 0.1,
        max_watchers: int = 10_000,
        use_change_stream: bool = True,
    ) -> None:
        self._orders = orders
        self._queue_size = queue_size
        self._poll_interval = poll_interval
        self._max_watchers = max_watchers
        self._subs: dict[str, set[Subscription]] = {}
        self._count = 0
        self._feed: _Feed | None = None
        self._use_change_stream = use_change_stream  # False: poll from the start
        self._closing = asyncio.Event()
        self._switches = 0  # generation switches so far: a change stream on the old database is reopened
        self.mode = "idle"  # "change stream" or "poll" once a feed ran (tests, logs)

    @property
    def watchers(self) -> int:
        return self._count

    def use_database(self, database: AsyncDatabase[dict[str, Any]]) -> None:
        """Follows another generation: the feed reopens on it and offers every watched order's current document
        (watchers drop versions they already sent), so no stream ends or misses a change."""
        self._orders = database[self._orders.name]
        self._switches += 1

    async def subscribe(self, order_id: str) -> Subscription:
        """A subscription to `order_id`, returned once the feed delivers every later change.

        Raises TooManyWaiters when the server has too many watchers, Unavailable when it is shutting down, and the
        driver's error when the feed cannot be opened.
        """
        if self._closing.is_set():
            raise Unavailable("the query service is shutting down; watch again (another replica will answer)")
        if self._count >= self._max_watchers:
            raise TooManyWaiters(f"too many WatchOrder streams on this server ({self._max_watchers}); retry later")
        sub = Subscription(order_id, self._queue_size)
        self._subs.setdefault(order_id, set()).add(sub)
        self._count += 1
        feed = self._feed
        if feed is None or not feed.accepting:
            feed = self._feed = _Feed()
            feed.task = detached_task(self._run(feed), name="order-watch-feed")
        elif feed.open:
            sub.mark_ready()
        try:
            await sub.wait_ready()
        except BaseException:
            self.unsubscribe(sub)
            raise
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        """Forgets a subscription (idempotent); the feed ends by itself once nobody watches."""
        subs = self._subs.get(sub.order_id)
        if subs is None or sub not in subs:
            return
        subs.discard(sub)
        self._count -= 1
        if not subs:
            del self._subs[sub.order_id]

    async def close(self) -> None:
        """Ends every stream (UNAVAILABLE: clients watch again elsewhere) and stops the feed. Idempotent."""
        self._closing.set()
        error = Unavailable("the query service is shutting down; watch again (another replica will answer)")
        for subs in list(self._subs.values()):
            for sub in list(subs):
                sub.end(error)
        feed = self._feed
        if feed is not None and feed.task is not None:
            feed.task.cancel()
            await asyncio.wait({feed.task}, timeout=10.0)

    # ------------------------------------------------------------------------------------------ the feed

    def _wanted(self, feed: _Feed) -> bool:
        """Whether the feed should go on; when not, it stops accepting subscribers at once (no await here)."""
        if self._subs and not self._closing.is_set():
            return True
        feed.accepting = False
        if self._feed is feed:
            self._feed = None
        return False

    def _mark_all_ready(self, feed: _Feed) -> None:
        feed.open = True
        for subs in self._subs.values():
            for sub in subs:
                sub.mark_ready()

    async def _run(self, feed: _Feed) -> None:
        try:
            while self._wanted(feed):
                if self._use_change_stream:
                    try:
                        await self._follow_change_stream(feed)
                    except OperationFailure as exc:
                        if is_mongo_unavailable(exc):
                            raise
                        # e.g. "The $changeStream stage is only supported on replica sets" (code 40573)
                        log.warning(
                            "change streams on the read model are not available (%s); WatchOrder polls every %sms",
                            describe_error(exc),
                            round(self._poll_interval * 1000),
                        )
                        self._use_change_stream = False
                else:
                    await self._poll(feed)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # MongoDB unreachable (or worse): end the current streams, so their clients see UNAVAILABLE and watch
            # again, rather than hang silently. The next subscriber starts a new feed.
            ended: BaseException = exc
            if is_mongo_unavailable(exc):
                log.warning("WatchOrder feed: read model (MongoDB) is unavailable: %s", describe_error(exc))
                ended = DependencyUnavailable(READ_MODEL, describe_error(exc))  # the boundary's translation
            else:
                log.exception("WatchOrder feed failed unexpectedly")
            feed.accepting = False
            if self._feed is feed:
                self._feed = None
            for subs in list(self._subs.values()):
                for sub in list(subs):
                    sub.end(ended)
        finally:
            feed.accepting = False
            feed.open = False
            if self._feed is feed:
                self._feed = None

    async def _follow_change_stream(self, feed: _Feed) -> None:
        """Follows the change stream until nobody watches; returns early (to reopen) if the stream dies."""
        pipeline = [{"$match": {"operationType": {"$in": _CHANGE_TYPES}}}]
        switches = self._switches
        stream = await self._orders.watch(pipeline, full_document="updateLookup", max_await_time_ms=_MAX_AWAIT_MS)
        try:
            self.mode = "change stream"
            self._mark_all_ready(feed)
            if feed.opened_before:
                await self._resync()  # reopened: changes may have happened while no stream was open
            feed.opened_before = True
            while self._wanted(feed):
                if switches != self._switches:
                    return  # another generation is active: reopen there (and resync)
                change = await stream.try_next()
                if change is not None:
                    self._dispatch_change(change)
                elif not stream.alive:  # invalidated (collection dropped or renamed): reopen and resync
                    return
        finally:
            feed.open = False
            with contextlib.suppress(Exception):
                await stream.close()

    def _dispatch_change(self, change: dict[str, Any]) -> None:
        order_id = str((change.get("documentKey") or {}).get("_id"))
        subs = self._subs.get(order_id)
        if not subs:
            return
        doc = change.get("fullDocument")
        item: Document | Removed = doc if isinstance(doc, dict) else REMOVED
        if change.get("operationType") == "update" and item is REMOVED:
            return  # looked up after a later removal: the delete event follows
        for sub in list(subs):
            sub.offer(item)

    async def _resync(self) -> None:
        """Offers the current document of every watched order (watchers drop versions they already have)."""
        ids = list(self._subs)
        if not ids:
            return
        async for doc in find_in(self._orders, ids):
            for sub in list(self._subs.get(str(doc["_id"]), ())):
                sub.offer(doc)

    async def _poll(self, feed: _Feed) -> None:
        """The fallback: one `$in` query of versions per round, full documents only of the orders that moved."""
        self.mode = "poll"
        known: dict[str, int] = {}
        self._mark_all_ready(feed)
        while self._wanted(feed):
            ids = list(self._subs)
            rows = find_in(self._orders, ids, {"version": 1})
            versions = {str(row["_id"]): int(row.get("version") or 0) async for row in rows}
            moved = [i for i, v in versions.items() if v > known.get(i, -1)]
            if moved:
                async for doc in find_in(self._orders, moved):
                    known[str(doc["_id"])] = int(doc.get("version") or 0)
                    for sub in list(self._subs.get(str(doc["_id"]), ())):
                        sub.offer(doc)
            for order_id in [i for i in known if i not in versions]:
                del known[order_id]  # removed, or nobody watches it any more
                for sub in list(self._subs.get(order_id, ())):
                    sub.offer(REMOVED)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), timeout=self._poll_interval)
