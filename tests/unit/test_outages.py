"""Every driver error that means "PostgreSQL is gone" is an outage (UNAVAILABLE), nothing else is."""

from __future__ import annotations

import asyncpg
import pytest

from command_service.outages import event_store_outage, is_connection_lost
from core.errors import Unavailable

GONE = [
    # Seen when a query lands between the server's "terminating connection" and the socket closing.
    asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in progress"),
    asyncpg.ProtocolError("unexpected message"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.InterfaceError("connection is closed"),
    asyncpg.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.CrashShutdownError("terminating connection because of crash of another server process"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.TooManyConnectionsError("sorry, too many clients already"),
    asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
    ConnectionResetError(104, "Connection reset by peer"),
    ConnectionRefusedError(111, "Connection refused"),
    TimeoutError(),
]

NOT_GONE = [
    asyncpg.UniqueViolationError("duplicate key"),
    asyncpg.UndefinedTableError("relation does not exist"),
    ValueError("bad"),
]


@pytest.mark.parametrize("exc", GONE, ids=lambda e: type(e).__name__)
def test_connection_loss_is_an_outage(exc: BaseException) -> None:
    assert is_connection_lost(exc)
    with pytest.raises(Unavailable, match=r"event store \(PostgreSQL\) is unavailable") as raised:
        with event_store_outage():
            raise exc
    assert raised.value.__cause__ is exc
    assert "127.0.0.1" not in raised.value.message and "asyncpg" not in raised.value.message


@pytest.mark.parametrize("exc", NOT_GONE, ids=lambda e: type(e).__name__)
def test_other_errors_pass_through(exc: BaseException) -> None:
    assert not is_connection_lost(exc)
    with pytest.raises(type(exc)):
        with event_store_outage():
            raise exc
