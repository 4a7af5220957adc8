"""Relay failover after a hard freeze: the active command_service replica is SIGSTOPped while holding the relay
lease (its TCP connections stay open, so PostgreSQL sees nothing wrong); a standby takes over within 30 s, and the
frozen one, resumed, steps down instead of fighting. Real subprocesses, real servers."""

from __future__ import annotations

import re
import signal
import time

import asyncpg
import pytest

from command_service.event_store import EventStore
from command_service.migrate import migrate
from command_service.relay_lease import RELAY_LOCK_KEY
from localservers import free_port
from tests.e2e.test_graceful_shutdown import Env, _spawn, _terminate, _wait_serving
from tests.support import create_database, eventually, registered_customer

pytestmark = pytest.mark.slow

LEASE_SECONDS = 4.0
FAILOVER_LIMIT_SECONDS = 30.0

_HOLDER = """SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
              WHERE l.locktype = 'advisory' AND l.granted AND ((l.classid::bigint << 32) | l.objid::bigint) = $1"""


async def _holder_pid(pool: asyncpg.Pool) -> int | None:
    name = await pool.fetchval(_HOLDER, RELAY_LOCK_KEY)
    match = re.search(r"pid=(\d+)", name or "")
    return int(match.group(1)) if match else None


async def _outbox_empty(pool: asyncpg.Pool) -> bool:
    return int(await pool.fetchval("SELECT count(*) FROM outbox")) == 0


@pytest.fixture
async def failover_env(postgres_dsn: str, nats_url: str, mongo_url: str, unique_name: str) -> Env:
    dsn = await create_database(postgres_dsn, unique_name)
    await migrate(dsn)
    return Env(dsn, nats_url, mongo_url, unique_name)


async def test_a_frozen_active_relay_loses_its_lease_to_a_standby_within_30s(failover_env: Env) -> None:
    env = failover_env
    pool = await asyncpg.create_pool(env.dsn, min_size=1, max_size=4)
    store = EventStore(pool)
    replicas = []
    try:
        for _ in range(2):
            port = free_port()
            proc = await _spawn(
                "command_service", {**env.command_env(port), "CQRS_RELAY_LEASE_SECONDS": str(LEASE_SECONDS)}
            )
            await _wait_serving(f"127.0.0.1:{port}", proc)
            replicas.append(proc)
        by_pid = {proc.pid: proc for proc in replicas}
        holder = await eventually(lambda: _holder_pid(pool), what="one replica holding the relay lease")
        assert holder in by_pid, f"lease held by an unknown process {holder}"
        await registered_customer(store)
        await eventually(lambda: _outbox_empty(pool), what="the first event relayed")

        for round_ in range(2):  # freeze whichever replica is active, twice: each one fails over to the other
            active = await eventually(lambda: _holder_pid(pool), what="an active relay")
            frozen = by_pid[active]
            frozen.send_signal(signal.SIGSTOP)
            try:
                frozen_at = time.monotonic()
                await registered_customer(store, name=f"after freeze {round_}")  # lands in the outbox
                await eventually(
                    lambda: _outbox_empty(pool),
                    what=f"the standby relaying while pid {active} is frozen (round {round_ + 1})",
                    timeout=FAILOVER_LIMIT_SECONDS,
                    interval=0.2,
                )
                took = time.monotonic() - frozen_at
                new_holder = await _holder_pid(pool)
                assert new_holder is not None and new_holder != active
            finally:
                frozen.send_signal(signal.SIGCONT)
            assert took < FAILOVER_LIMIT_SECONDS
            # The resumed replica steps down (its session is gone) and work still flows through one relay.
            await registered_customer(store, name=f"after resume {round_}")
            await eventually(lambda: _outbox_empty(pool), what="relaying after the frozen replica resumed")
            assert await _holder_pid(pool) == new_holder
        for proc in replicas:
            code, _, stderr = await _terminate(proc, timeout=20)
            assert code == 0, stderr
            assert "Traceback" not in stderr, stderr
    finally:
        for proc in replicas:
            if proc.returncode is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                await proc.wait()
        await store.close()
        await pool.close()
