"""Switching the services to another generation of the read model with no failed or wrong query (guarantee 9).

The projectors and the query services follow the active-generation document (`core.generations`): each checks it
every `CQRS_GENERATION_POLL_SECONDS` and moves to the new database between two batches (projector) or two queries
(query service). The switch:

1. a *tailer* catches the target generation up from PostgreSQL (the rebuild's own reader and pipeline; passes
   until one finds nothing new: a rollback's first replays the whole store), then keeps it current (every
   `TAIL_PAUSE_SECONDS`) during the whole switch;
2. the active document is set to the target: readers and writers follow within one poll interval;
3. wait until every live projector reported (heartbeat) that it writes the target: from then on, no projector
   writes the old generation, and every event committed later reaches the target through JetStream;
4. one last pass of the tailer after every transaction that was open at that moment has ended: every event
   committed before it is in the target too. The target now has every event; the tailer stops;
5. the old generation is retired (kept for a rollback: `cqrs rebuild --activate <old>`), the target is `active`.

A switch that gives up after step 2 (a projector that does not move, a transaction that stays open, a tail that
fails) leaves the target active and fed by the projectors only, the old generation not yet retired. Activating
either again is how an operator ends it: the target (even marked `failed` by its tail) finishes the switch, the old
one goes back; either way every event committed meanwhile reaches it from PostgreSQL.

During the switch both the tailer and the projectors write the target; the version guard keeps them from
overwriting each other, and a projector that meets a gap (the tailer has not written a version yet) waits for
it as it does with another replica. Read-your-writes tokens hold across the switch: a waiting query reads the
checkpoints of the generation it is now using, and the tailer, reading PostgreSQL directly, is ahead of the
projectors' path through the outbox and JetStream.

Kubernetes: run the rebuild Job after the projectors' rollout finished. A projector of a release without
generations neither follows the active document nor sends heartbeats, so the switch cannot wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from core.error_text import describe_error
from core.generations import ActiveGeneration, live_writers
from cqrsctl.rebuild.build import Builder
from cqrsctl.rebuild.generations import ACTIVE, Generations
from cqrsctl.rebuild.progress import RebuildProgress
from cqrsctl.rebuild.reader import Cursor, EventReader

log = logging.getLogger(__name__)

# The tailer's pause between passes once caught up.
TAIL_PAUSE_SECONDS = 0.1
# Catching the target up before the switch: passes until one applies nothing, or fails to halve the one before
# (a load close to what the generation can take: the passes would go on shrinking slowly for minutes), at most
# this many. What is left is fed by the tailer during the switch.
MAX_PASSES_BEFORE_THE_SWITCH = 4
# How often the writers' heartbeats and the database's oldest transaction are checked while waiting.
WAIT_PAUSE_SECONDS = 0.2


class CutoverFailed(Exception):
    """The switch could not be completed (see the message); the target stays active and is fed no more."""


@dataclass(slots=True)
class CutoverResult:
    generation: int
    database: str
    previous_generation: int
    previous_database: str
    writers: int  # live projectors that moved to the target
    seconds: float  # from the switch of the active document to the end of the handover
    events_applied: int  # by the tailer during the switch


class _Tailer:
    """Keeps one generation current from PostgreSQL until stopped; `drain()` is the last pass."""

    def __init__(self, builder: Builder, cursor: Cursor, position: int, *, hold_back: bool) -> None:
        """`hold_back`: the passes wait for the live read model as the build does (before the switch begins)."""
        self._builder = builder
        self._hold_back = hold_back
        self.cursor, self.position = cursor, position
        self.applied = 0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="rebuild-tailer")

    async def _pass(self, before_xact: int | None = None, stop: asyncio.Event | None = None) -> None:
        self.cursor, self.position, applied, _ = await self._builder.run(
            self.cursor, self.position, RebuildProgress(False), concurrent_writers=True, before_xact=before_xact,
            stop=stop, hold_back=self._hold_back,
        )  # fmt: skip
        self.applied += applied

    async def _run(self) -> None:
        while not self._stop.is_set():
            await self._pass(stop=self._stop)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=TAIL_PAUSE_SECONDS)

    async def drain(self, before_xact: int | None = None) -> None:
        """Stops the loop, then makes one more pass (raises what the loop raised): up to the transactions with id
        `before_xact` (the later ones reach the generation through the projectors), or until caught up."""
        self._stop.set()
        if self._task is not None:
            await self._task
        await self._pass(before_xact)

    async def abandon(self) -> None:
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


async def cut_over(
    generations: Generations,
    builder: Builder,
    pool: asyncpg.Pool,
    target: dict[str, Any],
    *,
    writer_ttl_seconds: float,
    timeout_seconds: float,
) -> CutoverResult:
    """Makes `target` (a generation document whose database `builder` writes) the active generation, or finishes a
    switch to it that gave up (it is active, the generation it replaces not yet retired)."""
    number = int(target["_id"])
    current: ActiveGeneration = await generations.active()
    await generations.record_of(current)
    # What the switch retires: the generation active now, and any a switch that gave up left unretired.
    replaced = await generations.left_active(besides=number)
    if current.generation == number and not replaced:
        raise CutoverFailed(f"generation {number} is already active")
    previous = replaced[0] if current.generation == number else await generations.get(current.generation)
    assert previous is not None  # record_of made it
    cursor = Cursor.from_document(target.get("cursor"))
    tailer = _Tailer(builder, cursor, int(target.get("position") or 0), hold_back=True)
    await _caught_up(tailer)  # before anyone reads it
    tailer = _Tailer(builder, tailer.cursor, tailer.position, hold_back=False)
    tailer.start()
    try:
        active = await generations.switch_active(target)
        switched = time.monotonic()
        log.info("generation %d (%s) is active; waiting for the projectors to move", number, active.database)
        try:
            writers = await _wait_for_writers(generations, number, writer_ttl_seconds, timeout_seconds)
            log.info(
                "%d projector(s) write generation %d; waiting for the transactions open now to end", writers, number
            )
            horizon = await _wait_for_open_transactions(pool, timeout_seconds)
            log.info("feeding generation %d from PostgreSQL one last time (transactions before %d)", number, horizon)
            await tailer.drain(before_xact=horizon)
        except Exception as exc:
            raise CutoverFailed(_gave_up(exc, number, int(previous["_id"]))) from exc
    except BaseException:
        await tailer.abandon()
        raise
    for doc in {int(d["_id"]): d for d in [previous, *replaced]}.values():
        if int(doc["_id"]) != number:
            await generations.retire(int(doc["_id"]))
    await generations.set_state(number, ACTIVE, activated_at=datetime.now(UTC), cursor=tailer.cursor.to_document())
    log.info("generation %d is active and complete: %d projector(s) moved in %.1fs, the tail fed %d events meanwhile",
             number, writers, time.monotonic() - switched, tailer.applied)  # fmt: skip
    return CutoverResult(
        number, active.database, int(previous["_id"]), str(previous["database"]), writers,
        time.monotonic() - switched, tailer.applied,
    )  # fmt: skip


def _gave_up(exc: Exception, number: int, previous: int) -> str:
    """What a switch that gave up after the active document moved says: the state it left, and the way out."""
    return (
        f"{describe_error(exc)}; generation {number} is active but fed by the projectors only (generation {previous} "
        f"is not retired): once the cause is fixed (`cqrs dead-letters list` shows what a failed feed parked), run "
        f"`cqrs rebuild --activate {number}` to finish the switch, or `cqrs rebuild --activate {previous}` to go back"
    )


async def _caught_up(tailer: _Tailer) -> None:
    """Passes of the tailer until one finds nothing new. A pass reads up to the transactions open when it began, and a
    rollback's first one replays the whole store into the retired generation: what was committed meanwhile would be
    left to the switch, and the services would move to a generation that far behind (read-your-writes queries
    waiting for it, the others reading older states). Each pass takes what came during the one before, so passes
    shrink while the generation takes events faster than they are committed. One that did not take at most half of
    what the one before took ends it (under a load close to what the generation can take, the passes would shrink
    by a few percent each, the switch held for minutes), as does `MAX_PASSES_BEFORE_THE_SWITCH`; the tailer feeds
    the rest during the switch."""
    previous: int | None = None
    for number in range(1, MAX_PASSES_BEFORE_THE_SWITCH + 1):
        before, started = tailer.applied, time.monotonic()
        await tailer.drain()
        applied = tailer.applied - before
        log.info("catching up before the switch: pass %d applied %d events in %.1fs", number, applied,
                 time.monotonic() - started)  # fmt: skip
        if applied == 0 or (previous is not None and 2 * applied > previous):
            return
        previous = applied


async def _wait_for_writers(generations: Generations, number: int, ttl: float, timeout: float) -> int:
    """Waits until every projector seen within `ttl` reports writing generation `number`; returns how many.

    A projector reports right after it checked the active document, so a live one moves within its poll
    interval; one that reports nothing for `ttl` is presumed gone (it checks again before its next write)."""
    deadline = time.monotonic() + timeout
    while True:
        writers = await live_writers(generations.base, ttl)
        behind = [str(w["_id"]) for w in writers if int(w.get("generation") or 0) != number]
        if not behind:
            return len(writers)
        if time.monotonic() > deadline:
            raise CutoverFailed(f"projector(s) {', '.join(behind)} still write another generation after {timeout:.0f}s")
        await asyncio.sleep(WAIT_PAUSE_SECONDS)


async def _wait_for_open_transactions(pool: asyncpg.Pool, timeout: float) -> int:
    """Waits until every transaction open now has ended; returns the horizon: every transaction with a lower id
    has ended (and was assigned its id before now), so the tailer's last pass needs to read no further."""
    horizon = await EventReader(pool, timeout).horizon()
    deadline = time.monotonic() + timeout
    while not await pool.fetchval(
        "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8", str(horizon), timeout=timeout
    ):
        if time.monotonic() > deadline:
            raise CutoverFailed(f"a PostgreSQL transaction stayed open for {timeout:.0f}s; the switch cannot end")
        await asyncio.sleep(WAIT_PAUSE_SECONDS)
    return horizon
