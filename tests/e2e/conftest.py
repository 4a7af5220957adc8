"""The whole system in one test process: command service (with relay), projector and query service, each on its
own database / stream names so tests do not see each other's data."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest
from cqrs.orders.v1 import command_service_pb2_grpc, customer_service_pb2_grpc, query_service_pb2_grpc

from command_service.config import CommandServiceSettings
from command_service.migrate import migrate
from command_service.server import RunningCommandServer, start_command_server
from projector.config import ProjectorSettings
from projector.runner import Projector
from query_service.config import QuerySettings
from query_service.server import RunningServer, start_query_server
from tests.support import create_database


@dataclass
class Stack:
    commands: command_service_pb2_grpc.OrderCommandServiceAsyncStub
    customer_commands: customer_service_pb2_grpc.CustomerCommandServiceAsyncStub
    customer_queries: customer_service_pb2_grpc.CustomerQueryServiceAsyncStub
    queries: query_service_pb2_grpc.OrderQueryServiceAsyncStub
    command_channel: grpc.aio.Channel
    query_channel: grpc.aio.Channel
    command_server: RunningCommandServer
    query_server: RunningServer
    projector: Projector
    postgres_dsn: str
    mongo_url: str
    mongo_database: str


@pytest.fixture
async def stack(postgres_dsn: str, nats_url: str, mongo_url: str, unique_name: str) -> AsyncIterator[Stack]:
    dsn = await create_database(postgres_dsn, unique_name)
    await migrate(dsn)
    stream = unique_name.upper()
    prefix = f"{unique_name}.events"
    command_server = await start_command_server(
        CommandServiceSettings(
            postgres_dsn=dsn, nats_url=nats_url, stream_name=stream, subject_prefix=prefix,
            command_listen="127.0.0.1:0", relay_poll_seconds=0.2, grace_seconds=2,
        )
    )  # fmt: skip
    projector = Projector(
        ProjectorSettings(
            nats_url=nats_url, mongo_url=mongo_url, mongo_database=unique_name, stream_name=stream,
            subject_prefix=prefix, projector_durable=f"{unique_name}-projector",
            projector_fetch_timeout_seconds=0.2, projector_max_backoff_seconds=0.5,
        )
    )  # fmt: skip
    await projector.start()
    query_server = await start_query_server(
        QuerySettings(mongo_url=mongo_url, mongo_database=unique_name, query_listen="127.0.0.1:0", grace_seconds=2),
        health_interval=0.5,
    )
    command_channel = grpc.aio.insecure_channel(f"127.0.0.1:{command_server.port}")
    query_channel = grpc.aio.insecure_channel(query_server.address)
    try:
        yield Stack(
            commands=command_service_pb2_grpc.OrderCommandServiceStub(command_channel),
            customer_commands=customer_service_pb2_grpc.CustomerCommandServiceStub(command_channel),
            customer_queries=customer_service_pb2_grpc.CustomerQueryServiceStub(query_channel),
            queries=query_service_pb2_grpc.OrderQueryServiceStub(query_channel),
            command_channel=command_channel,
            query_channel=query_channel,
            command_server=command_server,
            query_server=query_server,
            projector=projector,
            postgres_dsn=dsn,
            mongo_url=mongo_url,
            mongo_database=unique_name,
        )
    finally:
        await command_channel.close(None)
        await query_channel.close(None)
        await asyncio.gather(command_server.stop(), projector.stop(), query_server.stop())
