"""The generations of the read model, recorded in the control collection `read_model_generations` of the base
(live) database.

A generation is a whole read model in a MongoDB database of its own: generation 1 is the base database
(`CQRS_MONGO_DATABASE`), generation N >= 2 is `<base>_g<N>`. One document per rebuilt generation:

    {_id: N, database, state, position, cursor: {xact_id, position}, start_position, started_at, updated_at,
     events_applied, differences, error}

* `state`: `building` (applying the events of PostgreSQL), `caught_up` (has applied every final event once),
  `compared` (shadow-compared with the active generation; `differences` says how many documents differ),
  `failed` (`error` says why; resumable only by naming it with `--generation`);
* `position`: the highest global position applied; `cursor`: where the event reader resumes (see
  `cqrsctl.rebuild.reader`); both are written after each batch, so a crash resumes from the last batch;
* `start_position`: the highest position when the generation was started (documents changed later are always
  compared by `--sample`).

And one document `{_id: "active", generation: N, database}`: the generation the query service reads and the
projector writes. Only generation 1 exists until a cutover (later work) moves it; readers follow this document.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Final

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import DuplicateKeyError

from cqrsctl.rebuild.reader import Cursor

COLLECTION: Final = "read_model_generations"
ACTIVE_ID: Final = "active"

BUILDING: Final = "building"
CAUGHT_UP: Final = "caught_up"
COMPARED: Final = "compared"
FAILED: Final = "failed"
# Picked up again by a plain `cqrs rebuild` (the others only when named with --generation).
UNFINISHED: Final = (BUILDING, CAUGHT_UP)

Doc = dict[str, Any]


class GenerationError(Exception):
    """A generation cannot be used as asked (see the message)."""


def database_name(base: str, generation: int) -> str:
    return base if generation == 1 else f"{base}_g{generation}"


class Generations:
    """Reads and writes the control collection of one base database."""

    def __init__(self, base: AsyncDatabase[Doc]) -> None:
        self._base = base.name
        self._col = base[COLLECTION]

    async def active(self) -> Doc:
        """The active generation's document, created as generation 1 (the base database) when none is recorded."""
        doc = await self._col.find_one_and_update(
            {"_id": ACTIVE_ID},
            {"$setOnInsert": {"generation": 1, "database": self._base, "updated_at": datetime.now(UTC)}},
            upsert=True,
            return_document=ReturnDocument.AFTER,
        )
        assert doc is not None
        return doc

    async def all(self) -> list[Doc]:
        """Every generation document, by number, then the active one."""
        docs = [doc async for doc in self._col.find({"_id": {"$type": "number"}}).sort("_id", 1)]
        return [*docs, await self.active()]

    async def get(self, generation: int) -> Doc | None:
        return await self._col.find_one({"_id": generation})

    async def open(self, generation: int | None, *, new: bool, start_position: int) -> tuple[Doc, bool]:
        """The generation to build and whether it is resumed: `generation` if given (never the active one), else
        the latest unfinished one unless `new`, else a new one numbered after every recorded generation."""
        active = int((await self.active())["generation"])
        if generation is not None:
            if generation == active or generation < 2:
                raise GenerationError(f"generation {generation} is the active read model (or generation 1)")
            doc = await self.get(generation)
            if doc is None:
                raise GenerationError(f"no generation {generation} is recorded")
            return doc, True
        if not new:
            latest = await self._col.find_one({"_id": {"$type": "number"}}, sort=[("_id", -1)])
            if latest is not None and latest.get("state") in UNFINISHED and latest["_id"] != active:
                return latest, True
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
