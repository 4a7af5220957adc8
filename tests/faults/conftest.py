"""Fixtures of the fault-injection scenarios: each scenario gets its own PostgreSQL, NATS and MongoDB servers.

These scenarios kill, pause and cut off the servers, so they never use the shared session servers of
`tests/conftest.py` (nor `TEST_*_URL` servers, which we could not kill): every `stack` starts dedicated ones from
`localservers` on free ports with data in a temporary directory, and stops them afterwards.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator, Generator
from pathlib import Path

import pytest

from tests.faults.stack import FaultStack


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


@pytest.fixture
async def stack(request: pytest.FixtureRequest) -> AsyncIterator[FaultStack]:
    """Dedicated servers (started concurrently, schema migrated) for one scenario; services are added by it.
    Parametrized indirectly, the parameter is the number of NATS nodes (a JetStream cluster when above 1)."""
    async with _dedicated_stack(request, nats_nodes=getattr(request, "param", 1)) as fault_stack:
        yield fault_stack


@pytest.fixture
async def cluster_stack(request: pytest.FixtureRequest) -> AsyncIterator[FaultStack]:
    """Like `stack`, with a 3-node JetStream cluster (`nats_nodes`) in place of the single nats-server."""
    async with _dedicated_stack(request, nats_nodes=3) as fault_stack:
        yield fault_stack


@contextlib.asynccontextmanager
async def _dedicated_stack(request: pytest.FixtureRequest, *, nats_nodes: int = 1) -> AsyncIterator[FaultStack]:
    # Not under pytest's basetemp: as root, PostgreSQL runs as another user that must traverse the parents.
    base = Path(tempfile.mkdtemp(prefix="cqrs-faults-"))
    fault_stack = FaultStack(base, f"f{uuid.uuid4().hex[:10]}", nats_nodes=nats_nodes)
    try:
        await fault_stack.start_servers()
        yield fault_stack
    finally:
        failed = request.node.stash.get(_FAILED, True)
        if failed:
            print(f"\n===== logs of {request.node.name} (kept in {base}) =====\n{fault_stack.diagnostics()}")
        await fault_stack.close()
        if not failed:
            shutil.rmtree(base, ignore_errors=True)
