"""`core.mongo_round_trip.install` replaces PyMongo's round trip, and `core.mongo_protocol` its reader of replies,
only while PyMongo still has the shape each replaces."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pymongo import network_layer, pool_shared
from pymongo.asynchronous import pool

from core import mongo_protocol, mongo_round_trip


@pytest.fixture(autouse=True)
def _pymongos_own() -> Iterator[None]:
    mongo_round_trip.uninstall()
    yield
    mongo_round_trip.uninstall()


def _pool_round_trip() -> tuple[object, object]:
    return vars(pool)["async_sendall"], vars(pool)["async_receive_message"]


def test_install_switches_the_pool_to_this_round_trip_once() -> None:
    assert _pool_round_trip() == (network_layer.async_sendall, network_layer.async_receive_message)
    assert mongo_round_trip.install()
    assert mongo_round_trip.install()  # idempotent
    assert _pool_round_trip() == (mongo_round_trip.send_all, mongo_round_trip.receive_message)


def test_a_pool_calling_something_else_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    async def someone_elses(*args: object) -> None: ...

    monkeypatch.setattr(pool, "async_receive_message", someone_elses)
    assert not mongo_round_trip.install()
    assert vars(pool)["async_receive_message"] is someone_elses
    assert vars(pool)["async_sendall"] is network_layer.async_sendall


def test_a_protocol_of_another_shape_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    async def read(self: object, request_id: int | None, max_message_size: int, debug: bool = False) -> None: ...

    monkeypatch.setattr(network_layer.PyMongoProtocol, "read", read)
    assert not mongo_round_trip.install()
    assert _pool_round_trip() == (network_layer.async_sendall, network_layer.async_receive_message)


def _connections_protocol() -> object:
    return vars(pool_shared)["PyMongoProtocol"]


def test_install_makes_new_connections_read_replies_with_our_protocol_and_uninstall_undoes_it() -> None:
    assert _connections_protocol() is network_layer.PyMongoProtocol
    assert mongo_round_trip.install()
    assert _connections_protocol() is mongo_protocol.ReplyProtocol
    mongo_round_trip.uninstall()
    assert _connections_protocol() is network_layer.PyMongoProtocol


def test_a_pool_building_another_protocol_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    class SomeoneElses(network_layer.PyMongoProtocol):
        pass

    monkeypatch.setattr(pool_shared, "PyMongoProtocol", SomeoneElses)
    assert not mongo_round_trip.install()
    assert _connections_protocol() is SomeoneElses
    assert _pool_round_trip() == (mongo_round_trip.send_all, mongo_round_trip.receive_message)  # that part fits


def test_a_protocol_keeping_its_replies_elsewhere_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    def __init__(self: network_layer.PyMongoProtocol, timeout: float | None = None) -> None:
        self.transport = None  # type: ignore[assignment]
        vars(self)["_replies"] = []  # an attribute PyMongo's protocol does not have

    monkeypatch.setattr(network_layer.PyMongoProtocol, "__init__", __init__)
    assert not mongo_protocol.install()
    assert _connections_protocol() is network_layer.PyMongoProtocol
