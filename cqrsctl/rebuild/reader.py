"""Reading every event of PostgreSQL exactly once, in an order that never skips a late commit.

`position` comes from an identity column: a transaction takes its positions when it inserts and they become
visible when it commits, so a lower position can appear after a higher one was read (ARCHITECTURE guarantee 4).
"Everything above the last position read" would skip it. Migration 0004 records in `events.xact_id` the id of
the transaction that wrote the row. Every transaction whose id is below the snapshot's `xmin` has ended, so the
rows with `xact_id < pg_snapshot_xmin(pg_current_snapshot())` are final: no row can ever join them. The reader
walks that final set in (xact_id, position) order with a cursor on the same pair, so a row added later always
sorts after the cursor, and nothing is skipped.

Why not position order with the same filter: a transaction with a *lower* id can insert a *higher* position
(a group commit's second append) and commit while a transaction with a higher id still holds a lower position;
the filter would let the higher position through and the cursor would pass the lower one.

Per-stream order is kept: the transaction writing version v+1 of a stream decided it after reading version v
committed, so it got its id (at its first write, after that read) later than v's writer, and sorts after it.
Events written before migration 0004 carry id 0 and come first, in position order.

A transaction that stays open (on any table) holds `xmin` back: the reader waits for it, never passes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from command_service.event_store import recorded_event_from_row
from core.envelope import RecordedEvent

_BATCH_SQL = """
SELECT xact_id::text AS xact_id_text, position, event_id, stream_type, stream_id, version, event_type, schema_version,
       payload::text AS payload, metadata::text AS metadata, recorded_at
  FROM events
 WHERE (xact_id, position) > ($1::text::xid8, $2::bigint)
   AND xact_id < pg_snapshot_xmin(pg_current_snapshot())
   AND ($4::text IS NULL OR xact_id < $4::text::xid8)
 ORDER BY events.xact_id, events.position  -- the columns (by xid8), not the output's text
 LIMIT $3
"""


@dataclass(frozen=True, slots=True, order=True)
class Cursor:
    """Where the reader is: the last (transaction id, position) read; `Cursor()` is before every event."""

    xact_id: int = 0
    position: int = 0

    def to_document(self) -> dict[str, int]:
        # xid8 is an unsigned 64-bit number; real ones (epoch << 32 | xid) stay far below 2**63, BSON's int64.
        return {"xact_id": self.xact_id, "position": self.position}

    @classmethod
    def from_document(cls, doc: object) -> Cursor:
        if not isinstance(doc, dict):
            return cls()
        return cls(int(doc.get("xact_id", 0)), int(doc.get("position", 0)))


@dataclass(frozen=True, slots=True)
class EventBatch:
    events: list[RecordedEvent]
    cursor: Cursor  # the cursor after this batch (unchanged when it is empty)


class EventReader:
    """Batches of final events after a cursor (see the module docstring)."""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self._pool = pool
        self._timeout = timeout

    async def next_batch(self, after: Cursor, limit: int, *, before_xact: int | None = None) -> EventBatch:
        """Up to `limit` final events after `after`, in cursor order (empty: caught up for now); with
        `before_xact`, only events of transactions with a lower id."""
        rows = await self._pool.fetch(
            _BATCH_SQL, str(after.xact_id), after.position, limit,
            None if before_xact is None else str(before_xact), timeout=self._timeout,
        )  # fmt: skip
        if not rows:
            return EventBatch([], after)
        last = rows[-1]
        return EventBatch(
            [recorded_event_from_row(row) for row in rows], Cursor(int(last["xact_id_text"]), int(last["position"]))
        )

    async def horizon(self) -> int:
        """The id the next transaction to start will get: events of transactions from it on are not "so far"."""
        return int(
            await self._pool.fetchval("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", timeout=self._timeout)
        )

    async def head_position(self) -> int:
        """The highest committed position (for progress estimates and "changed during the rebuild")."""
        return int(await self._pool.fetchval("SELECT coalesce(max(position), 0) FROM events", timeout=self._timeout))

    async def remaining_estimate(self, applied_up_to: int) -> int:
        """About how many events are left when every position up to `applied_up_to` was read (positions are dense
        but for rolled-back inserts)."""
        return max(0, await self.head_position() - applied_up_to)
