"""Entry point: `python -m query_service` (configured only by CQRS_* environment variables, see config.py)."""

from __future__ import annotations

import asyncio
import sys

from core.entrypoint import run_service, serve_until_stopped
from query_service.config import QuerySettings
from query_service.server import start_query_server


async def serve(settings: QuerySettings, stop: asyncio.Event) -> None:
    """Serve until `stop`; then NOT_SERVING, no new RPCs, and the grace period for in-flight ones."""
    await serve_until_stopped(start_query_server(settings), stop, settings.grace_seconds)


def main() -> int:
    return run_service("query_service", QuerySettings, serve)


if __name__ == "__main__":
    sys.exit(main())
