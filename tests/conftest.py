"""Session fixtures for the real servers the integration and end-to-end tests run against.

Each server comes from the environment when set (`TEST_POSTGRES_DSN`, `TEST_NATS_URL`, `TEST_MONGO_URL`),
otherwise it is started here on a free loopback port with its data in a temporary directory, and stopped at
the end of the session. A test never skips because a server is missing.

The first test that needs any server starts *every* server that some collected test needs, concurrently, so
the suite pays the start-up time once, in parallel; a run of unit tests starts nothing.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from core.logs import JsonFormatter
from localservers import (
    ExternalNatsServer,
    MongoServer,
    NatsHandle,
    NatsServer,
    PostgresServer,
    ServerProcess,
    free_port,
    stop_all,
)

_START_TIMEOUT = 90.0

# server kind -> (environment override, fixtures that need it)
_KINDS: dict[str, tuple[str, frozenset[str]]] = {
    "postgres": ("TEST_POSTGRES_DSN", frozenset({"postgres_dsn"})),
    "nats": ("TEST_NATS_URL", frozenset({"nats_server", "nats_url"})),
    "mongo": ("TEST_MONGO_URL", frozenset({"mongo_url"})),
}

_FACTORIES: dict[str, Callable[[Path, int], ServerProcess]] = {
    "postgres": PostgresServer,
    "nats": NatsServer,
    "mongo": MongoServer,
}


@pytest.fixture(autouse=True)
def _process_logging_restored() -> Iterator[None]:
    """A test that runs a command's `main` in this process (the `cqrs` CLI) configures logging for the whole
    process (`core.logs.configure_logging`): remove its handler and restore the root level and the record factory
    afterwards, so that later tests' records keep their logger's name and are not written to that test's closed
    capture stream (the drivers' loggers it quietens stay at WARNING)."""
    root = logging.getLogger()
    level, factory = root.level, logging.getLogRecordFactory()
    yield
    for handler in [h for h in root.handlers if isinstance(h.formatter, JsonFormatter)]:
        root.removeHandler(handler)
    root.setLevel(level)
    logging.setLogRecordFactory(factory)


def pytest_configure(config: pytest.Config) -> None:
    """Make SIGTERM (e.g. from `timeout`) end the session like Ctrl-C, so the server fixtures still stop.

    The servers run in their own process groups; without this, a terminated pytest would leave them running.
    """
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:

        def interrupt(signum: int, frame: object) -> None:
            raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

        signal.signal(signal.SIGTERM, interrupt)


class _ServerPool:
    """Starts the local servers in background threads and hands each one out when a fixture asks for it."""

    def __init__(self, base_dir: Path) -> None:
        self._base_dir = base_dir
        self._executor = ThreadPoolExecutor(max_workers=len(_KINDS), thread_name_prefix="test-server")
        self._futures: dict[str, Future[ServerProcess]] = {}

    @staticmethod
    def _start(server: ServerProcess) -> ServerProcess:
        server.start(timeout=_START_TIMEOUT)
        return server

    def prefetch(self, kind: str) -> None:
        """Begin starting `kind` in the background unless it comes from the environment or is on its way."""
        if os.environ.get(_KINDS[kind][0]) or kind in self._futures:
            return
        server = _FACTORIES[kind](self._base_dir / kind, free_port())
        self._futures[kind] = self._executor.submit(self._start, server)

    def get(self, kind: str) -> ServerProcess:
        """The running local server of this kind (started now if nobody asked for it before)."""
        self.prefetch(kind)
        return self._futures[kind].result(timeout=_START_TIMEOUT + 30)

    def close(self) -> None:
        """Stop every server that was started (message queue and databases last, as in production)."""
        started: list[ServerProcess] = []
        for kind in ("mongo", "nats", "postgres"):
            future = self._futures.get(kind)
            if future is None:
                continue
            try:
                started.append(future.result(timeout=_START_TIMEOUT + 30))
            except Exception:
                continue  # failed to start: it stopped itself, and the error was reported by its fixture
        errors = stop_all(started)
        # Only now: the servers were forked from these threads (their parent-death signal follows the thread).
        self._executor.shutdown(wait=True)
        if errors:
            raise RuntimeError(f"failed to stop test servers cleanly: {errors!r}")


@pytest.fixture(scope="session")
def _server_pool(request: pytest.FixtureRequest) -> Iterator[_ServerPool]:
    """Internal: start, in parallel, every server that any collected test needs."""
    # Not under pytest's basetemp: as root, PostgreSQL runs as another user that must traverse the parents, and
    # every pytest session resets /tmp/pytest-of-<user> to 0700 (which would break a concurrently running one).
    base_dir = Path(tempfile.mkdtemp(prefix="cqrs-test-servers-"))
    pool = _ServerPool(base_dir)
    needed = {name for item in request.session.items for name in getattr(item, "fixturenames", ())}
    try:
        for kind, (_, fixtures) in _KINDS.items():
            if needed & fixtures:
                pool.prefetch(kind)
        yield pool
    finally:
        try:
            pool.close()
        finally:
            shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_dsn(_server_pool: _ServerPool) -> str:
    """DSN of a PostgreSQL server (`TEST_POSTGRES_DSN`, or a local one with trust auth, user `postgres`)."""
    external = os.environ.get("TEST_POSTGRES_DSN")
    if external:
        return external
    server = _server_pool.get("postgres")
    assert isinstance(server, PostgresServer)
    return server.dsn


@pytest.fixture(scope="session")
def nats_server(_server_pool: _ServerPool) -> NatsHandle:
    """The NATS JetStream server: `.url`, and `.stop()`/`.start()`/`.outage()` to simulate an outage.

    With `TEST_NATS_URL` set, stop/start/outage raise RuntimeError: we cannot control an external server.
    A test that stops the server must restart it even when it fails (use `with nats_server.outage(): ...`).
    """
    external = os.environ.get("TEST_NATS_URL")
    if external:
        return ExternalNatsServer(external)
    server = _server_pool.get("nats")
    assert isinstance(server, NatsServer)
    return server


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsHandle) -> str:
    """Client URL of the NATS JetStream server."""
    return nats_server.url


@pytest.fixture(scope="session")
def mongo_url(_server_pool: _ServerPool) -> str:
    """MongoDB URL (`TEST_MONGO_URL`, or a local SecantusDB wire server with `directConnection=true`)."""
    external = os.environ.get("TEST_MONGO_URL")
    if external:
        return external
    server = _server_pool.get("mongo")
    assert isinstance(server, MongoServer)
    return server.url


@pytest.fixture
def unique_name() -> str:
    """A short name unique to this test (letter first, then 12 hex digits): databases, streams, subjects."""
    return f"t{uuid.uuid4().hex[:12]}"
