"""The projector's MongoDB client: bounded waits, durable writes, and no retryable writes unless configured.

A batch is acked to JetStream once MongoDB acknowledged its writes, and never delivered again: the writes must
survive a crash of MongoDB (journal) and a failover (majority), or an applied event is lost from the read model
while the stream has moved on. Every write asks for the journal, the documents and views before a batch's
checkpoints included: a journaled write makes the earlier ones durable only if the same server process took them,
and a MongoDB killed and restarted between a batch's documents and its checkpoints lost the documents it had
acknowledged while the checkpoints, taken by the new process, stayed (tests/faults/test_mongo_restart_mid_batch.py).

Retryable writes are off by default (`CQRS_MONGO_RETRY_WRITES`): with them the driver repeats a write once after a
network error or a failover, and the server keeps a record of every write to recognise the repeat. Every write of
the projector is idempotent (version-guarded documents, `$max` checkpoints, compare-and-set statistics, tagged
sales facts) and a batch that fails is redelivered whole, so the records buy nothing here; on the MongoDB-wire
server they cost a scan of all records under a lock on every write (docs/performance.md, "Levers measured in one
run").

Its round trips are awaited in the calling task (`core.mongo_round_trip`): the projector makes about fourteen a
batch at live rates.
"""

from __future__ import annotations

from collections.abc import Sequence

from pymongo import AsyncMongoClient
from pymongo.monitoring import CommandListener

from core import mongo_round_trip
from projector.config import ProjectorSettings
from projector.mongo_writer import MongoDocument


def read_model_client(
    settings: ProjectorSettings, appname: str, event_listeners: Sequence[CommandListener] = ()
) -> AsyncMongoClient[MongoDocument]:
    mongo_round_trip.install()
    return AsyncMongoClient(
        settings.mongo_url,
        appname=appname,
        tz_aware=True,
        serverSelectionTimeoutMS=settings.mongo_timeout_ms,
        connectTimeoutMS=settings.mongo_timeout_ms,
        socketTimeoutMS=settings.mongo_timeout_ms * 5,
        w=settings.mongo_write_concern_w,
        journal=True,
        retryWrites=settings.mongo_retry_writes,
        event_listeners=list(event_listeners),
    )
