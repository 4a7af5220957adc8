"""The dependency-call helper: observations and errors land in the registry it was given."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from core.dependency_metrics import dependency_metrics


def _sample(registry: CollectorRegistry, name: str, dependency: str, operation: str) -> float:
    value = registry.get_sample_value(name, {"dependency": dependency, "operation": operation})
    return 0.0 if value is None else value


async def test_calls_are_timed_and_failures_counted() -> None:
    registry = CollectorRegistry()
    deps = dependency_metrics(registry)
    assert dependency_metrics(registry) is deps  # one pair of families per registry

    async with deps.timed("postgres", "append"):
        await asyncio.sleep(0.01)
    with pytest.raises(ValueError):
        async with deps.timed("postgres", "append"):
            raise ValueError("boom")

    assert _sample(registry, "cqrs_dependency_call_seconds_count", "postgres", "append") == 2
    assert _sample(registry, "cqrs_dependency_call_seconds_sum", "postgres", "append") >= 0.01
    assert _sample(registry, "cqrs_dependency_call_errors_total", "postgres", "append") == 1
    assert (
        registry.get_sample_value(
            "cqrs_dependency_call_seconds_bucket", {"dependency": "postgres", "operation": "append", "le": "0.0005"}
        )
        is not None
    )  # the smallest bucket is 0.5 ms


async def test_decorator_ignored_errors_and_cancellation() -> None:
    registry = CollectorRegistry()
    deps = dependency_metrics(registry)

    @deps.timed("mongodb", "find")
    async def find(fail: bool) -> int:
        if fail:
            raise RuntimeError("down")
        return 1

    assert list(await asyncio.gather(find(False), find(False))) == [1, 1]
    with pytest.raises(RuntimeError):
        await find(True)
    with pytest.raises(TimeoutError):  # an ignored exception: neither timed nor counted
        async with deps.timed("nats", "fetch", ignore=(TimeoutError,)):
            raise TimeoutError
    with pytest.raises(asyncio.CancelledError):  # cancellation is timed but is not a failure
        async with deps.timed("nats", "fetch"):
            raise asyncio.CancelledError
    deps.error("nats", "publish_batch", 2)

    assert _sample(registry, "cqrs_dependency_call_seconds_count", "mongodb", "find") == 3
    assert _sample(registry, "cqrs_dependency_call_errors_total", "mongodb", "find") == 1
    assert _sample(registry, "cqrs_dependency_call_seconds_count", "nats", "fetch") == 1
    assert _sample(registry, "cqrs_dependency_call_errors_total", "nats", "fetch") == 0
    assert _sample(registry, "cqrs_dependency_call_errors_total", "nats", "publish_batch") == 2


def test_without_a_registry_each_component_gets_a_private_one() -> None:
    first, second = dependency_metrics(), dependency_metrics()
    assert first.registry is not second.registry  # no clash, no global default registry
