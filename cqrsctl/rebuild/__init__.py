"""`cqrs rebuild`: builds a new generation of the read model beside the live one, from PostgreSQL (guarantee 9).

1. open a generation (`cqrsctl.rebuild.generations`): resume the latest unfinished one, or start `<base>_g<N>`;
2. build: every event of PostgreSQL, read in an order that never skips a late commit (`cqrsctl.rebuild.reader`),
   applied in batches through the projector's own `Pipeline` and registry (`cqrsctl.rebuild.build`), progress
   recorded after each batch; the derived views are computed once, for every key, after the last batch (a crash
   before that resumes and computes them then);
3. caught up: the reader found no more final events;
4. shadow compare with the active generation (`cqrsctl.rebuild.shadow`); differences that may be in flight (one
   side behind the other) are re-checked after catching up again, for up to `settle_seconds`; a derived document
   left differing (a hot key) is taken out when each side equals this release's fold of its own sources
   (`cqrsctl.rebuild.hot_keys`). The collections
   of projections and views whose version changed since the active generation was built are not compared
   (they are meant to differ: that is why they were rebuilt);
5. with `cutover`, when no document differs (or `accept_differences`): the services switch to the new generation
   (`cqrsctl.rebuild.cutover`) and the old one is retired;
6. with `drop_retired_after_hours`: retired generations older than that are dropped.

`if_needed` (the deployment Job's mode) does all this only when the active generation was built with other
projection versions than this build's registry (`projector.registry.registry_versions`): a projection that is
new in this release, or changed, is backfilled from PostgreSQL on deployment.

Use in-process as `result = await run_rebuild(RebuildConfig(...))`; `activate` switches to an existing generation
(a rollback to a retired one replays the event store into it first), `drop_generation` drops one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from pymongo import AsyncMongoClient

from core.generations import COLLECTION
from core.projections import DerivedView, Projection
from cqrsctl.rebuild.build import BatchHook, Builder, RebuildFailed
from cqrsctl.rebuild.cutover import CutoverFailed, CutoverResult, cut_over
from cqrsctl.rebuild.generations import (
    ACTIVATABLE,
    ACTIVE,
    CAUGHT_UP,
    COMPARED,
    DROPPED,
    FAILED,
    RETIRED,
    GenerationError,
    Generations,
    status_rows,
)
from cqrsctl.rebuild.hot_keys import held_on_each_side
from cqrsctl.rebuild.live_lag import LiveLagGate
from cqrsctl.rebuild.model import BOOKKEEPING_FIELDS, RebuildConfig, RebuildResult, changed_components
from cqrsctl.rebuild.progress import RebuildMetrics, RebuildProgress
from cqrsctl.rebuild.reader import Cursor, EventReader
from cqrsctl.rebuild.shadow import ComparisonResult, Difference, IgnoredFields, ShadowComparer
from cqrsctl.stores import POSTGRES, bounded_mongo_client, connecting, ping_mongo
from projector.leases import MEMBERS, PARTITIONS
from projector.registry import PROJECTIONS, VIEWS, registry_versions

log = logging.getLogger(__name__)

__all__ = [
    "CONTROL_COLLECTIONS",
    "CutoverFailed",
    "CutoverResult",
    "Difference",
    "GenerationError",
    "RebuildConfig",
    "RebuildFailed",
    "RebuildMetrics",
    "RebuildResult",
    "activate",
    "drop_generation",
    "rebuild_status",
    "run_rebuild",
]

Doc = dict[str, Any]

# What the base database holds besides generation 1's read model: never dropped with it.
CONTROL_COLLECTIONS = frozenset({COLLECTION, PARTITIONS, MEMBERS})

# Pause before re-checking differences (lets the live projector finish the batch it is writing).
SETTLE_PAUSE_SECONDS = 0.5
# While only the live side is behind, it is re-checked this often: a key that receives events all the time (one
# customer's statistics, today's sales) equals the frozen generation only between two of its events, which a
# half-second pause would almost always miss.
LIVE_BEHIND_POLL_SECONDS = 0.05


@dataclass(slots=True)
class _Connections:
    pool: asyncpg.Pool
    mongo: AsyncMongoClient[Doc]


@contextlib.asynccontextmanager
async def _connect(config: RebuildConfig) -> AsyncIterator[_Connections]:
    timeout = config.timeout_seconds
    with connecting(POSTGRES, config.postgres_dsn):
        pool = await asyncpg.create_pool(
            config.postgres_dsn, min_size=1, max_size=2, timeout=timeout, command_timeout=timeout
        )
    try:
        mongo: AsyncMongoClient[Doc] = bounded_mongo_client(config.mongo_url, timeout, "cqrs-rebuild")
        try:
            await ping_mongo(mongo, config.mongo_url, timeout)
            yield _Connections(pool, mongo)
        finally:
            await mongo.close()
    finally:
        await pool.close()


async def rebuild_status(config: RebuildConfig) -> list[dict[str, Any]]:
    """Every generation (generation 1 included) with its state, as `cqrs rebuild --status` prints it."""
    async with _connect(config) as conns:
        docs = await Generations(conns.mongo[config.mongo_database], registry_versions()).all()
    return status_rows(docs, config.mongo_database)


async def run_rebuild(
    config: RebuildConfig,
    *,
    projections: Sequence[Projection] = PROJECTIONS,
    views: Sequence[DerivedView] = VIEWS,
    progress: bool = False,
    on_batch: BatchHook | None = None,
    metrics: RebuildMetrics | None = None,
) -> RebuildResult:
    """Builds (or resumes) a generation, catches it up and shadow-compares it with the active generation; then,
    as configured, switches the services to it and drops old generations.

    `projections`/`views`: the registry to build with (tests pass a changed one). Raises `RebuildFailed` when an
    event cannot be applied, `GenerationError` when the asked generation cannot be used, `CutoverFailed` when
    the switch could not end, and connection errors."""
    versions = registry_versions(tuple(projections), tuple(views))
    async with _connect(config) as conns:
        base = conns.mongo[config.mongo_database]
        generations = Generations(base, versions)
        active = await generations.active()
        changed = changed_components(active.versions, versions)
        if config.if_needed and not changed:
            result = RebuildResult(active.generation, active.database, active.database, False, up_to_date=True)
            result.dropped = await _drop_retired(conns, config, generations)
            return result
        reader = EventReader(conns.pool, config.timeout_seconds)
        doc, resumed = await generations.open(
            config.generation, new=config.new, start_position=await reader.head_position()
        )
        number = int(doc["_id"])
        result = RebuildResult(number, str(doc["database"]), active.database, resumed)
        gate = _live_lag_gate(config, conns, projections, result.live_database, metrics)
        builder = Builder(
            conns.mongo[result.database], projections, reader, generations, number,
            batch_size=config.batch_size, on_batch=on_batch, gate=gate,
        )  # fmt: skip
        await builder.prepare()
        cursor, position = Cursor.from_document(doc.get("cursor")), int(doc.get("position") or 0)
        report = metrics.state if metrics is not None else (lambda generation, state: None)
        report(number, "building")
        bar = RebuildProgress(progress, metrics=metrics)
        remaining = await reader.remaining_estimate(position)
        log.info("%s generation %d in %s from position %d: about %d events to apply",
                 "resuming" if resumed else "building", number, result.database, position, remaining)  # fmt: skip
        bar.start(f"rebuild g{number}", remaining)
        # Derived views once at the end instead of after every batch (each batch touches most of the same keys).
        builder.pipeline.derived_views = False
        try:
            cursor, position, applied, seconds = await builder.run(cursor, position, bar)
        finally:
            bar.close()
            builder.pipeline.derived_views = True
        log.info("generation %d: %d events applied in %.1fs; recomputing the derived views", number, applied, seconds)
        started = time.monotonic()
        # Every customer's statistics and the reports at once: as heavy for the shared MongoDB as the build.
        hold_back = None if gate is None else (lambda: gate.wait(f"generation {number}'s derived views"))
        await builder.pipeline.recompute_views(before_each=hold_back)
        seconds += time.monotonic() - started
        scope = "every document" if config.sample is None else f"a sample of {config.sample} per collection"
        log.info("generation %d: derived views recomputed in %.1fs; comparing it with generation %d (%s)", number,
                 time.monotonic() - started, active.generation, scope)  # fmt: skip
        if gate is not None:
            # Sampled while the live side is far behind, most documents would differ by version (see live_lag).
            await gate.wait(f"the comparison with generation {active.generation}")
        result.events_applied, result.build_seconds, result.position = applied, seconds, position
        await generations.set_state(number, CAUGHT_UP, caught_up_at=datetime.now(UTC))
        report(number, "caught_up")

        every = list(dict.fromkeys([*(p.collection for p in projections), *(v.collection for v in views)]))
        skipped = _changed_collections(changed, projections, views)
        collections = [c for c in every if c not in skipped]
        ignored = IgnoredFields((*BOOKKEEPING_FIELDS, *config.ignore_fields), every)
        comparer = ShadowComparer(conns.mongo[result.live_database], conns.mongo[result.database], ignored,
                                  config.batch_size)  # fmt: skip
        compared = ComparisonResult()
        comparing = time.monotonic()
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

        log.info("generation %d: %d documents compared in %.1fs, %d differing; re-checking those for up to %.0fs",
                 number, compared.documents_compared, time.monotonic() - comparing, len(compared.differences),
                 config.settle_seconds)  # fmt: skip
        differences = await _settle(comparer, compared.differences, catch_up, config.settle_seconds)
        differences, result.hot_keys_in_flight = await held_on_each_side(
            differences, conns.mongo[result.live_database], conns.mongo[result.database], ignored
        )
        log.info("generation %d compared: %d documents differ, %d hot keys in flight", number, len(differences),
                 result.hot_keys_in_flight)  # fmt: skip
        result.position = position
        result.documents_compared = compared.documents_compared
        result.difference_count = len(differences)
        result.differences = differences[: config.max_listed]
        result.ignored_fields = ignored.specs
        result.skipped_collections = tuple(skipped)
        result.sampled = config.sample
        result.state = COMPARED
        await generations.set_state(
            number, COMPARED, differences=len(differences), compared_at=datetime.now(UTC),
            ignored_fields=list(ignored.specs), sample=config.sample, skipped_collections=list(skipped),
        )  # fmt: skip
        report(number, "compared")
        if config.cutover and (result.equal or config.accept_differences):
            target = await generations.get(number)
            assert target is not None
            report(number, "switching")
            result.cutover = await cut_over(
                generations, builder, conns.pool, target,
                writer_ttl_seconds=config.writer_ttl_seconds, timeout_seconds=config.switch_timeout_seconds,
            )  # fmt: skip
            result.state = "active"
            report(number, "active")
        result.dropped = await _drop_retired(conns, config, generations)
        result.held_back_seconds = 0.0 if gate is None else gate.waited_seconds
        return result


def _live_lag_gate(
    config: RebuildConfig,
    conns: _Connections,
    projections: Sequence[Projection],
    live_database: str,
    metrics: RebuildMetrics | None,
) -> LiveLagGate | None:
    if config.max_live_lag_seconds <= 0:
        return None
    stream_types = [p.stream_type for p in projections]
    return LiveLagGate(
        conns.pool, conns.mongo[config.mongo_database], conns.mongo[live_database], stream_types,
        max_lag_seconds=config.max_live_lag_seconds, writer_ttl_seconds=config.writer_ttl_seconds,
        timeout_seconds=config.timeout_seconds, metrics=metrics,
    )  # fmt: skip


async def activate(config: RebuildConfig, generation: int, *, on_batch: BatchHook | None = None) -> CutoverResult:
    """Switches the services to an existing generation: a compared one, or a retired one (a rollback: what was
    committed since the switch to it is replayed into it first; the version guard skips what it has).
    `on_batch`: as for `run_rebuild`."""
    async with _connect(config) as conns:
        generations = Generations(conns.mongo[config.mongo_database], registry_versions())
        doc = await generations.get(generation)
        if doc is None:
            raise GenerationError(f"no generation {generation} is recorded")
        state = doc.get("state")
        active = await generations.active()
        pointer = active.generation
        # Besides those: either side of a switch that gave up (the target active, perhaps marked failed by its tail;
        # the old one not retired), to finish it or to go back. An active one that is the pointer: "already active".
        if state not in ACTIVATABLE and state != ACTIVE and not (state == FAILED and pointer == generation):
            raise GenerationError(
                f"generation {generation} is {state}; only a compared or retired one can be activated (or the active "
                "one after a switch to it gave up, to finish it)"
            )
        reader = EventReader(conns.pool, config.timeout_seconds)
        # The passes before the switch (a rollback's first replays the whole store) wait for the live read model.
        gate = _live_lag_gate(config, conns, PROJECTIONS, active.database, None)
        builder = Builder(
            conns.mongo[str(doc["database"])], PROJECTIONS, reader, generations, generation,
            batch_size=config.batch_size, on_batch=on_batch, replay=state == RETIRED, gate=gate,
        )  # fmt: skip
        await builder.prepare()
        return await cut_over(
            generations, builder, conns.pool, doc,
            writer_ttl_seconds=config.writer_ttl_seconds, timeout_seconds=config.switch_timeout_seconds,
        )  # fmt: skip


async def drop_generation(config: RebuildConfig, generation: int) -> str:
    """Drops a generation that is not active; returns its database's name."""
    async with _connect(config) as conns:
        generations = Generations(conns.mongo[config.mongo_database], registry_versions())
        doc = await generations.get(generation)
        if doc is None:
            raise GenerationError(f"no generation {generation} is recorded")
        if (await generations.active()).generation == generation:
            raise GenerationError(f"generation {generation} is active: activate another one first")
        await _drop(conns, generations, doc)
        return str(doc["database"])


async def _drop(conns: _Connections, generations: Generations, doc: dict[str, Any]) -> None:
    database = conns.mongo[str(doc["database"])]
    if database.name == generations.base.name:
        # Generation 1 is the base database, home of the control collections (generations, the projectors'
        # partition leases): drop everything else.
        for name in await database.list_collection_names():
            if name not in CONTROL_COLLECTIONS:
                await database.drop_collection(name)
    else:
        await conns.mongo.drop_database(database.name)
    await generations.set_state(int(doc["_id"]), DROPPED, dropped_at=datetime.now(UTC))


async def _drop_retired(conns: _Connections, config: RebuildConfig, generations: Generations) -> list[int]:
    """Drops the generations retired more than `drop_retired_after_hours` ago (none when it is None)."""
    if config.drop_retired_after_hours is None:
        return []
    horizon = datetime.now(UTC) - timedelta(hours=config.drop_retired_after_hours)
    # A switch back to a retired generation that gave up (or is still on its way) leaves it `retired` while the
    # services already read it: the active pointer decides, not the state.
    active = (await generations.active()).generation
    dropped = []
    for doc in await generations.retired_before(horizon):
        if doc.get("state") == RETIRED and int(doc["_id"]) != active:
            await _drop(conns, generations, doc)
            dropped.append(int(doc["_id"]))
    return dropped


def _changed_collections(
    changed: Sequence[str], projections: Sequence[Projection], views: Sequence[DerivedView]
) -> list[str]:
    """The collections written by a projection or view whose version changed: not compared (meant to differ)."""
    names = set(changed)
    owners = [(p.name, p.collection) for p in projections] + [(v.name, v.collection) for v in views]
    return list(dict.fromkeys(collection for name, collection in owners if name in names))


async def _settle(
    comparer: ShadowComparer, differences: list[Difference], catch_up: Any, settle_seconds: float
) -> list[Difference]:
    """Re-checks differences until none is left that one side being behind could explain, or time is up.

    The live read model lags PostgreSQL (the projector) and the generation lags events committed after it caught
    up: each round pauses, catches the generation up and compares those documents again. While only the live side
    lags, the generation stays put and the live side is polled briefly, so that a document that keeps changing is
    seen at the moment it reaches the generation's version; a document seen equal once is settled. Differences
    between documents at the same version are re-checked until a re-check finds them unchanged: a derived view the
    projector was still writing, or statistics whose stamp (a sum of versions) happens to match while the two
    sides reflect different events, keep changing; a real difference stays put."""
    deadline = time.monotonic() + settle_seconds
    previous: list[Difference] | None = None
    while differences and time.monotonic() < deadline:
        if not any(d.versions_differ for d in differences) and previous is not None and _same(differences, previous):
            break
        previous = differences
        if all(d.live_behind for d in differences):
            await asyncio.sleep(LIVE_BEHIND_POLL_SECONDS)  # not caught up: the generation would move ahead again
        else:
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


def _same(these: list[Difference], those: list[Difference]) -> bool:
    """Whether two comparisons found the same documents differing in the same way."""

    def key(difference: Difference) -> tuple[str, str]:
        return difference.collection, difference.doc_id

    return sorted(these, key=key) == sorted(those, key=key)
