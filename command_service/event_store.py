"""PostgreSQL event store: load a stream, append events + outbox rows + request log in one transaction."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import asyncpg
from prometheus_client import CollectorRegistry

from core.dependency_metrics import dependency_metrics
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


class Committer(Protocol):
    async def submit(self, append: AppendRequest) -> CommandReply: ...

    async def close(self) -> None: ...


class EventStore:
    """All SQL of the write side lives here; callers see domain events and replies."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        command_timeout: float = 5.0,
        committer: Committer | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """`committer` (e.g. group_commit.GroupCommitter) batches appends; without it each has its own transaction.
        Call latencies go to `registry` (a private one when None)."""
        self._pool = pool
        self._timeout = command_timeout
        self._group_commit = committer
        self._deps = dependency_metrics(registry)

    async def load_stream(self, stream_id: str) -> list[RecordedEvent]:
        async with self._deps.timed("postgres", "load_stream"):
            rows = await self._pool.fetch(
                """SELECT position, event_id, stream_type, stream_id, version, event_type, schema_version,
                          payload::text AS payload, metadata::text AS metadata, recorded_at
                     FROM events WHERE stream_id = $1 ORDER BY version""",
                stream_id,
                timeout=self._timeout,
            )
        return [recorded_event_from_row(row) for row in rows]

    async def find_request(self, request_id: str) -> LoggedRequest | None:
        async with self._deps.timed("postgres", "find_request"):
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
        ClaimTaken when another stream holds a claimed value. Returns only once the append is durable.
        """
        append = AppendRequest(
            stream_type, stream_id, expected_version, tuple(events), metadata, request, last_position, tuple(claims)
        )
        if self._group_commit is not None:
            return await self._group_commit.submit(append)
        async with (
            self._deps.timed("postgres", "append"),
            self._pool.acquire(timeout=self._timeout) as conn,
            conn.transaction(),
        ):
            reply = await append_in_transaction(conn, append, timeout=self._timeout)
            if append.events:
                await notify_relay(conn, timeout=self._timeout)
            return reply

    async def close(self) -> None:
        if self._group_commit is not None:
            await self._group_commit.close()


@dataclass(frozen=True, slots=True)
class AppendRequest:
    """One command's write: its events, the request-log row and the unique claims, to apply atomically."""

    stream_type: str
    stream_id: str
    expected_version: int
    events: tuple[Event, ...]
    metadata: EventMetadata
    request: RequestRecord
    last_position: int
    claims: tuple[UniqueClaim, ...] = ()


# One round trip writes the events, their outbox rows and the request log (whose reply holds the position the
# events got). A duplicate request_id inserts no log row: the caller then rolls back and raises DuplicateRequest.
_APPEND_SQL = """
WITH ev AS (
    INSERT INTO events (event_id, stream_type, stream_id, version, event_type, schema_version, payload, metadata)
    SELECT e.event_id, $2, $3, e.version, e.event_type, e.schema_version, e.payload::jsonb, $4::jsonb
      FROM unnest($1::uuid[], $5::int[], $6::text[], $7::int[], $8::text[])
           AS e(event_id, version, event_type, schema_version, payload)
    RETURNING position
), ob AS (
    INSERT INTO outbox (position, stream_id) SELECT position, $3 FROM ev
), rl AS (
    INSERT INTO request_log (request_id, command_type, request_hash, stream_id, reply)
    SELECT $9, $10, $11, $3, jsonb_build_object(
               'stream_type', $2::text, 'stream_id', $3::text, 'version', $12::int,
               'position', coalesce((SELECT max(position) FROM ev), $13::bigint))
    ON CONFLICT (request_id) DO NOTHING
    RETURNING (reply ->> 'position')::bigint AS position
)
SELECT (SELECT position FROM rl) AS position
"""


async def append_in_transaction(conn: Connection, append: AppendRequest, *, timeout: float) -> CommandReply:
    """Writes one append inside the caller's transaction (it does not NOTIFY: see `notify_relay`)."""
    events = append.events
    new_version = append.expected_version + len(events)
    try:
        position = await conn.fetchval(
            _APPEND_SQL,
            [uuid.uuid4() for _ in events],
            append.stream_type,
            append.stream_id,
            json.dumps(append.metadata.to_dict()),
            [append.expected_version + i + 1 for i in range(len(events))],
            [e.event_type for e in events],
            [e.schema_version for e in events],
            [json.dumps(e.to_payload(), ensure_ascii=False) for e in events],
            append.request.request_id,
            append.request.command_type,
            append.request.request_hash,
            new_version,
            append.last_position,
            timeout=timeout,
        )
    except asyncpg.UniqueViolationError as exc:
        if exc.constraint_name == "events_stream_version_key":
            raise VersionConflict(append.stream_id) from exc
        raise
    if position is None:
        raise DuplicateRequest(append.request.request_id)
    for claim in append.claims:
        await _apply_claim(conn, append.stream_id, claim, timeout)
    return CommandReply(append.stream_type, append.stream_id, new_version, int(position))


async def notify_relay(conn: Connection, *, timeout: float) -> None:
    """Wakes the relay when the transaction commits (NOTIFY is delivered on commit only)."""
    await conn.execute(f"NOTIFY {OUTBOX_CHANNEL}", timeout=timeout)


async def _apply_claim(conn: Connection, stream_id: str, claim: UniqueClaim, timeout: float) -> None:
    if claim.release:
        await conn.execute(
            "DELETE FROM unique_claims WHERE scope = $1 AND value = $2 AND owner_stream_id = $3",
            claim.scope,
            claim.value,
            stream_id,
            timeout=timeout,
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
        timeout=timeout,
    )
    if owner != stream_id:
        raise ClaimTaken(claim.scope, claim.value)


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
