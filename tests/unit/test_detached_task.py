"""A background worker started on demand by a request must not inherit that request's trace (or any context)."""

from __future__ import annotations

import asyncio

from opentelemetry import context as otel_context

from core.tracing import detached_task


async def test_a_detached_task_sees_none_of_its_creators_context() -> None:
    token = otel_context.attach(otel_context.set_value("request", "first caller"))
    try:

        async def seen() -> object:
            return otel_context.get_value("request")

        assert await asyncio.create_task(seen()) == "first caller"  # a plain task copies the context
        assert await detached_task(seen(), name="worker") is None
    finally:
        otel_context.detach(token)
