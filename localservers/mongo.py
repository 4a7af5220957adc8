"""The MongoDB wire server used in development and tests (SecantusDB) as a child process."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, ClassVar

from localservers.process import ServerStartError, find_binary, log_tail
from localservers.server import ServerProcess


class MongoServer(ServerProcess):
    """SecantusDB (`secantusd-py`), a MongoDB wire-protocol server over WiredTiger, with data in `data_dir`.

    A stand-in for `mongod` in development and tests only; the project's code is plain MongoDB code. It
    reports itself as a one-node replica set, hence `directConnection=true` in the URL.
    """

    name = "mongo"
    #: What our services are told when they use this server (`make dev`, the benchmarks): it is one Python process
    #: that works through requests one at a time, so a projector batch sends its MongoDB calls one after the other
    #: (sent at once they only contend for it; docs/performance.md, "Levers measured in one run").
    CLIENT_ENV: ClassVar[dict[str, str]] = {"CQRS_PROJECTOR_PARALLEL_MONGO_CALLS": "false"}

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
