"""JSON log lines carry the request's correlation id when one is set."""

from __future__ import annotations

import json
import logging

from core import logs


def _line(message: str) -> dict[str, str]:
    record = logging.LogRecord("command_service.handlers", logging.INFO, __file__, 1, message, None, None)
    return json.loads(logs.JsonFormatter().format(record))  # type: ignore[no-any-return]


def test_a_line_without_a_request_has_no_correlation_id() -> None:
    assert "correlation_id" not in _line("idle")


def test_a_line_inside_a_request_carries_its_correlation_id() -> None:
    token = logs.correlation_id.set("req-42")
    try:
        line = _line("appended")
    finally:
        logs.correlation_id.reset(token)
    assert line["correlation_id"] == "req-42"
    assert line["msg"] == "appended" and line["level"] == "INFO"
