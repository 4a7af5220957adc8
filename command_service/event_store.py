"""PostgreSQL event store: load a stream, append events + outbox rows + request log in one transaction."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias

import asyncpg
from prometheus_client import CollectorRegistry

from command_service.outages import event_store_outage
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


@dataclass(frozen=True, slots=True)
class StreamGuard:
    """The append happens only if another stream (e.g. the order's customer) is still at `version`.

    A decision that depended on another aggregate (CreateOrder needs an active customer) is then checked inside the
    append's own statement: a customer deactivated after the check was made makes the append write nothing.
    """

    stream_id: str
    version: int


class GuardMoved(Exception):
    """A guarded stream changed since the decision was made; decide again."""

    def __init__(self, guard: StreamGuard) -> None:
        super().__init__(f"stream {guard.stream_id} moved past version {guard.version}")
        self.guard = guard


class DuplicateRequest(Exception):
    """A concurrent transaction with the same request_id committed first."""


class TransactionAborted(Exception):
    """PostgreSQL aborted the append's transaction (a deadlock with another append, e.g. two customers swapping
    their emails, or a serialization failure): nothing was written, and the same command may simply run again."""


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
        with event_store_outage():
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
        with event_store_outage():
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
        guards: Sequence[StreamGuard] = (),
    ) -> CommandReply:
        """Appends `events` as versions expected_version+1.., applies the unique claims and logs the request,
        atomically, provided every guarded stream is still at its version (else GuardMoved, nothing written).

        With no events (a no-op command) only the request is logged, so a repeat still returns the same reply.
        Raises VersionConflict when the stream moved on, DuplicateRequest when the request_id was taken,
        ClaimTaken when another stream holds a claimed value. Returns only once the append is durable.
        """
        append = AppendRequest(
            stream_type,
            stream_id,
            expected_version,
            tuple(events),
            metadata,
            request,
            last_position,
            tuple(claims),
            tuple(guards),
        )
        with event_store_outage():
            try:
                if self._group_commit is not None:
                    return await self._group_commit.submit(append)
                async with self._deps.timed("postgres", "append"), self._pool.acquire(timeout=self._timeout) as conn:
                    (outcome,) = await commit_appends(conn, [append], timeout=self._timeout)
            except asyncpg.TransactionRollbackError as exc:  # class 40: rolled back whole
                raise TransactionAborted(repr(exc)) from exc
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

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
    guards: tuple[StreamGuard, ...] = ()


# One statement writes the events, their outbox rows and the request-log rows of any number of appends, and wakes
# the relay (the NOTIFY is delivered on commit). Outside an explicit transaction it is one round trip and one
# durable commit for the whole batch. The request log's reply holds the last position the append's events got
# (or, for a no-op command, the position the command saw). Any conflict (a version or a request_id taken) fails
# the whole statement, so nothing of the batch is written. An append whose guarded stream moved on (`moved`)
# writes nothing and returns no row; the others go ahead.
_APPEND_BATCH_SQL = f"""
WITH moved AS (
    SELECT DISTINCT g.append_no
      FROM unnest($17::int[], $18::text[], $19::int[]) AS g(append_no, stream_id, version)
     WHERE coalesce((SELECT max(e.version) FROM events e WHERE e.stream_id = g.stream_id), 0) <> g.version
), input AS (
    SELECT * FROM unnest($1::int[], $2::text[], $3::text[], $4::int[], $5::text[], $6::int[], $7::text[], $8::text[])
        WITH ORDINALITY AS e(append_no, stream_type, stream_id, version, event_type, schema_version, payload,
                             metadata, n)
     WHERE e.append_no NOT IN (SELECT append_no FROM moved)
), ev AS (
    INSERT INTO events (event_id, stream_type, stream_id, version, event_type, schema_version, payload, metadata)
    SELECT gen_random_uuid(), stream_type, stream_id, version, event_type, schema_version, payload::jsonb,
           metadata::jsonb
      FROM input ORDER BY n  -- positions follow versions within a stream
    RETURNING position, stream_id, version
), ob AS (
    INSERT INTO outbox (position, stream_id) SELECT position, stream_id FROM ev
), last_positions AS (
    SELECT input.append_no, max(ev.position) AS position
      FROM ev JOIN input USING (stream_id, version) GROUP BY input.append_no
), placed AS (
    SELECT r.*, coalesce(lp.position, r.last_position) AS position
      FROM unnest($9::int[], $10::text[], $11::text[], $12::text[], $13::text[], $14::text[], $15::int[],
                  $16::bigint[])
           AS r(append_no, request_id, command_type, request_hash, stream_type, stream_id, version, last_position)
      LEFT JOIN last_positions lp USING (append_no)
     WHERE r.append_no NOT IN (SELECT append_no FROM moved)
), rl AS (
    INSERT INTO request_log (request_id, command_type, request_hash, stream_id, reply)
    SELECT request_id, command_type, request_hash, stream_id,
           jsonb_build_object('stream_type', stream_type, 'stream_id', stream_id, 'version', version,
                              'position', position)
      FROM placed
), wake AS (
    SELECT pg_notify('{OUTBOX_CHANNEL}', '') FROM (SELECT 1 FROM ev LIMIT 1) AS any_event
)
SELECT placed.append_no, placed.position FROM placed LEFT JOIN wake ON true ORDER BY placed.append_no
"""

_STREAM_VERSION_KEY = "events_stream_version_key"
_REQUEST_ID_KEY = "request_log_pkey"


async def append_batch(
    conn: Connection, appends: Sequence[AppendRequest], *, timeout: float
) -> list[CommandReply | GuardMoved]:
    """Writes the appends (not their unique claims) in one statement: all of them or, on any conflict, none;
    an append whose guard failed gets GuardMoved and writes nothing.

    Run outside a transaction, the statement commits by itself. Raises asyncpg.UniqueViolationError when a
    version or request_id is taken; `conflict_error` says which for a single append.
    """
    event_cols: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
    request_cols: tuple[list[Any], ...] = ([], [], [], [], [], [], [], [])
    guard_cols: tuple[list[Any], ...] = ([], [], [])
    for append_no, append in enumerate(appends):
        for guard in append.guards:
            for col, value in zip(guard_cols, (append_no, guard.stream_id, guard.version), strict=True):
                col.append(value)
        metadata = json.dumps(append.metadata.to_dict())
        for offset, event in enumerate(append.events, start=1):
            row = (
                append_no, append.stream_type, append.stream_id, append.expected_version + offset,
                event.event_type, event.schema_version, json.dumps(event.to_payload(), ensure_ascii=False), metadata,
            )  # fmt: skip
            for col, value in zip(event_cols, row, strict=True):
                col.append(value)
        request = append.request
        request_row = (
            append_no, request.request_id, request.command_type, request.request_hash, append.stream_type,
            append.stream_id, append.expected_version + len(append.events), append.last_position,
        )  # fmt: skip
        for col, value in zip(request_cols, request_row, strict=True):
            col.append(value)
    rows = await conn.fetch(_APPEND_BATCH_SQL, *event_cols, *request_cols, *guard_cols, timeout=timeout)
    positions = {int(row["append_no"]): int(row["position"]) for row in rows}
    outcomes: list[CommandReply | GuardMoved] = []
    for append_no, a in enumerate(appends):
        position = positions.get(append_no)
        if position is None:
            outcomes.append(GuardMoved(_moved_guard(a)))
        else:
            outcomes.append(CommandReply(a.stream_type, a.stream_id, a.expected_version + len(a.events), position))
    return outcomes


def _moved_guard(append: AppendRequest) -> StreamGuard:
    """The guard to blame when an append wrote nothing (only guarded appends can)."""
    if not append.guards:
        raise RuntimeError(f"append to {append.stream_id} returned no row but has no guard")
    return append.guards[0]


def conflict_error(exc: asyncpg.UniqueViolationError, append: AppendRequest) -> Exception:
    """The domain error for a unique violation raised by `append`'s own statement (or `exc` itself)."""
    if exc.constraint_name == _STREAM_VERSION_KEY:
        return VersionConflict(append.stream_id)
    if exc.constraint_name == _REQUEST_ID_KEY:
        return DuplicateRequest(append.request.request_id)
    return exc


async def commit_appends(
    conn: Connection, appends: Sequence[AppendRequest], *, timeout: float
) -> list[CommandReply | Exception]:
    """Commits the appends on `conn` (not inside a transaction); each gets its reply or its own conflict error.

    Fast path: one statement for all of them (one round trip, one commit). Appends with unique claims, or a batch
    in which some append conflicts, take one transaction with a SAVEPOINT per append instead, so a conflict undoes
    only its own append and the others still commit together.
    """
    if not any(append.claims for append in appends):
        try:
            return list(await append_batch(conn, appends, timeout=timeout))
        except asyncpg.UniqueViolationError as exc:
            if len(appends) == 1:
                error = conflict_error(exc, appends[0])
                if error is exc:
                    raise
                return [error]
    outcomes: list[CommandReply | Exception] = []
    async with conn.transaction():
        for append in appends:
            try:
                async with conn.transaction():
                    outcomes.append(await append_in_transaction(conn, append, timeout=timeout))
            except (VersionConflict, DuplicateRequest, ClaimTaken, GuardMoved) as exc:
                outcomes.append(exc)
    return outcomes


async def append_in_transaction(conn: Connection, append: AppendRequest, *, timeout: float) -> CommandReply:
    """Writes one append and its unique claims inside the caller's transaction (the relay is woken on commit)."""
    try:
        (reply,) = await append_batch(conn, [append], timeout=timeout)
    except asyncpg.UniqueViolationError as exc:
        raise conflict_error(exc, append) from exc
    if isinstance(reply, GuardMoved):
        raise reply
    for claim in append.claims:
        await _apply_claim(conn, append.stream_id, claim, timeout)
    return reply


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


async def keep_session(conn: Connection) -> None:
    """The pool's `reset`: releases a connection without asyncpg's reset query (a round trip per release). The
    event store's pooled connections change no session state (no SET, LISTEN or advisory lock; the relay has its
    own connection); asyncpg still rolls back a transaction left open before calling this."""


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
