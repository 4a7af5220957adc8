"""PostgreSQL event store: load a stream, append events + outbox rows + request log in one transaction."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeAlias

import asyncpg

from core.envelope import EventMetadata, RecordedEvent
from core.events import Event

OUTBOX_CHANNEL = "cqrs_outbox"

if TYPE_CHECKING:
    Connection: TypeAlias = asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]


@dataclass(frozen=True, slots=True)
class CommandReply:
    """What a successful command returns; stored in the request log so a repeat returns exactly this."""

    stream_type: str
    stream_id: str
    version: int
    position: int

    def to_json(self) -> str:
        return json.dumps(
            {
                "stream_type": self.stream_type,
                "stream_id": self.stream_id,
                "version": self.version,
                "position": self.position,
            }
        )

    @classmethod
    def from_json(cls, raw: str) -> CommandReply:
        data = json.loads(raw)
        return cls(
            stream_type=data["stream_type"],
            stream_id=data["stream_id"],
            version=int(data["version"]),
            position=int(data["position"]),
        )


@dataclass(frozen=True, slots=True)
class LoggedRequest:
    command_type: str
    request_hash: str
    reply: CommandReply


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """The request-log row written with the events: request_id plus a fingerprint of the command."""

    request_id: str
    command_type: str
    request_hash: str


@dataclass(frozen=True, slots=True)
class UniqueClaim:
    """Claim `value` in `scope` for the appending stream (`release=False`), or give up its claim (`release=True`)."""

    scope: str
    value: str
    release: bool = False


class ClaimTaken(Exception):
    """Another stream holds the unique value."""

    def __init__(self, scope: str, value: str) -> None:
        super().__init__(f"{scope} {value!r} is taken")
        self.scope = scope
        self.value = value


class VersionConflict(Exception):
    """Another transaction appended the same stream version first."""


class DuplicateRequest(Exception):
    """A concurrent transaction with the same request_id committed first."""


class EventStore:
    """All SQL of the write side lives here; callers see domain events and replies."""

    def __init__(self, pool: asyncpg.Pool, command_timeout: float = 5.0) -> None:
        self._pool = pool
        self._timeout = command_timeout

    async def load_stream(self, stream_id: str) -> list[RecordedEvent]:
        rows = await self._pool.fetch(
            """SELECT position, event_id, stream_type, stream_id, version, event_type, schema_version,
                      payload::text AS payload, metadata::text AS metadata, recorded_at
                 FROM events WHERE stream_id = $1 ORDER BY version""",
            stream_id,
            timeout=self._timeout,
        )
        return [recorded_event_from_row(row) for row in rows]

    async def find_request(self, request_id: str) -> LoggedRequest | None:
        row = await self._pool.fetchrow(
            "SELECT command_type, request_hash, reply::text AS reply FROM request_log WHERE request_id = $1",
            request_id,
            timeout=self._timeout,
        )
        if row is None:
            return None
        return LoggedRequest(row["command_type"], row["request_hash"], CommandReply.from_json(row["reply"]))

    async def append(
        self,
        *,
        stream_type: str,
        stream_id: str,
        expected_version: int,
        events: Sequence[Event],
        metadata: EventMetadata,
        request: RequestRecord,
        last_position: int,
        claims: Sequence[UniqueClaim] = (),
    ) -> CommandReply:
        """Appends `events` as versions expected_version+1.., applies the unique claims and logs the request,
        atomically.

        With no events (a no-op command) only the request is logged, so a repeat still returns the same reply.
        Raises VersionConflict when the stream moved on, DuplicateRequest when the request_id was taken,
        ClaimTaken when another stream holds a claimed value.
        """
        async with self._pool.acquire(timeout=self._timeout) as conn, conn.transaction():
            reply = CommandReply(stream_type, stream_id, expected_version, last_position)
            if events:
                reply = await insert_events(
                    conn, stream_type, stream_id, expected_version, events, metadata, timeout=self._timeout
                )
            for claim in claims:
                await self._apply_claim(conn, stream_id, claim)
            logged = await conn.fetchval(
                """INSERT INTO request_log (request_id, command_type, request_hash, stream_id, reply)
                   VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (request_id) DO NOTHING RETURNING 1""",
                request.request_id,
                request.command_type,
                request.request_hash,
                stream_id,
                reply.to_json(),
                timeout=self._timeout,
            )
            if logged is None:
                raise DuplicateRequest(request.request_id)
            return reply

    async def _apply_claim(self, conn: Connection, stream_id: str, claim: UniqueClaim) -> None:
        if claim.release:
            await conn.execute(
                "DELETE FROM unique_claims WHERE scope = $1 AND value = $2 AND owner_stream_id = $3",
                claim.scope,
                claim.value,
                stream_id,
                timeout=self._timeout,
            )
            return
        # A concurrent claim of the same value blocks here until the other transaction ends, then conflicts.
        owner = await conn.fetchval(
            """INSERT INTO unique_claims (scope, value, owner_stream_id) VALUES ($1, $2, $3)
               ON CONFLICT (scope, value) DO UPDATE SET owner_stream_id = unique_claims.owner_stream_id
               RETURNING owner_stream_id""",
            claim.scope,
            claim.value,
            stream_id,
            timeout=self._timeout,
        )
        if owner != stream_id:
            raise ClaimTaken(claim.scope, claim.value)


async def insert_events(
    conn: Connection,
    stream_type: str,
    stream_id: str,
    expected_version: int,
    events: Sequence[Event],
    metadata: EventMetadata,
    *,
    timeout: float,
) -> CommandReply:
    """Inserts events and their outbox rows on `conn` inside the caller's transaction, then NOTIFYs the relay."""
    count = len(events)
    try:
        rows = await conn.fetch(
            """INSERT INTO events (event_id, stream_type, stream_id, version, event_type, schema_version,
                                   payload, metadata)
               SELECT e.event_id, $2, $3, e.version, e.event_type, e.schema_version, e.payload::jsonb, $4::jsonb
                 FROM unnest($1::uuid[], $5::int[], $6::text[], $7::int[], $8::text[])
                      AS e(event_id, version, event_type, schema_version, payload)
               RETURNING position, version""",
            [uuid.uuid4() for _ in range(count)],
            stream_type,
            stream_id,
            json.dumps(metadata.to_dict()),
            [expected_version + i + 1 for i in range(count)],
            [e.event_type for e in events],
            [e.schema_version for e in events],
            [json.dumps(e.to_payload(), ensure_ascii=False) for e in events],
            timeout=timeout,
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "events_stream_version_key":
            raise VersionConflict(stream_id) from exc
        raise
    positions = sorted(r["position"] for r in rows)
    await conn.execute(
        "INSERT INTO outbox (position, stream_id) SELECT p, $2 FROM unnest($1::bigint[]) AS p",
        positions,
        stream_id,
        timeout=timeout,
    )
    # Delivered on commit only: wakes the relay without polling.
    await conn.execute(f"NOTIFY {OUTBOX_CHANNEL}", timeout=timeout)
    return CommandReply(stream_type, stream_id, expected_version + count, positions[-1])


def recorded_event_from_row(row: Any) -> RecordedEvent:
    """Builds a RecordedEvent from a row with the `events` columns (payload and metadata as text)."""
    return RecordedEvent(
        event_id=row["event_id"],
        stream_type=row["stream_type"],
        stream_id=row["stream_id"],
        version=row["version"],
        event_type=row["event_type"],
        schema_version=row["schema_version"],
        payload=json.loads(row["payload"]),
        metadata=EventMetadata.from_dict(json.loads(row["metadata"])),
        position=row["position"],
        recorded_at=row["recorded_at"],
    )
