"""One journal wait per batch: the batch's closing write makes everything written before it durable.

A batch is acknowledged to JetStream only after its checkpoints are written, and the checkpoints are the last
writes of a batch (`projector.pipeline`). The projector's client asks for `j: true` (and the configured `w`) on
every write, but a journal commit covers every write made before it: MongoDB's journal and WiredTiger's log are
sequential, so once the checkpoints' journaled write is acknowledged, the documents and views the batch wrote
before it are on disk too. Those earlier writes therefore go without `j`; each journaled write costs a log flush
(a disk sync on a standalone server), and a batch used to pay one per statement it wrote.

Nothing else changes: `w` stays the configured one on every write (with `w: "majority"` a failover cannot keep a
later write and lose an earlier one, and on a replica set MongoDB journals majority writes anyway), and a crash
between the documents and the checkpoints leaves what it always could: documents ahead of their checkpoint, not
acknowledged, redelivered, and brought to a checkpoint by the next batch.
"""

from __future__ import annotations

from typing import TypeVar

from pymongo import WriteConcern
from pymongo.asynchronous.database import AsyncDatabase

D = TypeVar("D", bound=AsyncDatabase)  # type: ignore[type-arg]


def before_closing_write(database: D) -> D:
    """`database` with the same `w` and `wtimeout` but no journal flag (`j`, or its old spelling `fsync`): for the
    writes a later journaled write of the same batch covers (see the module docstring)."""
    concern = database.write_concern.document
    relaxed = WriteConcern(w=concern.get("w"), wtimeout=concern.get("wtimeout"))
    return database.with_options(write_concern=relaxed)  # type: ignore[return-value]
