"""The queries that look for parked streams read only the parked streams' checkpoints, through the sparse index on
`parked.kind`, on the real MongoDB-wire server. There is one checkpoint per stream, and the projector counts the
parks every resume interval: a query that scanned them all would cost the server more with every new stream
(about 130 ms of its CPU at 4,000 streams, every 5 seconds, on the local server)."""

from __future__ import annotations

from typing import Any

from pymongo import AsyncMongoClient

from core.read_model import CHECKPOINTS_COLLECTION
from cqrsctl.verify.sources import ReadModelReader
from projector.parking import Park, ParkStore
from projector.planning import GAP, POISON, SELF_HEALING_KINDS
from tests.support import StartedCommands

Doc = dict[str, Any]

STREAMS = 300
PARKED_KINDS = {"stream-7": GAP, "stream-70": POISON, "stream-170": GAP}


def checkpoint_reads(log: StartedCommands) -> list[Doc]:
    """The reads of the checkpoints logged."""
    return [
        command
        for name, command in log.commands
        if name in {"find", "aggregate"} and command[name] == CHECKPOINTS_COLLECTION
    ]


async def test_parks_are_listed_and_counted_from_the_parked_checkpoints_alone(
    logged: tuple[AsyncMongoClient[Doc], StartedCommands], unique_name: str
) -> None:
    client, log = logged
    database = client[unique_name]
    store = ParkStore(database)
    await store.ensure_indexes()
    checkpoints = [{"_id": f"stream-{n}", "stream_type": "order", "version": 3, "position": n} for n in range(STREAMS)]
    await database[CHECKPOINTS_COLLECTION].insert_many(checkpoints)
    await store.park([Park(stream_id, "order", kind, "test", 4) for stream_id, kind in PARKED_KINDS.items()])
    log.commands.clear()

    assert await store.count_by_kind() == {GAP: 2, POISON: 1}
    assert {park.stream_id for park in await store.parks()} == set(PARKED_KINDS)
    assert {park.stream_id for park in await store.parks(SELF_HEALING_KINDS)} == {"stream-7", "stream-170"}
    count, listed = await ReadModelReader(database).parked_streams(limit=10)
    assert count == 3 and [doc["_id"] for doc in listed] == sorted(PARKED_KINDS)

    reads = checkpoint_reads(log)
    assert len(reads) >= 4
    for command in reads:
        explained = await database.command("explain", command, verbosity="executionStats")
        stats = explained["stages"][0]["$cursor"] if "stages" in explained else explained
        examined = stats["executionStats"]["totalDocsExamined"]
        assert examined <= len(PARKED_KINDS), f"{command} read {examined} checkpoints, not only the parked ones"
