"""The recorded event as it travels from the event store through JetStream to the projector.

On the wire the body is JSON (UTF-8) and the headers repeat the routing facts, so a consumer can route, dedupe
and measure lag without parsing the body.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

# Header names, shared by the relay and the projector.
HEADER_MSG_ID = "Nats-Msg-Id"
HEADER_EVENT_TYPE = "Cqrs-Event-Type"
HEADER_STREAM_ID = "Cqrs-Stream-Id"
HEADER_VERSION = "Cqrs-Version"
HEADER_POSITION = "Cqrs-Position"
HEADER_RECORDED_AT = "Cqrs-Recorded-At"
HEADER_CORRELATION_ID = "Cqrs-Correlation-Id"
# W3C trace context (OpenTelemetry): the span that wrote the event, continued by whoever handles the message.
HEADER_TRACEPARENT = "traceparent"


@dataclass(frozen=True, slots=True)
class EventMetadata:
    request_id: str
    correlation_id: str
    causation_id: str
    # The command's W3C trace context ("" when tracing is off): the relay, which runs later in another task,
    # continues the command's trace from it.
    traceparent: str = ""
    # Who asked: the `sub` claim of the caller's validated token ("" when auth is off, and in events recorded
    # before the field existed: the metadata is JSON, so old events simply lack it).
    subject: str = ""

    def to_dict(self) -> dict[str, str]:
        data = {
            "request_id": self.request_id,
            "correlation_id": self.correlation_id,
            "causation_id": self.causation_id,
        }
        if self.traceparent:
            data["traceparent"] = self.traceparent
        if self.subject:
            data["subject"] = self.subject
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EventMetadata:
        return cls(
            request_id=str(data.get("request_id", "")),
            correlation_id=str(data.get("correlation_id", "")),
            causation_id=str(data.get("causation_id", "")),
            traceparent=str(data.get("traceparent", "")),
            subject=str(data.get("subject", "")),
        )


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """One committed event with everything the store assigned to it."""

    event_id: uuid.UUID
    stream_type: str
    stream_id: str
    version: int
    event_type: str
    schema_version: int
    payload: dict[str, Any]
    metadata: EventMetadata
    position: int
    recorded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    def to_json(self) -> bytes:
        body = {
            "event_id": str(self.event_id),
            "stream_type": self.stream_type,
            "stream_id": self.stream_id,
            "version": self.version,
            "event_type": self.event_type,
            "schema_version": self.schema_version,
            "payload": self.payload,
            "metadata": self.metadata.to_dict(),
            "position": self.position,
            "recorded_at": self.recorded_at.isoformat(),
        }
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RecordedEvent:
        """Parses a wire body; raises ValueError (with the reason) for anything malformed."""
        try:
            body = json.loads(data)
            recorded_at = datetime.fromisoformat(body["recorded_at"])
            if recorded_at.tzinfo is None:
                raise ValueError("recorded_at has no time zone")
            event = cls(
                event_id=uuid.UUID(body["event_id"]),
                stream_type=_require(body, "stream_type", str),
                stream_id=_require(body, "stream_id", str),
                version=_require(body, "version", int),
                event_type=_require(body, "event_type", str),
                schema_version=_require(body, "schema_version", int),
                payload=_require(body, "payload", dict),
                metadata=EventMetadata.from_dict(_require(body, "metadata", dict)),
                position=_require(body, "position", int),
                recorded_at=recorded_at,
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:  # JSON and UUID errors are ValueErrors
            raise ValueError(f"malformed event envelope: {exc!r}") from exc
        if event.version < 1 or event.position < 1:
            raise ValueError("malformed event envelope: version and position must be >= 1")
        return event

    def headers(self) -> dict[str, str]:
        headers = {
            HEADER_MSG_ID: str(self.event_id),
            HEADER_EVENT_TYPE: self.event_type,
            HEADER_STREAM_ID: self.stream_id,
            HEADER_VERSION: str(self.version),
            HEADER_POSITION: str(self.position),
            HEADER_RECORDED_AT: self.recorded_at.isoformat(),
            HEADER_CORRELATION_ID: self.metadata.correlation_id,
        }
        if self.metadata.traceparent:
            headers[HEADER_TRACEPARENT] = self.metadata.traceparent
        return headers


def _require(body: dict[str, Any], key: str, kind: type) -> Any:
    value = body[key]
    # bool is an int subclass; a version of `true` is malformed, not 1.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key} must be {kind.__name__}")
    return value
