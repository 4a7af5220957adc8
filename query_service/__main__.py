"""Entry point: `python -m query_service` (configured by CQRS_* environment variables, see config.py)."""

from __future__ import annotations

import asyncio
import sys

from pydantic import ValidationError

from core.logs import configure_logging
from core.tracing import configure_tracing, shutdown_tracing
from query_service.config import QuerySettings
from query_service.server import serve


def main() -> None:
    try:
        settings = QuerySettings()
    except ValidationError as exc:  # a clear message, not a traceback, for a misconfigured deployment
        sys.exit(f"query service: invalid configuration (CQRS_* environment variables):\n{exc}")
    configure_logging(settings.log_level, "query_service")
    configure_tracing("query_service")
    try:
        asyncio.run(serve(settings))  # returns after SIGTERM/SIGINT and a graceful stop: exit status 0
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
