"""`python -m bench.order_write_cost`: what one order document write costs the MongoDB-wire server, and why.

At live rates a projector batch holds a few events of different orders, so each event costs the server one
version-guarded order update (plus its checkpoint and views), whatever the batch size: the `orders` update is the
largest single cost of time-to-queryable on the local stack. This writes order documents with the projector's own
writer (`ReadModelWriter`, the `orders` projection's indexes, documents folded from real events with their change
log) against a fresh local MongoDB-wire server, one guarded update per call as a live batch sends it, in four
variants: as in production, without the secondary indexes, without the change log, and without either. It prints
the server's CPU per update (from /proc, over all the updates of a variant) and the median wall time per call.

The MongoDB-wire server rewrites every index entry of a document it updates; `mongod` touches only the keys that
changed (an order's listing keys rarely do), so the index share is the stand-in's, not production's.

    python -m bench.order_write_cost [--orders 400] [--events 12] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import dataclasses
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import bson
from pymongo import AsyncMongoClient

from bench.cpu import window
from bench.view_growth import placed_order
from core.projections import Document
from core.projections.orders import HISTORY_FIELD, ORDERS
from localservers import MongoServer, free_port
from projector.mongo_writer import Change, MongoDocument, ReadModelWriter

VARIANTS = (("as in production", True, True), ("no secondary index", False, True),
            ("no change log", True, False), ("neither", False, False))  # fmt: skip


def order_document(order_id: str, events: int) -> Document:
    """An order folded from `events` real events (create, items, place), change log included."""
    items = [(f"SKU-{i}", "Anvil", 2, 1999) for i in range(events - 2)]
    return placed_order(order_id, str(uuid.uuid4()), datetime.now(UTC), items)


def next_version(doc: Document) -> Document:
    """The document one event later, as the projector would write it (its change log one entry longer)."""
    new = dict(doc, version=int(doc["version"]) + 1, updated_at=datetime.now(UTC))
    if HISTORY_FIELD in doc:
        entry = copy.deepcopy(doc[HISTORY_FIELD][-1])
        entry["version"] = new["version"]
        new[HISTORY_FIELD] = [*doc[HISTORY_FIELD], entry]
    return new


async def measure(
    client: AsyncMongoClient[MongoDocument], pid: int, name: str, indexed: bool, logged: bool, orders: int, events: int
) -> tuple[float, float, int]:
    """Server CPU ms per update, median wall ms per call, and the document's BSON size, for one variant."""
    projection = dataclasses.replace(ORDERS, collection=f"orders_{uuid.uuid4().hex[:8]}",
                                     indexes=ORDERS.indexes if indexed else ())  # fmt: skip
    writer = ReadModelWriter(client["bench_order_writes"], projection)
    await writer.ensure_indexes()
    docs = {}
    for _ in range(orders):
        doc = order_document(str(uuid.uuid4()), events)
        if not logged:
            del doc[HISTORY_FIELD]
        docs[str(doc["_id"])] = doc
    await writer.write([Change(doc_id, None, doc) for doc_id, doc in docs.items()])
    walls: list[float] = []
    with window({"mongo": [pid]}, client=False) as spent:
        for doc_id, doc in docs.items():
            started = time.perf_counter()
            outcome = await writer.write([Change(doc_id, int(doc["version"]), next_version(doc))])
            walls.append(1000 * (time.perf_counter() - started))
            assert not outcome.conflicts and not outcome.failed, (name, outcome)
    await writer.collection.drop()
    size = len(bson.encode(next(iter(docs.values()))))
    return 1000 * (spent.cpu_s["mongo"] or 0.0) / orders, statistics.median(walls), size


async def run(orders: int, events: int, rounds: int) -> dict[str, list[tuple[float, float, int]]]:
    results: dict[str, list[tuple[float, float, int]]] = {name: [] for name, _, _ in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="cqrs-order-writes-") as workdir:
        server = MongoServer(Path(workdir) / "mongo", free_port())
        server.start()
        try:
            assert server.pid is not None
            client: AsyncMongoClient[MongoDocument] = AsyncMongoClient(server.url, tz_aware=True, retryWrites=False)
            try:
                for _ in range(rounds):  # the variants in turn, so that drift of the machine spreads over all
                    for name, indexed, logged in VARIANTS:
                        figure = await measure(client, server.pid, name, indexed, logged, orders, events)
                        results[name].append(figure)
                        print(f"[order_write_cost] {name}: {figure}", file=sys.stderr, flush=True)
            finally:
                await client.close()
        finally:
            server.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.order_write_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=400, help="documents updated per variant and round")
    parser.add_argument("--events", type=int, default=12, help="events each order was folded from (default 12)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds over the variants (default 2)")
    args = parser.parse_args(argv)
    results = asyncio.run(run(args.orders, args.events, args.rounds))
    base = statistics.median(cpu for cpu, _, _ in results[VARIANTS[0][0]])
    print("| order document | server CPU per update | of production's | wall per call (median) | document |")
    print("|---|---:|---:|---:|---:|")
    for name, figures in results.items():
        cpu = statistics.median(f[0] for f in figures)
        wall = statistics.median(f[1] for f in figures)
        print(f"| {name} | {cpu:.2f} ms | {cpu / base:.2f}x | {wall:.2f} ms | {figures[0][2]:,} B |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
