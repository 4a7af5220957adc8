"""`cqrs dead-letters list | show | retry | skip`: the streams the projector parked, and how to repair them.

A stream parks at the first event the projector cannot apply (see `projector.parking`); its later events wait
behind it. `retry` reads the stream's events after its document's version from PostgreSQL (read-only, the source
of truth), applies them through the projector's own pipeline and projections, and unparks the stream if they all
apply (else it stays parked with the new reason). `skip` records that the event the stream is parked at is
skipped (the document moves past it unchanged; `skipped_events` keeps the record), then retries the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import asyncpg
from prometheus_client import CollectorRegistry
from pymongo import AsyncMongoClient
from pymongo.asynchronous.database import AsyncDatabase

from command_service.event_store import recorded_event_from_row
from core.dependency_metrics import dependency_metrics
from core.envelope import RecordedEvent
from core.error_text import describe_error
from core.events import decode_event
from core.generations import active_database
from cqrsctl import stores
from projector.dead_letters import COLLECTION as DEAD_LETTERS
from projector.parking import Park
from projector.pipeline import Pipeline
from projector.registry import PROJECTIONS
from projector.repair import CannotSkip, Repairer, ResumeResult

Doc = dict[str, Any]

EVENTS_AFTER = """
SELECT position, event_id, stream_type, stream_id, version, event_type, schema_version,
       payload::text AS payload, metadata::text AS metadata, recorded_at
FROM events WHERE stream_id = $1 AND version > $2 ORDER BY version
"""


def add_dead_letters_parser(sub: Any) -> None:
    """Registers `cqrs dead-letters` on the CLI's subparsers."""
    parser = sub.add_parser("dead-letters", help="list, show, retry and skip the streams the projector parked")
    parser.add_argument(
        "--mongo-url",
        default=stores.mongo_url(),
        help="MongoDB URL of the read model (env CQRS_MONGO_URL, else the `make dev` stack's)",
    )
    parser.add_argument("--mongo-database", default=os.environ.get("CQRS_MONGO_DATABASE", "cqrs"))
    parser.add_argument(
        "--dsn",
        default=stores.postgres_dsn(),
        help="PostgreSQL DSN of the event store, read only (env CQRS_POSTGRES_DSN, else the `make dev` stack's)",
    )
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per network call (default 10)")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="parked streams, and messages that name no stream")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = actions.add_parser("show", help="one parked stream: why, where, what waits behind it")
    show.add_argument("stream_id")
    retry = actions.add_parser("retry", help="apply the stream's events from PostgreSQL again, then unpark it")
    retry.add_argument("stream_id", nargs="+")
    skip = actions.add_parser("skip", help="skip the event the stream is parked at, apply the later ones, unpark")
    skip.add_argument("stream_id")
    skip.add_argument("--version", type=int, required=True, help="the parked version (a safeguard)")
    skip.add_argument("--note", default="", help="why (kept with the skip record)")
    parser.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    if args.timeout <= 0:
        print("cqrs dead-letters: --timeout must be > 0", file=sys.stderr)
        return 2
    try:
        return asyncio.run(run_dead_letters(args))
    except stores.StoreUnreachable:
        raise  # `cqrs` says which store and where
    except Exception as exc:  # a store refused a query or went away meanwhile: say what, no stack trace
        print(f"cqrs dead-letters {args.action}: {type(exc).__name__}: {describe_error(exc)}", file=sys.stderr)
        return 2


async def connect_event_store(dsn: str, timeout: float) -> asyncpg.Connection:
    """A connection whose connect and every statement end within `timeout` seconds."""
    with stores.connecting(stores.POSTGRES, dsn):
        conn: asyncpg.Connection = await asyncpg.connect(dsn, timeout=timeout, command_timeout=timeout)
    return conn


async def run_dead_letters(args: argparse.Namespace) -> int:
    mongo: AsyncMongoClient[Doc] = stores.bounded_mongo_client(args.mongo_url, args.timeout, "cqrs-dead-letters")
    try:
        await stores.ping_mongo(mongo, args.mongo_url, args.timeout)
        tool = DeadLetters(await active_database(mongo[args.mongo_database]))
        if args.action == "list":
            return await tool.print_list(as_json=args.json)
        if args.action == "show":
            return await tool.print_show(args.stream_id)
        conn = await connect_event_store(args.dsn, args.timeout)
        try:
            if args.action == "retry":
                results = [await tool.retry(conn, stream_id) for stream_id in args.stream_id]
            else:
                results = [await tool.skip(conn, args.stream_id, args.version, args.note)]
        except (CannotSkip, LookupError) as exc:
            print(f"cqrs dead-letters {args.action}: {exc}", file=sys.stderr)
            return 2
        finally:
            await conn.close()
        for result in results:
            state = "resumed" if result.resumed else "still parked"
            print(f"{result.stream_id}: {state} at version {result.version} ({result.detail})")
        return 0 if all(r.resumed for r in results) else 1
    finally:
        await mongo.close()


class DeadLetters:
    """The operations behind the subcommands, on one read-model database."""

    def __init__(self, database: AsyncDatabase[Doc]) -> None:
        self._db = database
        projections = {p.stream_type: p for p in PROJECTIONS}
        self.pipeline = Pipeline(
            database,
            projections,
            dependency_metrics(CollectorRegistry()),
            stream_name="",
            park_after=1,
            max_backoff=1.0,
        )
        self.parks = self.pipeline.parks
        self.repairer = Repairer(self.pipeline, decode_event)

    async def rows(self) -> list[Doc]:
        """Every parked stream (with how many events wait behind it) and every message that names no stream."""
        rows: list[Doc] = []
        for park in await self.parks.parks():
            row = _park_row(park)
            row["held"] = await self.parks.count_held(park.stream_id)
            rows.append(row)
        async for letter in self._db[DEAD_LETTERS].find().sort("stream_seq", 1):
            rows.append(
                {
                    "stream_id": f"seq:{letter['stream_seq']}",
                    "kind": "dead_letter",
                    "reason": letter.get("reason", ""),
                    "subject": letter.get("subject", ""),
                    "parked_at": letter.get("received_at"),
                }
            )
        return rows

    async def print_list(self, *, as_json: bool) -> int:
        rows = await self.rows()
        if as_json:
            for row in rows:
                print(json.dumps(row, default=str))
            return 0
        if not rows:
            print("no parked streams")
            return 0
        print(f"{'STREAM':38} {'KIND':13} {'VERSION':>7} {'HELD':>5}  {'EVENT TYPE':24} REASON")
        for row in rows:
            version = "" if row.get("version") is None else str(row["version"])
            print(
                f"{row['stream_id']:38} {row['kind']:13} {version:>7} {row.get('held', ''):>5}  "
                f"{row.get('event_type', ''):24} {row['reason']}"
            )
        return 0

    async def print_show(self, stream_id: str) -> int:
        park = await self.parks.get(stream_id)
        if park is None:
            print(f"{stream_id} is not parked", file=sys.stderr)
            return 1
        row = _park_row(park)
        row["held"] = [
            {"version": h.version, "stream_seq": h.stream_seq, "subject": h.subject}
            for h in await self.parks.held(stream_id)
        ]
        row["skipped"] = [
            {"version": s["version"], "event_type": s["event_type"]} for s in await self.parks.skipped(stream_id)
        ]
        print(json.dumps(row, default=str, indent=2))
        return 0

    async def retry(self, conn: Any, stream_id: str) -> ResumeResult:
        """Re-reads the stream after its document's version from PostgreSQL and applies it; unparks if it all did."""
        park = await self._parked(stream_id)
        events = await self._events_after(conn, park, await self._doc_version(park))
        return await self.repairer.resume(park, events)

    async def skip(self, conn: Any, stream_id: str, version: int, note: str = "") -> ResumeResult:
        """Skips the parked event (which must be at `version`), then applies the later ones and unparks."""
        park = await self._parked(stream_id)
        if park.version != version:
            raise CannotSkip(f"{stream_id} is parked at version {park.version}, not {version}")
        events = await self._events_after(conn, park, version - 1)
        if not events or events[0].version != version:
            raise LookupError(f"{stream_id} has no version {version} in the event store")
        await self.repairer.skip(park, events[0], note)
        return await self.repairer.resume(park, events[1:])

    async def _parked(self, stream_id: str) -> Park:
        park = await self.parks.get(stream_id)
        if park is None:
            raise LookupError(f"{stream_id} is not parked")
        return park

    async def _doc_version(self, park: Park) -> int:
        writer = self.pipeline.writers.get(park.stream_type)
        if writer is None:
            return 0
        docs = await writer.load([park.stream_id])
        return int(docs[park.stream_id].get("version", 0)) if park.stream_id in docs else 0

    async def _events_after(self, conn: Any, park: Park, version: int) -> list[RecordedEvent]:
        rows: Sequence[Any] = await conn.fetch(EVENTS_AFTER, park.stream_id, version)
        return [recorded_event_from_row(row) for row in rows]


def _park_row(park: Park) -> Doc:
    row = asdict(park)
    row["parked_at"] = park.parked_at.isoformat()
    return row
