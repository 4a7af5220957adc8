"""The server fixtures give reachable, correctly configured servers, and the launchers' helpers behave."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import nats
import pytest
from nats.js.api import StorageType, StreamConfig
from pymongo import AsyncMongoClient

from localservers import (
    ChildProcess,
    NatsHandle,
    NatsServer,
    RunAs,
    ServerStartError,
    ServiceProcess,
    ephemeral_range_start,
    free_port,
    launch_command,
    port_is_free,
    ports,
    wait_for_port,
    with_parent_death_signal,
)


async def test_postgres_accepts_queries_with_durable_commits(postgres_dsn: str) -> None:
    conn = await asyncpg.connect(postgres_dsn, timeout=10)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert await conn.fetchval("SHOW synchronous_commit") == "on"
        assert await conn.fetchval("SHOW fsync") == "on"
    finally:
        await conn.close(timeout=5)


async def test_nats_has_jetstream(nats_server: NatsHandle, nats_url: str) -> None:
    assert nats_url == nats_server.url
    nc = await nats.connect(nats_url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        info = await nc.jetstream(timeout=5).account_info()
        assert info.limits is not None
    finally:
        await nc.close()


async def test_mongo_answers_ping(mongo_url: str, unique_name: str) -> None:
    client: AsyncMongoClient[dict[str, object]] = AsyncMongoClient(mongo_url, serverSelectionTimeoutMS=10_000)
    try:
        assert (await client.admin.command("ping"))["ok"] == 1
        collection = client[unique_name]["probe"]
        await collection.insert_one({"_id": 1, "v": 1})
        assert await collection.find_one({"_id": 1}) == {"_id": 1, "v": 1}
        await client.drop_database(unique_name)
    finally:
        await client.close()


def test_unique_name_is_short_and_fresh(unique_name: str) -> None:
    assert unique_name[0].isalpha() and unique_name.isalnum() and len(unique_name) <= 13


async def _publish(url: str, stream: str, count: int) -> None:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=5)
        await js.add_stream(StreamConfig(name=stream, subjects=[f"{stream}.>"], storage=StorageType.FILE))
        for i in range(count):
            await js.publish(f"{stream}.x", str(i).encode(), headers={"Nats-Msg-Id": f"m{i}"})
    finally:
        await nc.close()


async def _stored(url: str, stream: str) -> tuple[int, bytes]:
    nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=0)
    try:
        js = nc.jetstream(timeout=5)
        info = await js.stream_info(stream)
        first = await js.get_msg(stream, seq=1)
        return info.state.messages, first.data or b""
    finally:
        await nc.close()


@pytest.mark.slow
async def test_nats_restart_on_same_port_keeps_stream(tmp_path: Path, unique_name: str) -> None:
    # Its own server, so the outage does not disturb the session's (which may also be external).
    server = NatsServer(tmp_path / "nats", free_port())
    await asyncio.to_thread(server.start)
    try:
        await _publish(server.url, unique_name, 5)
        url_before = server.url
        await asyncio.to_thread(server.stop)
        assert not server.running
        with pytest.raises(OSError):
            socket.create_connection((server.host, server.port), timeout=1).close()
        await asyncio.to_thread(server.start)
        assert server.url == url_before
        assert await _stored(server.url, unique_name) == (5, b"0")
    finally:
        await asyncio.to_thread(server.stop)


def test_free_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice() -> None:
    # Outgoing connections take their local ports from the ephemeral range: a listening port picked there can be
    # taken by a connection before its server binds it (a NATS cluster node once failed to start that way).
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    assert all(port < ephemeral_range_start() for port in ports)
    assert all(port_is_free("127.0.0.1", port) for port in ports)


def test_free_port_reads_the_kernels_range_and_lets_the_os_pick_when_nothing_lies_below_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    range_file = tmp_path / "ip_local_port_range"
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE_FILE", range_file)
    assert ephemeral_range_start() == ports.FALLBACK_EPHEMERAL_START  # unreadable: Linux's default
    range_file.write_text("10050\t60999\n")
    assert ephemeral_range_start() == 10050
    # Fewer than a pick's attempts between the lowest listening port and the range: the OS chooses (port 0).
    picked = {free_port() for _ in range(20)}
    assert all(port_is_free("127.0.0.1", port) for port in picked)
    assert any(port >= 10050 for port in picked)


def test_wait_for_port_names_what_it_waited_for() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(ServerStartError, match=rf"the probe server to listen on 127\.0\.0\.1:{port}"):
        wait_for_port("127.0.0.1", port, 0.3, "the probe server")
    assert time.monotonic() - started < 5


def test_wait_for_port_reports_a_dead_process_with_its_log(tmp_path: Path) -> None:
    log = tmp_path / "dead.log"
    log.write_text("boom: bad flag\n")
    process = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    process.wait(timeout=30)
    with pytest.raises(ServerStartError, match=r"(?s)exited with code 3.*boom: bad flag"):
        wait_for_port("127.0.0.1", free_port(), 30, "dead server", process=process, log_path=log)


def test_start_refuses_a_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        server = NatsServer(tmp_path / "nats", busy.getsockname()[1])
        with pytest.raises(ServerStartError, match="already in use"):
            server.start(timeout=5)
        assert not server.running


@pytest.mark.skipif(with_parent_death_signal(["x"], signal.SIGTERM) == ["x"], reason="needs Linux setpriv")
@pytest.mark.parametrize("server_class", ["NatsServer", "PostgresServer"])  # postgres: as another user under root
def test_a_server_stops_when_its_owner_is_killed(tmp_path: Path, server_class: str) -> None:
    port = free_port()
    owner = f"""
import os
from pathlib import Path
from localservers import {server_class}
{server_class}(Path({str(tmp_path)!r}) / "data", {port}).start()
os.kill(os.getpid(), 9)  # dies without stopping it
"""
    result = subprocess.run([sys.executable, "-c", owner], timeout=120, check=False, capture_output=True)
    assert result.returncode == -signal.SIGKILL, f"the owner did not start {server_class}: {result.stderr.decode()}"
    deadline = time.monotonic() + 15
    while not port_is_free("127.0.0.1", port):
        assert time.monotonic() < deadline, f"{server_class} on port {port} outlived the process that started it"
        time.sleep(0.05)


def test_the_service_launcher_waits_for_the_port_logs_and_stops_with_sigterm(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "http.log"
    service = ServiceProcess(
        "http", "http.server", args=["--bind", "127.0.0.1", str(port)], listen=f"127.0.0.1:{port}", log_path=log
    )
    service.start(os.environ, note="probe")
    try:
        service.wait_ready(30)
        assert service.running and not port_is_free("127.0.0.1", port)
        service.pause()
        service.resume()
    finally:
        assert service.stop(timeout=10), "http.server ignored SIGTERM"
    assert service.returncode == -signal.SIGTERM
    assert "=== start #1 of http.server probe ===" in log.read_text()


def test_the_service_launcher_reports_a_service_that_exits_while_starting(tmp_path: Path) -> None:
    service = ServiceProcess(
        "broken", "no_such_module_here", listen=f"127.0.0.1:{free_port()}", log_path=tmp_path / "b.log"
    )
    service.start(os.environ)
    with pytest.raises(ServerStartError, match=r"(?s)broken \(pid \d+\) exited with code 1.*No module named"):
        service.wait_ready(30)


async def test_the_service_launcher_hands_output_lines_over_and_waits_without_blocking() -> None:
    lines: list[str] = []
    service = ServiceProcess("zen", "this", on_line=lines.append)
    service.start(os.environ)
    assert await service.async_wait(30) == 0
    service.wait(5)  # joins the output pump
    assert lines[0] == "The Zen of Python, by Tim Peters"


AS_ROOT_WITH_SETPRIV = pytest.mark.skipif(
    os.geteuid() != 0 or with_parent_death_signal(["x"], signal.SIGTERM) == ["x"],
    reason="switching users needs root and Linux setpriv",
)


def _nobody() -> RunAs:
    import pwd

    entry = pwd.getpwnam("nobody")
    return RunAs(entry.pw_uid, entry.pw_gid)


@AS_ROOT_WITH_SETPRIV
def test_a_child_runs_as_the_user_asked_for_with_no_other_groups() -> None:
    nobody = _nobody()
    command, identity = launch_command(["sh", "-c", "id -u; id -g; id -G"], death_signal=signal.SIGTERM, run_as=nobody)
    assert identity == {}  # setpriv switches the user, so Popen is free to use vfork
    out = subprocess.run(command, capture_output=True, check=True, timeout=10).stdout.decode().split("\n")
    assert out[:3] == [str(nobody.uid), str(nobody.gid), str(nobody.gid)]


@AS_ROOT_WITH_SETPRIV
async def test_children_started_as_another_user_survive_grpc_calls_in_flight(tmp_path: Path) -> None:
    """A fork of a process with gRPC running runs gRPC's fork handlers in the child, whose threads crashed it
    (SIGSEGV, sometimes SIGABRT) before its exec in about 4 starts in 10 here: postgres restarted as root in a
    test died so. Children that switch user through setpriv start with vfork and run none of them."""
    import grpc
    from grpc import aio

    server = aio.server()
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    stop = asyncio.Event()

    async def calls_in_flight() -> None:
        async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/probe.Probe/Nothing", None, None)
            while not stop.is_set():
                with contextlib.suppress(grpc.RpcError):
                    await call(b"", timeout=1)

    def start_and_wait(child: ChildProcess) -> int:
        child._spawn(["true"], header="")
        code = child.wait(10)
        assert code is not None
        return code

    callers = [asyncio.create_task(calls_in_flight()) for _ in range(4)]
    try:
        child = ChildProcess(tmp_path / "child.log", run_as=_nobody())
        codes = [await asyncio.to_thread(start_and_wait, child) for _ in range(200)]
    finally:
        stop.set()
        await asyncio.gather(*callers)
        await server.stop(None)
    assert codes == [0] * 200, f"exit codes other than 0: {sorted(set(codes) - {0})}"
