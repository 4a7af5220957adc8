"""The generations of the read model, recorded in the control collection of the base database
(`core.generations`, which also holds the active generation that the services follow).

One document per rebuilt (or retired) generation:

    {_id: N, database, state, versions, position, cursor: {xact_id, position}, start_position, started_at,
     updated_at, events_applied, differences, error, activated_at, retired_at}

* `state`: `building` (applying the events of PostgreSQL), `caught_up` (has applied every final event once),
  `compared` (shadow-compared with the active generation; `differences` says how many documents differ),
  `active` (the services use it), `retired` (was active; kept for a rollback until dropped), `dropped` (its
  database is gone), `failed` (`error` says why; resumable only by naming it with `--generation`);
* `versions`: the projection and view versions it is built with (`projector.registry.registry_versions`);
* `position`: the highest global position applied; `cursor`: where the event reader resumes (see
  `cqrsctl.rebuild.reader`); both are written after each batch, so a crash resumes from the last batch. A
  retired generation's cursor is reset to the start: it missed the events written after the cutover, and
  activating it again replays the event store into it (the version guard skips what it already has);
* `start_position`: the highest position when the generation was started (documents changed later are always
  compared by `--sample`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from core.generations import ACTIVE_ID, COLLECTION, ActiveGeneration, database_name, ensure_active
from cqrsctl.rebuild.reader import Cursor

log = logging.getLogger(__name__)

BUILDING: Final = "building"
CAUGHT_UP: Final = "caught_up"
COMPARED: Final = "compared"
ACTIVE: Final = "active"
RETIRED: Final = "retired"
DROPPED: Final = "dropped"
FAILED: Final = "failed"
# Picked up again by a plain `cqrs rebuild` (the others only when named with --generation).
UNFINISHED: Final = (BUILDING, CAUGHT_UP)
# May be activated by a cutover (a retired one is a rollback).
ACTIVATABLE: Final = (COMPARED, RETIRED)

Doc = dict[str, Any]


class GenerationError(Exception):
    """A generation cannot be used as asked (see the message)."""


class Generations:
    """Reads and writes the control collection of one base database."""

    def __init__(self, base: AsyncDatabase[Doc], versions: Mapping[str, int]) -> None:
        self.base = base
        self._base = base.name
        self._col = base[COLLECTION]
        self.versions = dict(versions)  # what this build's registry would build a generation with

    async def active(self) -> ActiveGeneration:
        """The active generation (recorded as generation 1, the base database, when none is yet)."""
        return await ensure_active(self.base, self.versions)

    async def all(self) -> list[Doc]:
        """Every generation document, by number, then the active one."""
        docs = [doc async for doc in self._col.find({"_id": {"$type": "number"}}).sort("_id", 1)]
        active = await self._col.find_one({"_id": ACTIVE_ID})
        return [*docs, *([active] if active is not None else [])]

    async def get(self, generation: int) -> Doc | None:
        return await self._col.find_one({"_id": generation})

    async def open(self, generation: int | None, *, new: bool, start_position: int) -> tuple[Doc, bool]:
        """The generation to build and whether it is resumed: `generation` if given (never the active one), else
        the latest unfinished one unless `new`, else a new one numbered after every recorded generation."""
        active = (await self.active()).generation
        if generation is not None:
            if generation == active or generation < 2:
                raise GenerationError(f"generation {generation} is the active read model (or generation 1)")
            doc = await self.get(generation)
            if doc is None:
                raise GenerationError(f"no generation {generation} is recorded")
            if doc.get("state") == DROPPED:  # its cursor says it has what its dropped database lost
                raise GenerationError(f"generation {generation} was dropped: build a new one")
            return doc, True
        if not new:
            latest = await self._col.find_one({"_id": {"$type": "number"}}, sort=[("_id", -1)])
            if latest is not None and latest.get("state") in UNFINISHED and latest["_id"] != active:
                if dict(latest.get("versions") or {}) == dict(self.versions):
                    return latest, True
                # Begun by a build whose projections differ (an interrupted Job, then the next release's): its
                # documents so far are the other build's, so it is left as it is and a new one is built.
                log.warning(
                    "generation %s was begun with other projection versions (%s, not %s): building a new one",
                    latest["_id"], latest.get("versions"), dict(self.versions),
                )  # fmt: skip
        return await self._create(max(active, await self._highest()) + 1, start_position), False

    async def _highest(self) -> int:
        latest = await self._col.find_one({"_id": {"$type": "number"}}, {"_id": 1}, sort=[("_id", -1)])
        return int(latest["_id"]) if latest is not None else 1

    async def _create(self, generation: int, start_position: int) -> Doc:
        while True:
            now = datetime.now(UTC)
            doc: Doc = {
                "_id": generation,
                "database": database_name(self._base, generation),
                "state": BUILDING,
                "versions": self.versions,
                "position": 0,
                "cursor": Cursor().to_document(),
                "start_position": start_position,
                "started_at": now,
                "updated_at": now,
                "events_applied": 0,
                "differences": None,
            }
            try:
                await self._col.insert_one(doc)
                return doc
            except DuplicateKeyError:  # another rebuild took this number meanwhile
                generation += 1

    async def record_batch(self, generation: int, cursor: Cursor, position: int, applied: int) -> None:
        """Progress after a batch: a crash resumes from `cursor` (re-applying a batch is harmless)."""
        await self._col.update_one(
            {"_id": generation},
            {
                "$set": {"cursor": cursor.to_document(), "updated_at": datetime.now(UTC)},
                "$max": {"position": position},
                "$inc": {"events_applied": applied},
            },
        )

    async def set_state(self, generation: int, state: str, **fields: Any) -> None:
        await self._col.update_one(
            {"_id": generation}, {"$set": {"state": state, "updated_at": datetime.now(UTC), **fields}}
        )

    async def record_of(self, active: ActiveGeneration) -> Doc:
        """The numbered document of the active generation, created for generation 1 (never rebuilt, so it has
        none) so that it can be retired and activated again like the others."""
        now = datetime.now(UTC)
        await self._col.update_one(
            {"_id": active.generation},
            {
                "$setOnInsert": {
                    "database": active.database,
                    "state": ACTIVE,
                    "versions": dict(active.versions),
                    "cursor": Cursor().to_document(),
                    "position": 0,
                    "started_at": now,
                    "updated_at": now,
                }
            },
            upsert=True,
        )
        doc = await self.get(active.generation)
        assert doc is not None
        return doc

    async def switch_active(self, doc: Doc) -> ActiveGeneration:
        """Makes the generation of `doc` the one the services follow (they switch within one poll interval)."""
        fields = {
            "generation": int(doc["_id"]),
            "database": str(doc["database"]),
            "versions": dict(doc.get("versions") or {}),
            "switched_at": datetime.now(UTC),
        }
        await self._col.update_one({"_id": ACTIVE_ID}, {"$set": fields}, upsert=True)
        return ActiveGeneration.from_document(fields)

    async def left_active(self, besides: int) -> list[Doc]:
        """Generations still `active` other than `besides`: a switch away from them gave up before retiring them."""
        return [doc async for doc in self._col.find({"state": ACTIVE, "_id": {"$ne": besides}}).sort("_id", 1)]

    async def retire(self, generation: int) -> None:
        """The generation stopped being written: kept for a rollback, which replays the event store into it from
        its cursor. That stays where the switch to it left it (every event before it was fed by the tailer; the
        projectors fed it later ones, perhaps not all before they moved away): a rollback replays what came since,
        not the whole store. Generation 1 was never switched to: its cursor is the store's start."""
        await self.set_state(generation, RETIRED, retired_at=datetime.now(UTC))

    async def retired_before(self, when: datetime) -> list[Doc]:
        return [doc async for doc in self._col.find({"state": RETIRED, "retired_at": {"$lt": when}})]


def status_rows(docs: list[Doc], base: str) -> list[dict[str, Any]]:
    """The generation documents as `--status` shows them (generation 1, the base database, listed first)."""
    active = next((d for d in docs if d["_id"] == ACTIVE_ID), None)
    active_generation = int(active["generation"]) if active is not None else 1
    rows: list[dict[str, Any]] = []
    numbered = [d for d in docs if d["_id"] != ACTIVE_ID]
    if not any(d["_id"] == 1 for d in numbered):
        rows.append({"generation": 1, "database": base, "state": "live", "active": active_generation == 1})
    for doc in numbered:
        row = {"generation": doc["_id"], **{k: v for k, v in doc.items() if k != "_id"}}
        row["active"] = doc["_id"] == active_generation
        rows.append(row)
    return rows
