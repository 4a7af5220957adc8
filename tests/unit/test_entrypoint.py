"""The three `__main__` modules share one shape (core/entrypoint.py): a bad environment is one clear line and exit
status 2, a failing service exits 1 with its error logged. (SIGTERM's graceful stop: tests/e2e/test_graceful_shutdown.)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.entrypoint import EXIT_FAILED, EXIT_INVALID_CONFIG, describe_invalid_settings

ROOT = Path(__file__).resolve().parents[2]


class _Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CQRS_")

    grace_seconds: float = Field(default=1.0, ge=0)
    postgres_dsn: str = "postgresql://x"
    log_level: str = "INFO"


def test_invalid_settings_are_described_in_one_line_without_their_values() -> None:
    with pytest.raises(ValidationError) as caught:
        _Settings(grace_seconds=-1, postgres_dsn=["secret-value"])  # type: ignore[arg-type]
    line = describe_invalid_settings(caught.value, "CQRS_")
    assert "\n" not in line
    assert "CQRS_GRACE_SECONDS: Input should be greater than or equal to 0" in line
    assert "CQRS_POSTGRES_DSN: " in line
    assert "secret-value" not in line


def _run(code_or_module: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *code_or_module],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("module", ["projector", "query_service", "command_service"])
def test_a_service_with_an_invalid_environment_exits_2_with_one_line(module: str) -> None:
    done = _run(["-m", module], CQRS_GRACE_SECONDS="-1")
    assert done.returncode == EXIT_INVALID_CONFIG, done.stderr
    assert done.stderr.strip() == (
        f"{module}: invalid configuration (environment variables): "
        "CQRS_GRACE_SECONDS: Input should be greater than or equal to 0"
    )


def test_a_failing_service_exits_1_and_logs_why() -> None:
    code = """
import sys
from core.entrypoint import run_service
from tests.unit.test_entrypoint import _Settings

async def serve(settings, stop):
    raise RuntimeError("cannot bind")

sys.exit(run_service("probe", _Settings, serve))
"""
    done = _run(["-c", code])
    assert done.returncode == EXIT_FAILED, done.stderr
    assert "probe failed" in done.stderr and "RuntimeError: cannot bind" in done.stderr


def test_a_service_stopped_by_sigterm_exits_0() -> None:
    code = """
import os, signal, sys
from core.entrypoint import run_service
from tests.unit.test_entrypoint import _Settings

async def serve(settings, stop):
    os.kill(os.getpid(), signal.SIGTERM)  # as if during start-up: still a graceful stop
    await stop.wait()
    print("drained", flush=True)

sys.exit(run_service("probe", _Settings, serve))
"""
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "drained" and "probe exited cleanly" in done.stderr
