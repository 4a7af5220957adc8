"""`python -m projector`: the composition root. Reads the settings once, runs until SIGTERM/SIGINT, exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from core.logs import configure_logging
from core.tracing import configure_tracing, shutdown_tracing
from projector.config import ProjectorSettings
from projector.runner import run_projector

log = logging.getLogger("projector")


async def main(settings: ProjectorSettings) -> None:
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_event.set)
    await run_projector(settings, stop_event)


def cli() -> int:
    settings = ProjectorSettings()
    configure_logging(settings.log_level, "projector")
    configure_tracing("projector")
    try:
        asyncio.run(main(settings))
    except Exception:
        log.exception("projector failed")
        return 1
    finally:
        shutdown_tracing()
    log.info("projector exited cleanly")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
