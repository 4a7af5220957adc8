"""The one shape of the three `__main__` modules (`python -m command_service` / `projector` / `query_service`).

`run_service` reads the settings once from the environment (a bad CQRS_* variable is a one-line error and exit
status 2, not a traceback), configures logging and tracing, installs the SIGTERM/SIGINT handlers *before* the
service starts (so a SIGTERM during start-up is a graceful stop too, not a kill by the default handler), runs the
service until a signal asks it to stop, and exits 0 after a graceful stop or 1 when the service failed.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from pydantic import ValidationError

from core.logs import configure_logging
from core.tracing import configure_tracing, shutdown_tracing

#: Exit status when the environment does not make valid settings (2: bad usage, as for a command line).
EXIT_INVALID_CONFIG = 2
EXIT_FAILED = 1

_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

log = logging.getLogger(__name__)


class ServiceSettings(Protocol):
    """What `run_service` needs of a service's settings."""

    @property
    def log_level(self) -> str: ...


class Stoppable(Protocol):
    """A started server: `stop()` drains it gracefully."""

    async def stop(self) -> None: ...


S = TypeVar("S", bound=ServiceSettings)


def run_service(
    name: str, settings_factory: Callable[[], S], serve: Callable[[S, asyncio.Event], Awaitable[None]]
) -> int:
    """Run `serve(settings, stop)` until it returns; the exit status for `sys.exit`.

    `serve` must start the service, wait for `stop` (set by SIGTERM/SIGINT) and then stop it gracefully.
    """
    try:
        settings = settings_factory()
    except ValidationError as exc:  # a clear message, not a traceback, for a misconfigured deployment
        print(f"{name}: {describe_invalid_settings(exc, _env_prefix(settings_factory))}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    configure_logging(settings.log_level, name)
    configure_tracing(name)
    try:
        asyncio.run(_serve_until_signalled(settings, serve))
    except Exception:
        log.exception("%s failed", name)
        return EXIT_FAILED
    finally:
        shutdown_tracing()
    log.info("%s exited cleanly", name)
    return 0


async def _serve_until_signalled(settings: S, serve: Callable[[S, asyncio.Event], Awaitable[None]]) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Handlers first: a SIGTERM during start-up is a graceful stop too. A second signal while draining changes
    # nothing: the drain is already bounded by the grace period.
    for sig in _STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    await serve(settings, stop)


async def serve_until_stopped(started: Awaitable[Stoppable], stop: asyncio.Event, grace_seconds: float) -> None:
    """The `serve` of a gRPC service: await `started`, wait for `stop`, then stop the server gracefully."""
    running = await started
    await stop.wait()
    log.info("shutting down (grace %.1fs)", grace_seconds)
    await running.stop()
    log.info("stopped")


def describe_invalid_settings(exc: ValidationError, env_prefix: str = "") -> str:
    """One line naming every invalid environment variable and what is wrong with it (never its value: it may be
    a secret)."""
    problems = []
    for error in exc.errors():
        field = ".".join(str(part) for part in error["loc"])
        where = f"{env_prefix}{field}".upper() if field else "settings"
        problems.append(f"{where}: {error['msg']}")
    return "invalid configuration (environment variables): " + "; ".join(problems)


def _env_prefix(settings_factory: Callable[[], object]) -> str:
    """The pydantic-settings `env_prefix` of a settings class ('' for anything else)."""
    config = getattr(settings_factory, "model_config", None)
    prefix = config.get("env_prefix") if isinstance(config, dict) else None
    return prefix if isinstance(prefix, str) else ""
