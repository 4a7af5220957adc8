"""`cqrs dead-letters` ends every network wait within its `--timeout`, and says what failed without a traceback.

A store that stops answering after the tool connected (a half-open connection: the fault proxy's blackhole) must
fail the call that waits on it within the timeout, not hang the operator's terminal.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest
from pymongo.errors import PyMongoError

from cqrsctl import stores
from cqrsctl.dead_letters import EVENTS_AFTER, DeadLetters, connect_event_store
from cqrsctl.main import main
from tests.faults.proxy import FaultProxy

TIMEOUT = 1.0
# The wait ends at the timeout; the rest is the client noticing and the machine being busy.
ENDS_WITHIN = TIMEOUT + 4.0


@pytest.fixture
async def proxy_factory() -> AsyncIterator[list[FaultProxy]]:
    proxies: list[FaultProxy] = []
    yield proxies
    for proxy in proxies:
        await proxy.close()


async def _proxy(proxies: list[FaultProxy], url: str, name: str) -> tuple[FaultProxy, str]:
    """A proxy in front of the server of `url`, and `url` pointed at the proxy."""
    parts = urlsplit(url)
    assert parts.hostname is not None and parts.port is not None, f"a TCP address is needed: {url}"
    proxy = await FaultProxy(parts.hostname, parts.port, name=name).start()
    proxies.append(proxy)
    return proxy, url.replace(f"{parts.hostname}:{parts.port}", proxy.address, 1)


async def test_a_read_model_that_stops_answering_fails_the_call_within_the_timeout(
    mongo_url: str, unique_name: str, proxy_factory: list[FaultProxy], capsys: pytest.CaptureFixture[str]
) -> None:
    proxy, proxied = await _proxy(proxy_factory, mongo_url, "mongo")
    client = stores.bounded_mongo_client(proxied, TIMEOUT, "cqrs-dead-letters-test")
    try:
        await stores.ping_mongo(client, proxied, TIMEOUT)
        tool = DeadLetters(client[unique_name])
        assert await tool.print_list(as_json=False) == 0  # answers while the connection flows
        capsys.readouterr()
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(PyMongoError):
            await asyncio.wait_for(tool.print_list(as_json=False), timeout=30)
        assert time.monotonic() - started < ENDS_WITHIN
    finally:
        await client.close()


async def test_an_event_store_that_stops_answering_fails_the_statement_within_the_timeout(
    event_store_dsn: str, proxy_factory: list[FaultProxy]
) -> None:
    proxy, proxied = await _proxy(proxy_factory, event_store_dsn, "postgres")
    conn = await connect_event_store(proxied, TIMEOUT)
    try:
        assert await conn.fetch(EVENTS_AFTER, "order-none", 0) == []
        proxy.blackhole()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(conn.fetch(EVENTS_AFTER, "order-none", 0), timeout=30)
        assert time.monotonic() - started < ENDS_WITHIN
    finally:
        conn.terminate()


async def test_a_failure_after_connecting_is_one_line_on_stderr_and_exit_status_2(
    mongo_url: str, event_store_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["dead-letters", "--mongo-url", mongo_url, "--mongo-database", "read.model", "--dsn", event_store_dsn]
    assert await asyncio.to_thread(main, [*argv, "list"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cqrs dead-letters list: InvalidName: ") and "'.'" in err
    assert "Traceback" not in err
    assert await asyncio.to_thread(main, [*argv, "--timeout", "0", "list"]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err
