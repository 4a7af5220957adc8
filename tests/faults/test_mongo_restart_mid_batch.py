"""The MongoDB-wire server SIGKILLed and restarted inside a projector batch, after its documents and views and before
its checkpoints: the checkpoints then go to the new server process. A checkpoint at v promises that the documents
reflect their stream up to v; were the writes before it acknowledged without the journal, the killed process would
have taken them along while the checkpoints survived, and the stream would wait forever for events JetStream never
delivers again (the random chaos scenario found exactly this: a checkpoint at v1, no document, a gap parked)."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pymongo.asynchronous.database import AsyncDatabase
from pymongo.errors import PyMongoError

from core.dependency_metrics import dependency_metrics
from core.read_model import CHECKPOINTS_COLLECTION, ORDERS_COLLECTION
from projector.checkpoints import Checkpoint, CheckpointWriter
from projector.config import ProjectorSettings
from projector.mongo_client import read_model_client
from projector.pipeline import Pipeline
from projector.planning import decode_recorded
from tests.faults.stack import FaultStack
from tests.faults.support import wait_until
from tests.integration.test_sales_report import BY_TYPE, store_order
from tests.unit.test_sales_report import D1, D2, order_events

pytestmark = pytest.mark.slow

ROUNDS = 4
ORDERS_PER_BATCH = 6
Doc = dict[str, Any]


class RestartBeforeCheckpoints(CheckpointWriter):
    """Kills the MongoDB-wire server and starts it again before the checkpoints are written."""

    def __init__(self, database: AsyncDatabase[Doc], stack: FaultStack) -> None:
        super().__init__(database)
        self._database = database
        self._stack = stack

    async def write(self, checkpoints: Mapping[str, Checkpoint]) -> None:
        await self._stack.kill_server(self._stack.mongo)
        await self._stack.restart_server(self._stack.mongo)

        async def reconnected() -> tuple[bool, str]:
            # What the projector's other tasks (leases, health) do meanwhile: the first call on a connection to the
            # killed process fails and empties the pool, the next opens a connection to the new one.
            try:
                await self._database.command("ping")
                return True, "ping answered"
            except PyMongoError as exc:
                return False, repr(exc)

        await wait_until(reconnected, what="a ping from the projector's client", timeout=30, interval=0.1)
        await super().write(checkpoints)


async def test_mongo_restarted_between_a_batchs_documents_and_its_checkpoints(stack: FaultStack) -> None:
    settings = ProjectorSettings(mongo_url=stack.mongo_url, mongo_timeout_ms=5000)
    client = read_model_client(settings, "restart-mid-batch")
    database: AsyncDatabase[Doc] = client["restart_mid_batch"]
    try:
        pipeline = Pipeline(
            database, BY_TYPE, dependency_metrics(CollectorRegistry()),
            stream_name="", park_after=1, max_backoff=1.0, parallel_calls=False,
        )  # fmt: skip
        await pipeline.ensure_indexes()
        for round_no in range(1, ROUNDS + 1):
            recorded = store_order(
                [order_events("EUR", [("ANVIL", n + 1, 1250)], placed_at=D1, cancelled_at=D2) for n in range(4)]
                + [order_events("EUR", [("ROPE", 2, 300)], placed_at=D2) for _ in range(ORDERS_PER_BATCH - 4)]
            )
            pipeline.checkpoints = RestartBeforeCheckpoints(database, stack)
            started = time.monotonic()
            outcome = await pipeline.apply(decode_recorded(recorded, BY_TYPE))
            assert not outcome.unsettled and len(outcome.applied) == len(recorded), (round_no, outcome)
            checkpoints = {
                str(doc["_id"]): int(doc["version"])
                async for doc in database[CHECKPOINTS_COLLECTION].find({"_id": {"$in": list(outcome.versions)}})
            }
            documents = {
                str(doc["_id"]): int(doc["version"])
                async for doc in database[ORDERS_COLLECTION].find({"_id": {"$in": list(outcome.versions)}})
            }
            behind = {sid: (v, documents.get(sid)) for sid, v in checkpoints.items() if documents.get(sid, 0) < v}
            assert not behind, (
                f"restart {round_no} ({time.monotonic() - started:.1f}s): checkpoints ahead of the documents the "
                f"server kept (stream: (checkpoint, document)): {behind}"
            )
            assert len(checkpoints) == ORDERS_PER_BATCH, (round_no, checkpoints)
    finally:
        await client.close()
