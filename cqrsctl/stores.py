"""Where the `cqrs` tools find PostgreSQL, NATS and MongoDB, and the one error they give when they cannot reach one.

Each address is the services' own variable (CQRS_POSTGRES_DSN, CQRS_NATS_URL, CQRS_MONGO_URL) when it is set, else
the local stack `make dev` starts (its ports from CQRS_DEV_POSTGRES_PORT, CQRS_DEV_NATS_PORT, CQRS_DEV_MONGO_PORT),
as the CLI's gRPC and metrics addresses default to that stack too: right after `make dev`, `cqrs verify` audits it,
and in a deployment the variables name the real servers.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import nats
import pymongo
from nats.aio.client import Client as NatsClient
from pymongo import AsyncMongoClient

from core.error_text import describe_error
from core.jetstream import nats_servers
from core.write_concern import DEFAULT_WRITE_CONCERN, as_w, is_write_concern

DEV_HOST: Final = "127.0.0.1"
# A MongoDB ping answers in milliseconds; against a closed or silent address PyMongo keeps selecting a server for the
# client's whole timeout (a tool's --timeout: 10 s for verify, 30 s for rebuild) before it says so.
MONGO_PING_TIMEOUT_SECONDS: Final = 5.0


def env_int(name: str, default: int) -> int:
    """The integer in variable `name` (unset or blank: `default`); anything else ends the program, saying so."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"{name} must be a port number, got {value!r}") from None


@dataclass(frozen=True, slots=True)
class Store:
    """One of the three servers: what to call it, the variable naming it, and where `make dev` runs it."""

    label: str  # what an error message calls it
    variable: str  # the services' variable with its URL
    dev_port_variable: str
    default_dev_port: int
    dev_url_format: str  # the dev stack's URL, with {host} and {port}

    def dev_port(self) -> int:
        """The port `make dev` runs this server on (its CQRS_DEV_*_PORT, else the default)."""
        return env_int(self.dev_port_variable, self.default_dev_port)

    def dev_url(self) -> str:
        return self.dev_url_format.format(host=DEV_HOST, port=self.dev_port())


POSTGRES: Final = Store(
    "event store (PostgreSQL)",
    "CQRS_POSTGRES_DSN",
    "CQRS_DEV_POSTGRES_PORT",
    55432,
    "postgresql://postgres@{host}:{port}/postgres",
)
NATS: Final = Store("stream (NATS JetStream)", "CQRS_NATS_URL", "CQRS_DEV_NATS_PORT", 54222, "nats://{host}:{port}")
MONGO: Final = Store(
    "read model (MongoDB)",
    "CQRS_MONGO_URL",
    "CQRS_DEV_MONGO_PORT",
    57017,
    "mongodb://{host}:{port}/?directConnection=true",
)


# Each variable spelled out, so the deployment tests can see which ones the CLI reads.


def postgres_dsn() -> str:
    """CQRS_POSTGRES_DSN, else the `make dev` stack's PostgreSQL."""
    return os.environ.get("CQRS_POSTGRES_DSN", "").strip() or POSTGRES.dev_url()


def nats_url() -> str:
    """CQRS_NATS_URL, else the `make dev` stack's NATS."""
    return os.environ.get("CQRS_NATS_URL", "").strip() or NATS.dev_url()


def mongo_url() -> str:
    """CQRS_MONGO_URL, else the `make dev` stack's MongoDB-wire server."""
    return os.environ.get("CQRS_MONGO_URL", "").strip() or MONGO.dev_url()


def mongo_write_concern() -> int | str:
    """CQRS_MONGO_WRITE_CONCERN as the projector reads it ("majority" unless set), as PyMongo's `w`: a tool's
    writes to the read model must be as durable as the projector's (a failover must not roll a repair back)."""
    value = os.environ.get("CQRS_MONGO_WRITE_CONCERN", "").strip() or DEFAULT_WRITE_CONCERN
    if not is_write_concern(value):
        raise SystemExit(f"CQRS_MONGO_WRITE_CONCERN must be 'majority' or a number of members, got {value!r}")
    return as_w(value)


def redact(url: str) -> str:
    """The URL with any password replaced by `***`, for printing."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class StoreUnreachable(Exception):
    """A tool could not connect to one of the servers; the message names it, its URL and the variable to set."""

    def __init__(self, store: Store, url: str, cause: BaseException) -> None:
        super().__init__(
            f"cannot connect to the {store.label} at {redact(url)}: {describe_error(cause)}"
            f" (its URL comes from {store.variable}, else the `make dev` stack's port)"
        )


@contextlib.contextmanager
def connecting(store: Store, url: str) -> Iterator[None]:
    """Turns any failure of the connection set-up inside into `StoreUnreachable` for `store`."""
    try:
        yield
    except Exception as exc:
        raise StoreUnreachable(store, url, exc) from exc


def bounded_mongo_client(url: str, timeout: float, appname: str, **options: Any) -> AsyncMongoClient[Any]:
    """A client whose every wait ends within `timeout` seconds: server selection, connecting, and each reply (a
    cursor's getMore included, without bounding how long the cursor lives). `options`: more client options.

    Its writes are journaled and use the projector's write concern (`mongo_write_concern`): what a tool reports
    written to the read model (a rebuild, a repair, a resumed or skipped stream) must survive a crash of MongoDB, or
    a failover, right after it said so."""
    ms = int(timeout * 1000)
    return AsyncMongoClient(
        url, appname=appname, tz_aware=True, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, socketTimeoutMS=ms,
        **{"journal": True, "w": mongo_write_concern(), **options},
    )  # fmt: skip


async def ping_mongo(client: AsyncMongoClient[Any], url: str, timeout: float) -> None:
    """Makes the client's first round trip (PyMongo connects lazily) within `timeout` seconds, 5 at most, as
    `StoreUnreachable` when it fails."""
    with connecting(MONGO, url), pymongo.timeout(min(timeout, MONGO_PING_TIMEOUT_SECONDS)):
        await client.admin.command("ping")


async def connect_nats(url: str, *, timeout: float, name: str) -> NatsClient:
    """A connection that gives up after trying each server twice, a second apart (nats-py retries a first connect
    60 times, 2 s apart, logging each failure), naming the last connection error when it does."""
    failures: list[Exception] = []

    async def remember(exc: Exception) -> None:
        failures.append(exc)

    try:
        return await nats.connect(
            nats_servers(url), connect_timeout=timeout, allow_reconnect=False, max_reconnect_attempts=1,
            reconnect_time_wait=1, error_cb=remember, name=name,
        )  # fmt: skip
    except Exception as exc:
        raise StoreUnreachable(NATS, url, failures[-1] if failures else exc) from exc
