"""Entry point: `python -m command_service` (configured only by CQRS_* environment variables)."""

from __future__ import annotations

import asyncio
import sys

from command_service.config import CommandServiceSettings
from command_service.server import start_command_server
from core.entrypoint import run_service, serve_until_stopped


async def serve(settings: CommandServiceSettings, stop: asyncio.Event) -> None:
    """Serve until `stop`; then NOT_SERVING first, no new RPCs, the grace period for in-flight ones, and the relay
    finishes the batch it is publishing (rows it could not publish stay in the outbox for the next relay)."""
    await serve_until_stopped(start_command_server(settings), stop, settings.grace_seconds)


def main() -> int:
    return run_service("command_service", CommandServiceSettings, serve)


if __name__ == "__main__":
    sys.exit(main())
