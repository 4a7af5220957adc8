"""The projector's MongoDB client against the real MongoDB-wire server: its writes are not retryable writes unless
`CQRS_MONGO_RETRY_WRITES` says so (a retryable write carries a `txnNumber`, and the server then keeps a record of
it), and they stay journaled with the configured write concern. The `cqrs` tools' client journals its writes too,
with the same write concern (rebuild, verify --repair, dead-letters retry and skip write the read model)."""

from __future__ import annotations

import pytest

from cqrsctl.stores import bounded_mongo_client
from projector.config import ProjectorSettings
from projector.mongo_client import read_model_client
from tests.support import StartedCommands


@pytest.mark.parametrize("retry_writes", [False, True])
async def test_projector_writes_are_retryable_only_when_configured(
    mongo_url: str, unique_name: str, retry_writes: bool
) -> None:
    settings = ProjectorSettings(mongo_url=mongo_url, mongo_write_concern="1", mongo_retry_writes=retry_writes)
    log = StartedCommands(session_fields=True)
    client = read_model_client(settings, "projector-test", event_listeners=[log])
    try:
        collection = client[unique_name]["things"]
        await collection.insert_one({"_id": "a", "n": 1})
        await collection.update_one({"_id": "a"}, {"$inc": {"n": 1}})
        assert await collection.find_one({"_id": "a"}) == {"_id": "a", "n": 2}
    finally:
        await client.drop_database(unique_name)
        await client.close()
    writes = [command for name, command in log.commands if name in {"insert", "update"}]
    assert len(writes) == 2
    assert all(("txnNumber" in command) is retry_writes for command in writes), writes
    assert all(command["writeConcern"] == {"w": 1, "j": True} for command in writes), writes


@pytest.mark.parametrize(("variable", "expected"), [(None, "majority"), ("1", 1), ("majority", "majority")])
async def test_the_tools_write_the_read_model_journaled_with_the_projectors_write_concern(
    mongo_url: str, unique_name: str, monkeypatch: pytest.MonkeyPatch, variable: str | None, expected: int | str
) -> None:
    if variable is None:
        monkeypatch.delenv("CQRS_MONGO_WRITE_CONCERN", raising=False)
    else:
        monkeypatch.setenv("CQRS_MONGO_WRITE_CONCERN", variable)
    log = StartedCommands()
    client = bounded_mongo_client(mongo_url, 5.0, "cqrs-tool-test", event_listeners=[log])
    try:
        collection = client[unique_name]["things"]
        await collection.replace_one({"_id": "a"}, {"n": 1}, upsert=True)
        await collection.delete_one({"_id": "a"})
    finally:
        await client.drop_database(unique_name)
        await client.close()
    writes = [command for name, command in log.commands if name in {"update", "delete"}]
    assert len(writes) == 2, writes
    assert all(command.get("writeConcern") == {"w": expected, "j": True} for command in writes), writes


def test_a_tool_refuses_a_write_concern_the_projector_would_refuse(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQRS_MONGO_WRITE_CONCERN", "all")
    refusal = "CQRS_MONGO_WRITE_CONCERN must be 'majority' or a number of members, got 'all'"
    with pytest.raises(SystemExit, match=refusal):
        bounded_mongo_client("mongodb://127.0.0.1:1", 1.0, "cqrs-tool-test")
