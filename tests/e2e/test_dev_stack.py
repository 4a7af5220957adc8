"""The README's quick start: `make dev` (`python -m cqrsctl.dev`) runs the whole system, and in a second terminal
every `cqrs` command works against it with no URL given; Ctrl-C stops everything.

One launcher on free ports and its own data folder, with every CQRS_* variable of the test's environment removed,
as on a fresh shell.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from localservers import free_port, port_is_free

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT = 240.0
CLI_TIMEOUT = 120.0
STOP_TIMEOUT = 90.0
READY_LINE = "The CQRS dev stack is running"


class Launcher:
    """`python -m cqrsctl.dev` as a child process whose output lines are collected by a thread."""

    def __init__(self, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cqrsctl.dev"], cwd=ROOT, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def output(self) -> str:
        return "\n".join(self.lines[-60:])

    def wait_for_line(self, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                pytest.fail(f"the launcher exited ({self.process.wait()}) before printing {text!r}:\n{self.output()}")
            if text in line:
                return
        pytest.fail(f"the launcher printed no {text!r} within {timeout:.0f}s:\n{self.output()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cqrsctl.main", *args], cwd=ROOT, env=env, text=True, capture_output=True,
        timeout=CLI_TIMEOUT, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_the_cli_works_against_make_dev_with_no_url_and_ctrl_c_stops_everything(tmp_path: Path) -> None:
    ports = {
        name: free_port()
        for name in ("postgres", "nats", "mongo", "command", "query", "command_metrics", "projector_metrics", "qm")
    }
    env = {name: value for name, value in os.environ.items() if not name.startswith("CQRS_")}
    env.update(
        {
            "CQRS_DEV_DATA_DIR": str(tmp_path / "data"),
            "CQRS_DEV_POSTGRES_PORT": str(ports["postgres"]),
            "CQRS_DEV_NATS_PORT": str(ports["nats"]),
            "CQRS_DEV_MONGO_PORT": str(ports["mongo"]),
            "CQRS_COMMAND_LISTEN": f"127.0.0.1:{ports['command']}",
            "CQRS_QUERY_LISTEN": f"127.0.0.1:{ports['query']}",
            "CQRS_COMMAND_METRICS_PORT": str(ports["command_metrics"]),
            "CQRS_PROJECTOR_METRICS_PORT": str(ports["projector_metrics"]),
            "CQRS_QUERY_METRICS_PORT": str(ports["qm"]),
            # what `cqrs demo` and `cqrs load` read; the server URLs are left to the tools' defaults
            "CQRS_COMMAND_ADDR": f"127.0.0.1:{ports['command']}",
            "CQRS_QUERY_ADDR": f"127.0.0.1:{ports['query']}",
        }
    )
    launcher = Launcher(env)
    try:
        launcher.wait_for_line(READY_LINE, START_TIMEOUT)

        demo = cli(env, "demo", "--orders", "3")
        assert demo.returncode == 0, f"cqrs demo failed:\n{demo.stdout}\n{demo.stderr}"

        migrate = cli(env, "migrate")
        assert (migrate.returncode, migrate.stdout.strip()) == (0, "event store schema is up to date"), migrate.stderr

        verify = cli(env, "verify", "--json", "--no-progress")
        assert verify.returncode == 0, f"cqrs verify against the dev stack:\n{verify.stdout}\n{verify.stderr}"
        report = json.loads(verify.stdout)
        assert report["clean"] is True and report["events_checked"] >= 3 * 4, report

        # the `cqrs status` line the launcher printed, with this stack's metrics ports
        hint = next(line for line in launcher.lines if "Replication lag and backlog:" in line)
        status_args = hint.split(":", 1)[1].split("(", 1)[0].split()
        assert status_args[:2] == ["cqrs", "status"] and str(ports["command_metrics"]) in hint, hint
        status = cli(env, *status_args[1:])
        assert status.returncode == 0, f"{hint}\n{status.stdout}\n{status.stderr}"
        assert status.stdout.count(" up") == 2, status.stdout  # the event store and the read model

        parked = cli(env, "dead-letters", "list")
        assert (parked.returncode, parked.stdout.strip()) == (0, "no parked streams"), parked.stderr

        generations = cli(env, "rebuild", "--status")
        assert generations.returncode == 0 and "live" in generations.stdout, generations.stderr

        launcher.process.send_signal(signal.SIGINT)
        assert launcher.process.wait(timeout=STOP_TIMEOUT) == 0, launcher.output()
        launcher.wait_for_line("dev stack stopped.", 5)
        busy = [name for name, port in ports.items() if not port_is_free("127.0.0.1", port)]
        assert not busy, f"still listening after Ctrl-C: {busy}\n{launcher.output()}"
    finally:
        launcher.kill()


def test_each_tool_names_the_server_it_cannot_reach_and_exits_2(postgres_dsn: str, nats_url: str) -> None:
    closed = {name: free_port() for name in ("postgres", "nats", "mongo")}
    env = {name: value for name, value in os.environ.items() if not name.startswith("CQRS_")}
    env.update({f"CQRS_DEV_{name.upper()}_PORT": str(port) for name, port in closed.items()})
    postgres = f"event store (PostgreSQL) at postgresql://postgres@127.0.0.1:{closed['postgres']}/postgres"
    mongo = f"read model (MongoDB) at mongodb://127.0.0.1:{closed['mongo']}/?directConnection=true"
    nats = f"stream (NATS JetStream) at nats://127.0.0.1:{closed['nats']}"
    reachable_postgres = {"CQRS_POSTGRES_DSN": postgres_dsn}  # verify reads PostgreSQL, then NATS, then MongoDB
    cases: list[tuple[tuple[str, ...], dict[str, str], str, str]] = [
        (("migrate",), {}, postgres, "CQRS_POSTGRES_DSN"),
        (("verify", "--no-progress", "--timeout", "5"), {}, postgres, "CQRS_POSTGRES_DSN"),
        (("verify", "--no-progress", "--timeout", "5"), reachable_postgres, nats, "CQRS_NATS_URL"),
        # MongoDB with each tool's default --timeout (10 s, 30 s): the ping gives up after 5 s whatever it is.
        (("verify", "--no-progress"), {**reachable_postgres, "CQRS_NATS_URL": nats_url}, mongo, "CQRS_MONGO_URL"),
        (("rebuild", "--status", "--timeout", "5"), {}, postgres, "CQRS_POSTGRES_DSN"),
        (("rebuild", "--status"), reachable_postgres, mongo, "CQRS_MONGO_URL"),
        (("dead-letters", "list"), {}, mongo, "CQRS_MONGO_URL"),
    ]
    for args, extra, named, variable in cases:
        began = time.monotonic()
        done = cli({**env, **extra}, *args)
        elapsed = time.monotonic() - began
        what = f"cqrs {' '.join(args)} with {sorted(extra)}"
        assert done.returncode == 2, f"{what}: exit {done.returncode}\n{done.stdout}\n{done.stderr}"
        assert f"cannot connect to the {named}" in done.stderr and variable in done.stderr, f"{what}: {done.stderr}"
        assert len(done.stderr.strip().splitlines()) == 1, f"{what} printed more than one line:\n{done.stderr}"
        assert elapsed < 15, f"{what} took {elapsed:.1f}s to give up (its network timeout is 5 s at most)"
