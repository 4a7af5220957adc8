"""Which generation of the read model is active: the document every reader and writer of MongoDB follows.

A generation is a whole read model in a MongoDB database of its own: generation 1 is the base database
(`CQRS_MONGO_DATABASE`), generation N >= 2 is `<base>_g<N>` (built by `cqrs rebuild`). The control collection
`read_model_generations` of the base database holds:

* `{_id: "active", generation, database, versions, switched_at}`: the generation the query services read and the
  projectors write. `versions` maps each projection and derived view to the version it was built with
  (`projector.registry.registry_versions`): `cqrs rebuild --if-needed` rebuilds when it differs from the registry.
* `{_id: "writer:<id>", generation, database, seen_at}`: one per running projector, refreshed every poll: the
  cutover waits until every live writer writes the new generation before it stops feeding it from PostgreSQL.
* one document per rebuilt generation (numeric `_id`; see `cqrsctl.rebuild.generations`).

The query service and the projector poll the active document (`GenerationFollower`) and switch within one poll
interval of a cutover.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from pymongo import ReturnDocument
from pymongo.asynchronous.database import AsyncDatabase

from core.read_model import CHECKPOINTS_COLLECTION

log = logging.getLogger(__name__)

COLLECTION: Final = "read_model_generations"
ACTIVE_ID: Final = "active"
WRITER_PREFIX: Final = "writer:"

# What a read model had before generations were recorded (the release before order history and the sales report):
# a base database that already holds documents then gets this record, so `cqrs rebuild --if-needed` rebuilds it.
LEGACY_VERSIONS: Final[Mapping[str, int]] = {
    "orders": 1,
    "customers": 1,
    "order_customer_fields": 1,
    "customer_order_stats": 1,
}

Doc = dict[str, Any]


def database_name(base: str, generation: int) -> str:
    return base if generation == 1 else f"{base}_g{generation}"


@dataclass(frozen=True, slots=True)
class ActiveGeneration:
    generation: int
    database: str
    versions: Mapping[str, int] = field(default_factory=dict)

    @classmethod
    def from_document(cls, doc: Mapping[str, Any]) -> ActiveGeneration:
        versions = doc.get("versions")
        return cls(
            int(doc["generation"]),
            str(doc["database"]),
            {str(k): int(v) for k, v in versions.items()} if isinstance(versions, dict) else {},
        )


async def read_active(base: AsyncDatabase[Doc]) -> ActiveGeneration | None:
    """The active generation, or None while none is recorded (the base database is the read model then)."""
    doc = await base[COLLECTION].find_one({"_id": ACTIVE_ID})
    return ActiveGeneration.from_document(doc) if doc is not None else None


async def ensure_active(base: AsyncDatabase[Doc], versions: Mapping[str, int]) -> ActiveGeneration:
    """The active generation, recorded as generation 1 (the base database) when none is.

    The first record says what generation 1 was built with: `versions` (this build's registry) when the base
    database has no checkpoint yet (nothing projected: it will be built by this build), else `LEGACY_VERSIONS`."""
    existing = await read_active(base)
    if existing is not None:
        return existing
    fresh = await base[CHECKPOINTS_COLLECTION].find_one({}, {"_id": 1}) is None
    doc = await base[COLLECTION].find_one_and_update(
        {"_id": ACTIVE_ID},
        {
            "$setOnInsert": {
                "generation": 1,
                "database": base.name,
                "versions": dict(versions if fresh else LEGACY_VERSIONS),
                "switched_at": datetime.now(UTC),
            }
        },
        upsert=True,
        return_document=ReturnDocument.AFTER,
    )
    assert doc is not None
    return ActiveGeneration.from_document(doc)


async def report_writer(base: AsyncDatabase[Doc], writer_id: str, active: ActiveGeneration) -> None:
    """A projector's heartbeat: it writes `active` from now on (until its next report)."""
    await base[COLLECTION].update_one(
        {"_id": WRITER_PREFIX + writer_id},
        {"$set": {"generation": active.generation, "database": active.database, "seen_at": datetime.now(UTC)}},
        upsert=True,
    )


async def remove_writer(base: AsyncDatabase[Doc], writer_id: str) -> None:
    """A projector that stops says so, so a cutover does not wait for its heartbeat to expire."""
    await base[COLLECTION].delete_one({"_id": WRITER_PREFIX + writer_id})


async def live_writers(base: AsyncDatabase[Doc], ttl_seconds: float) -> list[Doc]:
    """The writers seen within `ttl_seconds` (older ones are presumed dead)."""
    since = datetime.now(UTC) - timedelta(seconds=ttl_seconds)
    cursor = base[COLLECTION].find({"_id": {"$regex": f"^{WRITER_PREFIX}"}, "seen_at": {"$gte": since}})
    return [doc async for doc in cursor]


async def active_database(base: AsyncDatabase[Doc]) -> AsyncDatabase[Doc]:
    """The database of the active generation (the one to audit, repair or inspect)."""
    active = await read_active(base)
    return base.client[active.database] if active is not None else base


class GenerationFollower:
    """Remembers the database in use and tells, after each poll, whether the active generation moved."""

    def __init__(self, base: AsyncDatabase[Doc]) -> None:
        self._base = base
        self.current = ActiveGeneration(1, base.name)

    async def poll(self) -> ActiveGeneration | None:
        """The new active generation if it changed since the last poll (None: unchanged). Driver errors raise."""
        active = await read_active(self._base)
        if active is None or active.database == self.current.database:
            if active is not None:
                self.current = active  # same database, maybe newer versions
            return None
        log.info(
            "read model generation %d (%s) is active; switching from %s",
            active.generation,
            active.database,
            self.current.database,
        )
        self.current = active
        return active
