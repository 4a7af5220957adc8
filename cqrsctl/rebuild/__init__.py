"""`cqrs rebuild`: builds a new generation of the read model beside the live one, from PostgreSQL (guarantee 9).

1. open a generation (`cqrsctl.rebuild.generations`): resume the latest unfinished one, or start `<base>_g<N>`;
2. build: every event of PostgreSQL, read in an order that never skips a late commit (`cqrsctl.rebuild.reader`),
   applied in batches through the projector's own `Pipeline` and registry (`cqrsctl.rebuild.build`), progress
   recorded after each batch;
3. caught up: the reader found no more final events;
4. shadow compare with the active generation (`cqrsctl.rebuild.shadow`); differences that may be in flight (one
   side behind the other) are re-checked after catching up again, for up to `settle_seconds`.

Use in-process as `result = await run_rebuild(RebuildConfig(...))`. The cutover to a new generation is not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
from pymongo import AsyncMongoClient

from core.projections import Projection
from cqrsctl.rebuild.build import BatchHook, Builder, RebuildFailed
from cqrsctl.rebuild.generations import (
    CAUGHT_UP,
    COMPARED,
    GenerationError,
    Generations,
    status_rows,
)
from cqrsctl.rebuild.model import BOOKKEEPING_FIELDS, RebuildConfig, RebuildResult
from cqrsctl.rebuild.progress import RebuildProgress
from cqrsctl.rebuild.reader import Cursor, EventReader
from cqrsctl.rebuild.shadow import ComparisonResult, Difference, IgnoredFields, ShadowComparer
from projector.registry import PROJECTIONS

__all__ = [
    "Difference",
    "GenerationError",
    "RebuildConfig",
    "RebuildFailed",
    "RebuildResult",
    "rebuild_status",
    "run_rebuild",
]

Doc = dict[str, Any]

# Pause before re-checking differences (lets the live projector finish the batch it is writing).
SETTLE_PAUSE_SECONDS = 0.5


@dataclass(slots=True)
class _Connections:
    pool: asyncpg.Pool
    mongo: AsyncMongoClient[Doc]


@contextlib.asynccontextmanager
async def _connect(config: RebuildConfig) -> AsyncIterator[_Connections]:
    timeout = config.timeout_seconds
    ms = int(timeout * 1000)
    pool = await asyncpg.create_pool(
        config.postgres_dsn, min_size=1, max_size=2, timeout=timeout, command_timeout=timeout
    )
    try:
        mongo: AsyncMongoClient[Doc] = AsyncMongoClient(
            config.mongo_url, appname="cqrs-rebuild", tz_aware=True, serverSelectionTimeoutMS=ms,
            connectTimeoutMS=ms, socketTimeoutMS=ms, journal=True,
        )  # fmt: skip
        try:
            yield _Connections(pool, mongo)
        finally:
            await mongo.close()
    finally:
        await pool.close()


async def rebuild_status(config: RebuildConfig) -> list[dict[str, Any]]:
    """Every generation (generation 1 included) with its state, as `cqrs rebuild --status` prints it."""
    async with _connect(config) as conns:
        docs = await Generations(conns.mongo[config.mongo_database]).all()
    return status_rows(docs, config.mongo_database)


async def run_rebuild(
    config: RebuildConfig,
    *,
    projections: Sequence[Projection] = PROJECTIONS,
    progress: bool = False,
    on_batch: BatchHook | None = None,
) -> RebuildResult:
    """Builds (or resumes) a generation, catches it up and shadow-compares it with the active generation.

    `projections`: the registry to build with (tests pass a changed one). Raises `RebuildFailed` when an event
    cannot be applied, `GenerationError` when the asked generation cannot be used, and connection errors."""
    async with _connect(config) as conns:
        base = conns.mongo[config.mongo_database]
        generations = Generations(base)
        reader = EventReader(conns.pool, config.timeout_seconds)
        doc, resumed = await generations.open(
            config.generation, new=config.new, start_position=await reader.head_position()
        )
        number = int(doc["_id"])
        active = await generations.active()
        result = RebuildResult(number, str(doc["database"]), str(active["database"]), resumed)
        builder = Builder(
            conns.mongo[result.database], projections, reader, generations, number,
            batch_size=config.batch_size, on_batch=on_batch,
        )  # fmt: skip
        await builder.prepare()
        cursor, position = Cursor.from_document(doc.get("cursor")), int(doc.get("position") or 0)
        bar = RebuildProgress(progress)
        bar.start(f"rebuild g{number}", await reader.remaining_estimate(position))
        try:
            cursor, position, applied, seconds = await builder.run(cursor, position, bar)
        finally:
            bar.close()
        result.events_applied, result.build_seconds, result.position = applied, seconds, position
        await generations.set_state(number, CAUGHT_UP, caught_up_at=datetime.now(UTC))

        collections = list(dict.fromkeys(p.collection for p in projections))
        ignored = IgnoredFields((*BOOKKEEPING_FIELDS, *config.ignore_fields), collections)
        comparer = ShadowComparer(conns.mongo[result.live_database], conns.mongo[result.database], ignored,
                                  config.batch_size)  # fmt: skip
        compared = ComparisonResult()
        start = (int(doc.get("start_position") or 0), doc.get("started_at") or datetime.now(UTC))
        for collection in collections:
            if config.sample is None:
                await comparer.full(collection, compared)
            else:
                await comparer.sample(collection, config.sample, start, compared)

        async def catch_up() -> None:
            nonlocal cursor, position
            cursor, position, more, _ = await builder.run(cursor, position, RebuildProgress(False))
            result.events_applied += more

        differences = await _settle(comparer, compared.differences, catch_up, config.settle_seconds)
        result.position = position
        result.documents_compared = compared.documents_compared
        result.difference_count = len(differences)
        result.differences = differences[: config.max_listed]
        result.ignored_fields = ignored.specs
        result.sampled = config.sample
        result.state = COMPARED
        await generations.set_state(
            number, COMPARED, differences=len(differences), compared_at=datetime.now(UTC),
            ignored_fields=list(ignored.specs), sample=config.sample,
        )  # fmt: skip
        return result


async def _settle(
    comparer: ShadowComparer, differences: list[Difference], catch_up: Any, settle_seconds: float
) -> list[Difference]:
    """Re-checks differences until none is left that one side being behind could explain, or time is up.

    The live read model lags PostgreSQL (the projector) and the generation lags events committed after it caught
    up: each round catches the generation up, pauses, and compares those documents again. Differences between
    documents at the same version get one re-check (a derived view the projector was still writing)."""
    deadline = time.monotonic() + settle_seconds
    first = True
    while differences and time.monotonic() < deadline:
        if not first and not any(d.versions_differ for d in differences):
            break
        first = False
        await asyncio.sleep(SETTLE_PAUSE_SECONDS)
        await catch_up()
        again = ComparisonResult()
        by_collection: dict[str, list[str]] = {}
        for difference in differences:
            by_collection.setdefault(difference.collection, []).append(difference.doc_id)
        for collection, ids in by_collection.items():
            await comparer.by_ids(collection, ids, again)
        differences = again.differences
    return differences
