"""What `cqrs verify` is told (`VerifyConfig`) and what it reports (`VerifyResult` and its findings)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from core.subjects import DEFAULT_STREAM_NAME, SUBJECT_PREFIX
from cqrsctl import stores

Document = dict[str, Any]


class FindingKind(StrEnum):
    """Every kind of difference verify reports; the values appear in `--json` output."""

    MISSING_FROM_STREAM = "missing_from_stream"  # an event in PostgreSQL that never reached the JetStream stream
    STRAY_MESSAGE = "stray_message"  # a stream message that is no event of PostgreSQL (or differs from it)
    OUTBOX_STALE = "outbox_stale"  # an outbox row older than the threshold: the relay is not publishing
    DOCUMENT_DIFFERS = "document_differs"  # a read-model document differs from the projections' fold (or report)
    DOCUMENT_MISSING = "document_missing"  # a stream with events has no read-model document
    ORPHAN_DOCUMENT = "orphan_document"  # a read-model document with no events behind it
    CHECKPOINT_AHEAD = "checkpoint_ahead"  # a checkpoint beyond its document or its stream in PostgreSQL
    CHECKPOINT_BEHIND = "checkpoint_behind"  # a checkpoint that stayed behind PostgreSQL for the whole settle time
    DEAD_LETTER = "dead_letter"  # a message the projector parked in `dead_letters`
    UNPROJECTABLE_EVENT = "unprojectable_event"  # an event of PostgreSQL the projections cannot apply


# Only these are rewritten by `--repair` (the others need the relay, the projector or an operator).
REPAIRABLE_KINDS = frozenset({FindingKind.DOCUMENT_DIFFERS, FindingKind.DOCUMENT_MISSING, FindingKind.ORPHAN_DOCUMENT})


class _Absent:
    """Marks a field that one side of a comparison does not have."""

    _instance: _Absent | None = None

    def __new__(cls) -> _Absent:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "<absent>"


ABSENT: Any = _Absent()


@dataclass(frozen=True, slots=True)
class FieldDiff:
    """One field that differs: dotted path (list items by index), the computed and the stored value."""

    path: str
    expected: Any
    actual: Any


@dataclass(frozen=True, slots=True)
class ExpectedDoc:
    """The document the projections compute from PostgreSQL, as MongoDB would store it.

    `ranges` holds fields whose exact value PostgreSQL cannot determine, with the bounds a correct value lies in
    (the document holds the upper bound, which is also what a repair writes). `version` is None for a document
    the stream's own projection never wrote (a customer known only from its orders' statistics, a sales report).
    `guard_field`, for a document without `version`: the field that only grows as the projector moves it on (a
    report's `report_version`); a repair replaces the document only while the stored value is at most the
    computed one. `unchecked`: top-level fields of the stored document that are bookkeeping of the projector, not
    derived from events, and not compared (a repair leaves them out, which resets them).
    """

    doc: Document
    version: int | None
    ranges: dict[str, tuple[int, int]] = field(default_factory=dict)
    guard_field: str | None = None
    unchecked: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Finding:
    kind: FindingKind
    stream_id: str = ""
    collection: str | None = None
    detail: str = ""
    diffs: tuple[FieldDiff, ...] = ()
    # For `--repair`: what to write (document findings), and the stored version a delete is guarded by.
    expected: ExpectedDoc | None = field(default=None, compare=False, repr=False)
    stored_version: int | None = field(default=None, compare=False, repr=False)

    @property
    def repairable(self) -> bool:
        return self.kind in REPAIRABLE_KINDS and self.collection is not None


@dataclass(frozen=True, slots=True)
class Repair:
    """What `--repair` did to one document: `replaced`, `inserted`, `deleted`, or `skipped` (with the reason)."""

    collection: str
    stream_id: str
    action: str
    detail: str = ""


@dataclass(slots=True)
class VerifyResult:
    findings: list[Finding] = field(default_factory=list)
    events_checked: int = 0
    documents_checked: int = 0
    messages_checked: int = 0
    # Events missing from the stream that are older than its retention: counted apart, not findings.
    expired_events: int = 0
    # Messages carrying an event already seen in the stream (a re-publish after the duplicate window): harmless.
    duplicate_messages: int = 0
    settle_rounds: int = 0
    # Derived documents (hot keys) whose sources never all caught up while re-checked, each equal to this
    # release's fold of its sources as stored: in flight, not findings.
    hot_keys_in_flight: int = 0
    elapsed_seconds: float = 0.0
    repairs: list[Repair] = field(default_factory=list)
    # Wall-clock seconds per phase (stream, events, orphans, settle, outbox, dead_letters).
    phase_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def clean(self) -> bool:
        return not self.findings

    def counts(self) -> dict[str, int]:
        """Findings per kind."""
        return dict(sorted(Counter(str(f.kind) for f in self.findings).items()))

    def kinds(self) -> set[FindingKind]:
        return {f.kind for f in self.findings}

    @property
    def events_per_second(self) -> float:
        return self.events_checked / self.elapsed_seconds if self.elapsed_seconds > 0 else 0.0


def _env(name: str, default: str) -> str:
    return os.environ.get(f"CQRS_{name}", default)


@dataclass(frozen=True, slots=True)
class VerifyConfig:
    """Where the three stores are and how patient verify is; `from_env` reads the services' CQRS_* variables."""

    postgres_dsn: str
    nats_url: str
    mongo_url: str
    mongo_database: str = "cqrs"
    stream_name: str = DEFAULT_STREAM_NAME
    subject_prefix: str = SUBJECT_PREFIX
    # Differences that may be in flight (a document or checkpoint behind PostgreSQL) are re-checked this long.
    settle_seconds: float = 30.0
    # An outbox row older than this is a finding (the relay is stuck or down).
    outbox_age_seconds: float = 60.0
    # Streams (and messages, documents) per round trip; memory is bounded by it.
    batch_size: int = 500
    # Every network call gives up after this long.
    timeout_seconds: float = 10.0
    # At most this many findings of one kind are listed individually per source (outbox rows, dead letters).
    max_listed: int = 1000

    @classmethod
    def from_env(cls, **overrides: Any) -> VerifyConfig:
        """Defaults from CQRS_POSTGRES_DSN, CQRS_NATS_URL, CQRS_MONGO_URL (else the `make dev` stack's servers),
        CQRS_MONGO_DATABASE, CQRS_STREAM_NAME, CQRS_SUBJECT_PREFIX (the services' variables); `overrides` win."""
        values: dict[str, Any] = {
            "postgres_dsn": stores.postgres_dsn(),
            "nats_url": stores.nats_url(),
            "mongo_url": stores.mongo_url(),
            "mongo_database": _env("MONGO_DATABASE", "cqrs"),
            "stream_name": _env("STREAM_NAME", DEFAULT_STREAM_NAME),
            "subject_prefix": _env("SUBJECT_PREFIX", SUBJECT_PREFIX),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
