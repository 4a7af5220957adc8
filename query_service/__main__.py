"""Entry point: `python -m query_service` (configured by CQRS_* environment variables, see config.py)."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import sys

from pydantic import ValidationError

from core.tracing import configure_tracing, shutdown_tracing
from query_service.config import QuerySettings
from query_service.server import serve


class JsonLineFormatter(logging.Formatter):
    """One JSON object per line: easy for humans to read and for log collectors to parse."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonLineFormatter())
    logging.basicConfig(level=level, handlers=[handler], force=True)


def main() -> None:
    try:
        settings = QuerySettings()
    except ValidationError as exc:  # a clear message, not a traceback, for a misconfigured deployment
        sys.exit(f"query service: invalid configuration (CQRS_* environment variables):\n{exc}")
    configure_logging(settings.log_level)
    configure_tracing("query_service")
    try:
        asyncio.run(serve(settings))  # returns after SIGTERM/SIGINT and a graceful stop: exit status 0
    finally:
        shutdown_tracing()


if __name__ == "__main__":
    main()
