"""PyMongo's round trip awaited in the calling task (`core/mongo_round_trip.py`), its replies read by
`core/mongo_protocol.py`, against a real MongoDB-wire server: the same results and the same failures as PyMongo's
own path, without its tasks and without pausing the socket between round trips."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest
from pymongo import AsyncMongoClient, InsertOne, UpdateOne, network_layer
from pymongo.asynchronous import pool
from pymongo.errors import BulkWriteError, PyMongoError

from core import mongo_round_trip
from core.mongo_protocol import READ_BUFFER_SIZE, ReplyProtocol
from localservers import MongoServer, free_port

Doc = dict[str, Any]
VARIANTS = ("pymongo", "ours")
READERS = {"pymongo": network_layer.PyMongoProtocol, "ours": ReplyProtocol}


def use(variant: str) -> None:
    if variant == "ours":
        assert mongo_round_trip.install(), "PyMongo's round trip changed shape: update core/mongo_round_trip.py"
    else:
        mongo_round_trip.uninstall()


@pytest.fixture(autouse=True)
def _pymongos_own_afterwards() -> Iterator[None]:
    yield
    mongo_round_trip.uninstall()


@pytest.fixture
async def client(mongo_url: str) -> AsyncIterator[AsyncMongoClient[Doc]]:
    mongo: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000)
    yield mongo
    await mongo.close()


async def _session_of_calls(client: AsyncMongoClient[Doc], collection: str) -> list[Any]:
    """Reads and writes of every shape the services use, with a per-operation error, as comparable values."""
    coll = client["round_trip"][collection]
    seen: list[Any] = []
    await coll.insert_many([{"_id": i, "n": i, "tag": "even" if i % 2 == 0 else "odd"} for i in range(7)])
    seen.append(await coll.find_one({"_id": 3}, {"n": 1}))
    seen.append(await coll.find_one({"_id": "absent"}))
    seen.append(await coll.find({}, batch_size=2).sort("_id", -1).to_list())  # first batch, then getMores
    seen.append(await coll.count_documents({"tag": "even"}))
    by_tag = await coll.aggregate([{"$group": {"_id": "$tag", "total": {"$sum": "$n"}}}, {"$sort": {"_id": 1}}])
    seen.append(await by_tag.to_list())
    result = await coll.bulk_write([UpdateOne({"_id": 1}, {"$set": {"n": 10}}), InsertOne({"_id": 9})], ordered=False)
    seen.append((result.matched_count, result.modified_count, result.inserted_count))
    with pytest.raises(BulkWriteError) as failed:
        await coll.bulk_write([InsertOne({"_id": 2}), UpdateOne({"_id": 4}, {"$inc": {"n": 1}})], ordered=False)
    seen.append([(error["index"], error["code"]) for error in failed.value.details["writeErrors"]])
    seen.append(failed.value.details["nModified"])
    # Replies larger than our reader's buffer: one document, then a batch of them.
    blob = "b" * (3 * READ_BUFFER_SIZE)
    await coll.insert_many([{"_id": f"large-{i}", "blob": blob} for i in range(3)])
    seen.append(await coll.find_one({"_id": "large-1"}))
    seen.append(await coll.find({"_id": {"$regex": "^large-"}}).sort("_id", 1).to_list())
    await coll.drop()
    return seen


async def test_every_call_returns_what_pymongos_own_round_trip_returns(mongo_url: str, unique_name: str) -> None:
    results = {}
    for variant in VARIANTS:
        use(variant)
        # A client per variant: a connection keeps the reader it was made with (`core.mongo_protocol`).
        mongo: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, tz_aware=True, serverSelectionTimeoutMS=5000)
        try:
            results[variant] = await _session_of_calls(mongo, f"{unique_name}_{variant}")
            assert {type(protocol) for protocol in _protocols(mongo)} == {READERS[variant]}
        finally:
            await mongo.close()
    assert results["ours"] == results["pymongo"]
    assert results["ours"][0] == {"_id": 3, "n": 3}
    assert [doc["_id"] for doc in results["ours"][2]] == [6, 5, 4, 3, 2, 1, 0]
    assert len(results["ours"][-1]) == 3 and len(results["ours"][-1][0]["blob"]) == 3 * READ_BUFFER_SIZE


async def test_between_round_trips_our_reader_leaves_the_socket_registered(mongo_url: str, unique_name: str) -> None:
    """PyMongo's reader stops reading the socket after each reply and starts again with the next request (two
    system calls a round trip); ours keeps reading."""
    reading = {}
    for variant in VARIANTS:
        use(variant)
        mongo: AsyncMongoClient[Doc] = AsyncMongoClient(mongo_url, serverSelectionTimeoutMS=5000)
        try:
            coll = mongo["round_trip"][unique_name]
            await coll.insert_one({"_id": variant})
            for _ in range(3):
                assert await coll.find_one({"_id": variant}) == {"_id": variant}
            reading[variant] = {protocol.transport.is_reading() for protocol in _protocols(mongo)}
        finally:
            await mongo.close()
    assert reading == {"pymongo": {False}, "ours": {True}}


def _protocols(client: AsyncMongoClient[Doc]) -> list[Any]:
    """The wire protocols of the client's pooled (idle) connections."""
    return [conn.conn.get_conn for server in client._topology._servers.values() for conn in server.pool.conns]


async def _tasks_created(call: Callable[[], Awaitable[object]], times: int) -> int:
    loop = asyncio.get_running_loop()
    created = 0

    def counting_factory(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        nonlocal created
        created += 1
        return asyncio.Task(coro, loop=loop, **kwargs)

    previous = loop.get_task_factory()
    loop.set_task_factory(counting_factory)
    try:
        for _ in range(times):
            await call()
    finally:
        loop.set_task_factory(previous)
    return created


async def test_a_reply_is_awaited_without_a_new_task(client: AsyncMongoClient[Doc], unique_name: str) -> None:
    coll = client["round_trip"][unique_name]
    await coll.insert_one({"_id": "a"})
    created = {}
    for variant in VARIANTS:
        use(variant)
        await coll.find_one({"_id": "a"})  # a pooled connection, so that only the round trips are counted
        created[variant] = await _tasks_created(lambda: coll.find_one({"_id": "a"}), 20)
    assert created["ours"] == 0
    assert created["pymongo"] >= 40, created  # what the test would see if `install` did nothing
    await coll.drop()


class _Stopped:
    """The MongoDB-wire server frozen (SIGSTOP): connected, and answering nothing until resumed. Entered once the
    kernel reports it stopped, so that what the block sees is never a reply from before the freeze."""

    def __init__(self, server: MongoServer) -> None:
        assert server.pid is not None
        self._pid = server.pid

    def __enter__(self) -> None:
        os.kill(self._pid, signal.SIGSTOP)
        deadline = time.monotonic() + 5
        while (state := process_state(self._pid)) != "T":
            assert time.monotonic() < deadline, f"the server (pid {self._pid}) never stopped: state {state}"
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        os.kill(self._pid, signal.SIGCONT)


def process_state(pid: int) -> str:
    """The kernel's one-letter state of a process (T: stopped by a signal)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


async def _failure_of(call: Awaitable[object], within: float, server: MongoServer) -> tuple[str, float]:
    """(error class, seconds) of a call that must fail; a call that returns fails the test saying what it got."""
    started = time.monotonic()
    try:
        result = await asyncio.wait_for(call, within)
    except PyMongoError as exc:
        return type(exc).__name__, time.monotonic() - started
    assert server.pid is not None
    pytest.fail(
        f"core.mongo_round_trip installed: {_installed()}; the call returned {result!r} after "
        f"{time.monotonic() - started:.3f} s from a frozen server (its state now: {process_state(server.pid)})"
    )


def _installed() -> bool:
    return bool(vars(pool)["async_receive_message"] is mongo_round_trip.receive_message)


@pytest.mark.slow
async def test_timeouts_and_cancellations_end_a_wait_as_pymongos_own_round_trip_does(tmp_path: Path) -> None:
    server = MongoServer(tmp_path / "mongo", free_port())
    await asyncio.to_thread(server.start, 90)
    try:
        outcomes: dict[str, dict[str, Any]] = {}
        for variant in VARIANTS:
            use(variant)
            outcomes[variant] = await _stopped_server_outcomes(server, f"orders_{variant}")
        for variant, seen in outcomes.items():
            # A deadline (CSOT) ends the wait at the deadline, not at the next 0.5 s poll.
            assert seen["deadline"][1] < 0.25 + 0.4, (variant, seen)
            # A socket timeout (no operation deadline) ends it too.
            assert 0.5 <= seen["socket_timeout"][1] < 0.5 + 0.6, (variant, seen)
            # Without any timeout, the pool's cancellation ends it at the next 0.5 s check.
            assert seen["pool_cancelled"][1] < 0.5 + 0.4, (variant, seen)
        assert {k: v[0] for k, v in outcomes["ours"].items() if k != "cancelled"} == {
            k: v[0] for k, v in outcomes["pymongo"].items() if k != "cancelled"
        }
        assert outcomes["ours"]["cancelled"] == outcomes["pymongo"]["cancelled"] == "CancelledError, then served"
    finally:
        await asyncio.to_thread(server.stop)


async def _interrupt_pool(client: AsyncMongoClient[Doc]) -> None:
    """What PyMongo's monitor does when a heartbeat times out: reset the pool and cancel its connections' waits."""
    for server in client._topology._servers.values():
        await server.pool.reset(interrupt_connections=True)


async def _stopped_server_outcomes(server: MongoServer, collection: str) -> dict[str, Any]:
    """How a wait for a reply from the frozen server ends: (error class, seconds) per way it can end."""
    seen: dict[str, Any] = {}
    # No socket timeout, a slow heartbeat and no retried reads: only what is under test can end the wait.
    plain: AsyncMongoClient[Doc] = AsyncMongoClient(
        server.url, heartbeatFrequencyMS=60_000, connectTimeoutMS=60_000, retryReads=False
    )
    timed: AsyncMongoClient[Doc] = AsyncMongoClient(
        server.url, socketTimeoutMS=500, heartbeatFrequencyMS=60_000, retryReads=False
    )
    reset: AsyncMongoClient[Doc] = AsyncMongoClient(server.url, heartbeatFrequencyMS=60_000, retryReads=False)
    try:
        for mongo in (plain, timed, reset):
            await mongo["round_trip"][collection].insert_one({"_id": id(mongo)})
        with _Stopped(server):
            with pymongo.timeout(0.25):
                seen["deadline"] = await _failure_of(plain["round_trip"][collection].find_one({}), 10, server)
            seen["socket_timeout"] = await _failure_of(timed["round_trip"][collection].find_one({}), 10, server)
            # (A client of its own: a reset pool stays paused until the next heartbeat, a minute away.)
            interrupted = asyncio.create_task(_failure_of(reset["round_trip"][collection].find_one({}), 10, server))
            await asyncio.sleep(0.1)
            await _interrupt_pool(reset)
            seen["pool_cancelled"] = await interrupted
            waiting = asyncio.create_task(plain["round_trip"][collection].find_one({"_id": id(plain)}))
            await asyncio.sleep(0.3)
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
        found = await plain["round_trip"][collection].find_one({"_id": id(plain)})
        seen["cancelled"] = "CancelledError, then served" if found == {"_id": id(plain)} else f"then {found}"
    finally:
        for mongo in (plain, timed, reset):
            await mongo.close()
    return seen
