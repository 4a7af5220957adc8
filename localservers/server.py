"""`ServerProcess`: one server binary (PostgreSQL, NATS, MongoDB wire server) run as a child process.

Every server is started from a pip-installed binary as its *own process* (never imported into ours), listens on
loopback only, keeps its data in a directory we choose, writes its output to a log file next to that directory,
and is stopped with a bounded wait.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from localservers.ports import LOOPBACK, port_is_free, wait_for_port
from localservers.process import ChildProcess, ServerStartError


class ServerProcess(ChildProcess):
    """One server binary run as a child process, with one start/stop/wait implementation for all of them.

    Subclasses give the command line (`command`) and may prepare the data directory (`prepare`), run extra
    readiness checks after the port is open (`wait_ready`) and add `subprocess.Popen` arguments
    (`popen_kwargs`). The log file is `<data_dir's parent>/<name>.log`, appended to across restarts.

    The process runs in its own session and gets `stop_signal` if our process dies without stopping it
    (see `with_parent_death_signal`), so neither a Ctrl-C nor a killed owner leaves it half-handled.
    """

    name = "server"
    log_path: Path

    def __init__(self, data_dir: Path, port: int, host: str = LOOPBACK) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.host = host
        super().__init__(self.data_dir.parent / f"{self.name}.log")
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- hooks for subclasses

    def command(self) -> list[str]:
        """The command line that runs the server in the foreground."""
        raise NotImplementedError

    def prepare(self) -> None:
        """Create/initialise the data directory before the first start (default: just create it)."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def wait_ready(self, deadline: float) -> None:
        """Extra readiness check once the port accepts connections, finished before `deadline` (monotonic)."""

    def popen_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for `subprocess.Popen` (e.g. the user to run as)."""
        return {}

    # ----------------------------------------------------------------- lifecycle

    @property
    def address(self) -> str:
        """`host:port` of the server."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The URL clients connect with."""
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> None:
        """Start the server and return once it accepts real requests; on failure stop it and raise.

        Raises `ServerStartError` naming the server, its exit code and its log tail.
        """
        with self._lock:
            if self.running:
                raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
            deadline = time.monotonic() + timeout
            if not port_is_free(self.host, self.port):
                raise ServerStartError(f"cannot start {self.name}: {self.address} is already in use")
            self.prepare()
            header = f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name} ===\n"
            process = self._spawn(self.command(), header, **self.popen_kwargs())
            try:
                wait_for_port(
                    self.host,
                    self.port,
                    max(0.0, deadline - time.monotonic()),
                    f"{self.name} (pid {process.pid})",
                    process=process,
                    log_path=self.log_path,
                )
                self.wait_ready(deadline)
            except BaseException:
                self._terminate(timeout=10.0)
                raise

    def stop(self, timeout: float = 20.0) -> None:
        """Ask the server to shut down cleanly; kill it if it has not exited after `timeout` seconds.

        Safe to call when it is not running.
        """
        with self._lock:
            self._terminate(timeout)

    def kill(self) -> None:
        """SIGKILL the server and its whole process group at once, as a crash would (fault-injection tests);
        `start()` brings it back on the same port and data. Safe to call when it is not running."""
        with self._lock:
            if self.running:
                self.send_signal(signal.SIGKILL, group=True)
                self.wait(10.0)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.address} {state} data={self.data_dir}>"


def stop_all(servers: Sequence[ServerProcess], timeout: float = 20.0) -> list[BaseException]:
    """Stop servers in the given order, continuing past failures; return the errors met (empty when clean)."""
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.stop(timeout)
        except Exception as exc:
            errors.append(exc)
    return errors
