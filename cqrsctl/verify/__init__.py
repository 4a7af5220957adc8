"""`cqrs verify`: proves the read model and the JetStream stream match PostgreSQL (guarantee 9).

Use in-process as `result = await run_verify(VerifyConfig(...))`, then `result.clean` / `result.findings`.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
from nats.aio.client import Client as NatsClient
from pymongo import AsyncMongoClient

from core.generations import active_database
from cqrsctl.stores import POSTGRES, bounded_mongo_client, connect_nats, connecting, ping_mongo
from cqrsctl.verify.audit import Audit
from cqrsctl.verify.model import (
    Document,
    ExpectedDoc,
    FieldDiff,
    Finding,
    FindingKind,
    Repair,
    VerifyConfig,
    VerifyResult,
)
from cqrsctl.verify.progress import Progress
from cqrsctl.verify.repair import repair_documents
from cqrsctl.verify.sources import EventStoreReader, ReadModelReader
from cqrsctl.verify.stream_scanner import JETSTREAM_API_ATTEMPT_SECONDS, StreamScanner

__all__ = [
    "ExpectedDoc",
    "FieldDiff",
    "Finding",
    "FindingKind",
    "Repair",
    "VerifyConfig",
    "VerifyResult",
    "run_verify",
]


@dataclass(slots=True)
class _Connections:
    pool: asyncpg.Pool
    nats: NatsClient
    mongo: AsyncMongoClient[Document]


@contextlib.asynccontextmanager
async def _connect(config: VerifyConfig) -> AsyncIterator[_Connections]:
    timeout = config.timeout_seconds
    with connecting(POSTGRES, config.postgres_dsn):
        pool = await asyncpg.create_pool(
            config.postgres_dsn, min_size=1, max_size=3, timeout=timeout, command_timeout=timeout
        )
    try:
        nc = await connect_nats(config.nats_url, timeout=timeout, name="cqrs-verify")
        try:
            mongo: AsyncMongoClient[Document] = bounded_mongo_client(config.mongo_url, timeout, "cqrs-verify")
            try:
                await ping_mongo(mongo, config.mongo_url, timeout)
                yield _Connections(pool, nc, mongo)
            finally:
                await mongo.close()
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
    finally:
        await pool.close()


async def run_verify(config: VerifyConfig, *, repair: bool = False, progress: bool = False) -> VerifyResult:
    """Audits the stream and the read model against PostgreSQL; with `repair`, rewrites the differing documents
    from PostgreSQL afterwards (the result keeps the findings and lists the repairs). `progress` draws a bar on
    stderr when it is a terminal. Raises on connection failures (OSError, asyncpg/nats/pymongo errors)."""
    async with _connect(config) as conns:
        database = await active_database(conns.mongo[config.mongo_database])  # after a cutover: the new generation
        # Each API request bounded on its own: the scanner asks again while JetStream is unavailable.
        js = conns.nats.jetstream(timeout=min(config.timeout_seconds, JETSTREAM_API_ATTEMPT_SECONDS))
        scanner = StreamScanner(
            js, config.stream_name, config.subject_prefix, config.batch_size, config.timeout_seconds
        )
        audit = Audit(
            config,
            EventStoreReader(conns.pool, config.timeout_seconds),
            scanner,
            ReadModelReader(database),
            Progress(progress),
        )
        try:
            result = await audit.run()
        finally:
            await scanner.close()
        if repair:
            result.repairs = await repair_documents(database, result.findings)
        return result
