"""Entry point: `python -m command_service` (configured only by CQRS_* environment variables)."""

from __future__ import annotations

import asyncio
import logging
import signal

from command_service.config import CommandServiceSettings
from command_service.server import start_command_server
from core.logs import configure_logging

log = logging.getLogger("command_service")


async def main() -> None:
    settings = CommandServiceSettings()
    configure_logging(settings.log_level, "command_service")
    running = await start_command_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down (grace %.1fs)", settings.grace_seconds)
    await running.stop()
    log.info("stopped")


if __name__ == "__main__":
    asyncio.run(main())
