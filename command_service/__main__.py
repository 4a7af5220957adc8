"""Entry point: `python -m command_service` (configured only by CQRS_* environment variables)."""

from __future__ import annotations

import asyncio
import logging
import signal

from command_service.config import CommandServiceSettings
from command_service.server import start_command_server
from core.logs import configure_logging
from core.tracing import configure_tracing, shutdown_tracing

log = logging.getLogger("command_service")


async def main() -> None:
    settings = CommandServiceSettings()
    configure_logging(settings.log_level, "command_service")
    configure_tracing("command_service")
    # Handlers first: a SIGTERM during start-up is a graceful stop too, not a kill by the default handler.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        running = await start_command_server(settings)
        await stop.wait()
        # NOT_SERVING first, then no new RPCs; in-flight ones get the grace period, then the relay finishes the
        # batch it is publishing (rows it could not publish stay in the outbox for the next relay).
        log.info("shutting down (grace %.1fs)", settings.grace_seconds)
        await running.stop()
        log.info("stopped")
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    asyncio.run(main())
