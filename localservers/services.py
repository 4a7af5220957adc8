"""One launcher for our own processes (`python -m command_service`, `projector`, `query_service`, bench helpers).

`make dev`, the benchmark and the fault-injection tests all start a service the same way: `python -m <module>` in
its own session, configured only by the environment it is given, its output appended to a log file (or handed
line by line to a callback), readiness meaning "its gRPC port accepts connections", and a stop that is SIGTERM
(graceful) and then SIGKILL of its process group once the grace is over.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from localservers.ports import split_address, wait_for_port
from localservers.process import ChildProcess, ServerStartError

SERVICE_READY_TIMEOUT = 60.0
SERVICE_STOP_TIMEOUT = 15.0


class ServiceProcess(ChildProcess):
    """One of our services (or any `python -m` module) as a child process.

    `listen` is the gRPC address `wait_ready` waits for (None for a service without a port, like the projector).
    Output goes to `log_path` (appended to, each start announced by a header line), or to `on_line`, or to our
    own stdout/stderr. `death_signal` is what the child gets if we die without stopping it.
    """

    def __init__(
        self,
        name: str,
        module: str | None = None,
        *,
        args: Sequence[str] = (),
        listen: str | None = None,
        log_path: Path | None = None,
        on_line: Callable[[str], None] | None = None,
        cwd: Path | None = None,
        death_signal: signal.Signals = signal.SIGTERM,
    ) -> None:
        super().__init__(log_path, death_signal)
        self.name = name
        self.module = module or name
        self.args = list(args)
        self.listen = listen
        self.cwd = cwd
        self._on_line = on_line
        #: How many times it was started.
        self.starts = 0

    def start(self, env: Mapping[str, str], *, note: str = "") -> None:
        """Start it (again) with exactly the environment `env`; returns at once (see `wait_ready`).

        `note` goes into the log's header line for this start (e.g. the failpoints armed for it).
        """
        if self.running:
            raise RuntimeError(f"{self.name} is already running (pid {self.pid})")
        self.starts += 1
        header = f"\n=== start #{self.starts} of {self.module} {note} ===\n"
        command = [sys.executable, "-m", self.module, *self.args]
        self._spawn(command, header, self._on_line, env=dict(env), cwd=self.cwd)

    def wait_ready(self, timeout: float = SERVICE_READY_TIMEOUT, *, also: str | None = None) -> None:
        """Wait until its `listen` port accepts connections (at once without one), and the address `also` when
        given (e.g. its metrics port: the projector has no other); on failure stop it and raise
        `ServerStartError` with its exit code or the timeout, and its log tail."""
        if self._process is None:
            return
        what = f"{self.name} (pid {self._process.pid})"
        deadline = time.monotonic() + timeout
        try:
            for address in (self.listen, also):
                if address is not None:
                    host, port = split_address(address)
                    left = max(0.0, deadline - time.monotonic())
                    wait_for_port(host, port, left, what, process=self._process, log_path=self.log_path)
        except ServerStartError:
            self.stop(timeout=10.0)
            raise

    # ------------------------------------------------------------------------------------ signals

    def terminate(self) -> None:
        """Ask for a graceful shutdown (SIGTERM) without waiting; a paused process is continued first."""
        self.send_signal(signal.SIGCONT)
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL its whole process group, as a crash would; does not wait (see `wait`/`async_wait`)."""
        self.send_signal(signal.SIGKILL, group=True)

    def pause(self) -> None:
        """SIGSTOP: the process freezes (a stalled process, for fault tests) until `resume`."""
        self.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause`; harmless when it is not paused or has exited."""
        self.send_signal(signal.SIGCONT)

    # ------------------------------------------------------------------------------------ stopping

    def stop(self, timeout: float = SERVICE_STOP_TIMEOUT) -> bool:
        """SIGTERM, then SIGKILL of its process group after `timeout` seconds; False when it had to be killed.

        Safe to call when it is not running.
        """
        self.send_signal(signal.SIGCONT)  # a paused process would never act on SIGTERM
        return self._terminate(timeout)

    def wait_or_kill(self, deadline: float) -> bool:
        """Wait for it to exit until `deadline` (monotonic), then SIGKILL its group; False when it was killed."""
        try:
            self.wait(max(0.0, deadline - time.monotonic()))
            return True
        except subprocess.TimeoutExpired:
            self.kill()
            self.wait(10.0)
            return False

    async def async_wait(self, timeout: float) -> int:
        """`wait` for asyncio code: polls without blocking the event loop; raises `TimeoutError`."""
        deadline = time.monotonic() + timeout
        while (code := self.returncode) is None:
            if self._process is None:
                raise RuntimeError(f"{self.name} was never started")
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{self.name} (pid {self.pid}) still running after {timeout}s")
            await asyncio.sleep(0.02)
        return code

    async def async_stop(self, timeout: float = SERVICE_STOP_TIMEOUT) -> None:
        """`stop` for asyncio code."""
        if not self.running:
            return
        self.terminate()
        try:
            await self.async_wait(timeout)
        except TimeoutError:
            self.kill()
            await self.async_wait(10.0)


def stop_services(services: Sequence[ServiceProcess], timeout: float = SERVICE_STOP_TIMEOUT) -> list[str]:
    """SIGTERM every running service at once, give them `timeout` seconds together, then SIGKILL the rest.

    Returns the names of those that had to be killed.
    """
    for service in services:
        service.terminate()
    deadline = time.monotonic() + timeout
    return [service.name for service in services if not service.wait_or_kill(deadline)]
