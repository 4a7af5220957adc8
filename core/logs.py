"""One-line JSON logs for all three processes (so log shippers need no parsing rules)."""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

# The correlation id of the request being handled (set per RPC by the gRPC layers); asyncio copies context
# variables into the tasks a request starts, so every line the request causes carries it.
correlation_id: ContextVar[str] = ContextVar("correlation_id", default="")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        current = correlation_id.get()
        if current:
            entry["correlation_id"] = current
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure_logging(level: str, service: str) -> None:
    """Root logger to stderr as JSON lines; `service` names the process in every line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # The drivers are chatty at INFO/DEBUG; our own lines say what matters.
    for chatty in ("pymongo", "nats", "asyncio"):
        logging.getLogger(chatty).setLevel(max(logging.WARNING, root.level))
    old_factory = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = old_factory(*args, **kwargs)
        record.name = f"{service}.{record.name}" if not record.name.startswith(service) else record.name
        return record

    logging.setLogRecordFactory(factory)
