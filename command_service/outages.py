"""Which PostgreSQL driver errors mean "the event store is unreachable right now" (retryable: UNAVAILABLE).

One classification for every caller (the gRPC runner through `EventStore`, the relay, the health probe), so a
new way for a connection to die is taught once. A crash or restart of PostgreSQL surfaces in many shapes,
depending on where the client was when the socket went: a refused or reset socket (OSError), a timeout, the
server's own "terminating connection" (57P01 and the rest of class 57), a connection-class error (class 08), a
closed connection (InterfaceError), and asyncpg's `InternalClientError` ("cannot switch to state 12; another
operation is in progress") when a query lands between the server's goodbye and the socket closing. A server that
is up but refusing work (too many connections, out of resources, read-only after a failover) is an outage too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import asyncpg

from core.errors import DependencyUnavailable

CONNECTION_LOST: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08: connection exceptions
    asyncpg.OperatorInterventionError,  # class 57: admin/crash shutdown, cannot connect now, statement canceled
    asyncpg.InsufficientResourcesError,  # class 53: too many connections, disk full, out of memory
    asyncpg.ReadOnlySQLTransactionError,  # a primary demoted by a failover still answering
    asyncpg.InterfaceError,  # "connection is closed", "connection was closed in the middle of operation"
    asyncpg.InternalClientError,  # protocol state broken by a connection dying mid-operation
)

EVENT_STORE = "event store (PostgreSQL)"  # what a caller is told is down (never where it runs)


def is_connection_lost(exc: BaseException) -> bool:
    """True when `exc` means PostgreSQL cannot be reached or will not take work now (retry later)."""
    return isinstance(exc, CONNECTION_LOST)


@contextlib.contextmanager
def event_store_outage() -> Iterator[None]:
    """Translates a driver outage into the project's `DependencyUnavailable` at the store boundary.

    The driver's text (host, port, SQLSTATE) is kept as the error's `detail` for the log, not for the caller.
    """
    try:
        yield
    except CONNECTION_LOST as exc:
        raise DependencyUnavailable(EVENT_STORE, repr(exc)) from exc
