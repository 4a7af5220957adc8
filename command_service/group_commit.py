"""Group commit: concurrent appends share one PostgreSQL transaction, so one durable commit (one WAL flush)
serves many commands without weakening durability (`synchronous_commit` stays on).

A batch is written by one statement (`event_store.commit_appends`); when one of its appends conflicts (version
taken, request_id repeated, unique value claimed) the batch is redone with a SAVEPOINT per append, so only that
append fails and is reported to its caller; the others commit together. Nobody hears "done" before the commit.
When nothing else is waiting, a batch is a single append: no added latency at low load; batches grow by
themselves as load rises (while one batch commits, the next one fills).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import asyncpg
from prometheus_client import CollectorRegistry

from command_service.event_store import (
    AppendRequest,
    CommandReply,
    commit_appends,
)
from core.dependency_metrics import dependency_metrics
from core.errors import Unavailable
from core.tracing import detached_task

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    append: AppendRequest
    future: asyncio.Future[CommandReply]
    outcome: CommandReply | BaseException | None = field(default=None)


class GroupCommitter:
    """`submit` an append; `flushers` tasks each commit up to `max_batch` waiting appends per transaction."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        *,
        timeout: float,
        max_batch: int = 64,
        flushers: int = 4,
        max_waiting: int = 10_000,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self._pool = pool
        self._deps = dependency_metrics(registry)
        self._timeout = timeout
        self._max_batch = max_batch
        self._flusher_count = flushers
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue(maxsize=max_waiting)
        self._flushers: list[asyncio.Task[None]] = []
        self.batches = 0
        self.appends = 0

    async def submit(self, append: AppendRequest) -> CommandReply:
        if not self._flushers:
            self._flushers = [
                detached_task(self._flush_forever(), name=f"group-commit-{i}") for i in range(self._flusher_count)
            ]
        pending = _Pending(append, asyncio.get_running_loop().create_future())
        try:
            self._queue.put_nowait(pending)
        except asyncio.QueueFull:  # a bounded backlog: the caller is told to come back (UNAVAILABLE)
            raise Unavailable(
                f"the event store has {self._queue.maxsize} appends waiting to be committed; retry later"
            ) from None
        return await pending.future

    async def close(self) -> None:
        for task in self._flushers:
            task.cancel()
        for task in self._flushers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._flushers = []

    async def _flush_forever(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                await self._commit(batch)
            except (asyncpg.DeadlockDetectedError, asyncpg.SerializationError) as exc:
                # Two batches locked the same rows in opposite orders: retry each append on its own.
                log.info("group commit of %d appends hit %r; committing them one by one", len(batch), exc)
                for one in batch:
                    try:
                        await self._commit([one])
                    except Exception as single_exc:
                        one.outcome = single_exc
            except BaseException as exc:
                for pending in batch:
                    pending.outcome = exc
                if isinstance(exc, asyncio.CancelledError):
                    self._resolve(batch)
                    raise
            self._resolve(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        """Commits the batch; outcomes are recorded here and only announced (`_resolve`) after the commit."""
        async with self._deps.timed("postgres", "append_batch"), self._pool.acquire(timeout=self._timeout) as conn:
            outcomes = await commit_appends(conn, [pending.append for pending in batch], timeout=self._timeout)
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.outcome = outcome
        self.batches += 1
        self.appends += len(batch)

    @staticmethod
    def _resolve(batch: list[_Pending]) -> None:
        for pending in batch:
            if pending.future.done():
                continue
            outcome = pending.outcome
            if isinstance(outcome, CommandReply):
                pending.future.set_result(outcome)
            elif isinstance(outcome, BaseException) and not isinstance(outcome, asyncio.CancelledError):
                pending.future.set_exception(outcome)
            else:
                pending.future.cancel()
