"""`python -m projector`: the composition root. Reads the settings once, runs until SIGTERM/SIGINT, exits 0."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

from projector.config import ProjectorSettings
from projector.runner import run_projector

log = logging.getLogger("projector")


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # The drivers are chatty at INFO/DEBUG; our own lines say what matters.
    logging.getLogger("pymongo").setLevel(logging.WARNING)
    logging.getLogger("nats").setLevel(logging.WARNING)


async def main(settings: ProjectorSettings) -> None:
    stop_event = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_event.set)
    await run_projector(settings, stop_event)


def cli() -> int:
    settings = ProjectorSettings()
    configure_logging(settings.log_level)
    try:
        asyncio.run(main(settings))
    except Exception:
        log.exception("projector failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
