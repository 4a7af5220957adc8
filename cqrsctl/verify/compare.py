"""Pure comparison: documents field by field, one stream's read-model state against PostgreSQL, and the set of
positions seen in the stream. No I/O, so every rule here is unit-tested without servers."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import bson
from bson.codec_options import CodecOptions

from cqrsctl.verify.model import ABSENT, Document, ExpectedDoc, FieldDiff, Finding, FindingKind

_CODEC: CodecOptions[Document] = CodecOptions(tz_aware=True, tzinfo=UTC)


def as_stored(doc: Mapping[str, Any]) -> Document:
    """`doc` as MongoDB stores and returns it (a BSON round trip): datetimes cut to milliseconds and in UTC,
    tuples as lists. Comparing against this, not the raw fold, keeps storage artefacts out of the findings."""
    return bson.decode(bson.encode(doc), codec_options=_CODEC)


def diff_documents(
    expected: Mapping[str, Any], actual: Mapping[str, Any], ranges: Mapping[str, tuple[int, int]] | None = None
) -> list[FieldDiff]:
    """Every field that differs, by dotted path; a field in `ranges` only has to lie within its bounds."""
    if _strictly_equal(expected, actual, ranges or {}):
        return []
    diffs: list[FieldDiff] = []
    _diff_value("", expected, actual, ranges or {}, diffs)
    return diffs


def _tagged(value: Any) -> str:
    """A non-JSON value (datetime, ObjectId, ...) as text that still tells its type."""
    if isinstance(value, datetime):
        return f"datetime:{value.isoformat()}"  # the same instant in any UTC tzinfo object
    return f"{type(value).__name__}:{value!r}"


def _canonical(doc: Mapping[str, Any]) -> str:
    # JSON tells true from 1 and 1 from "1"; the rest is tagged with its type.
    return json.dumps(doc, sort_keys=True, default=_tagged, separators=(",", ":"))


def _strictly_equal(expected: Mapping[str, Any], actual: Mapping[str, Any], ranges: Mapping[str, Any]) -> bool:
    """The fast path for the usual case, two equal documents (in C: serialising beats walking them in Python).

    False only means "look field by field"; top-level ranged fields count as equal when within their bounds.
    """
    if any("." in path for path in ranges):
        return False
    if ranges:
        expected = dict(expected)
        for path, (lo, hi) in ranges.items():
            value = actual.get(path)
            if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
                expected[path] = value
    try:
        return _canonical(expected) == _canonical(actual)
    except (TypeError, ValueError):  # keys that are not strings, circular values: take the slow path
        return False


def _diff_value(
    path: str, expected: Any, actual: Any, ranges: Mapping[str, tuple[int, int]], out: list[FieldDiff]
) -> None:
    bounds = ranges.get(path)
    if bounds is not None:
        lo, hi = bounds
        ok = isinstance(actual, int) and not isinstance(actual, bool) and lo <= actual <= hi
        if not ok:
            out.append(FieldDiff(path, f"{lo}..{hi}" if lo != hi else lo, actual))
        return
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        for key in sorted(set(expected) | set(actual), key=str):
            _diff_value(
                f"{path}.{key}" if path else str(key), expected.get(key, ABSENT), actual.get(key, ABSENT), ranges, out
            )
        return
    if _is_list(expected) and _is_list(actual):
        for index in range(max(len(expected), len(actual))):
            _diff_value(
                f"{path}.{index}",
                expected[index] if index < len(expected) else ABSENT,
                actual[index] if index < len(actual) else ABSENT,
                ranges,
                out,
            )
        return
    if not _same(expected, actual):
        out.append(FieldDiff(path, expected, actual))


def _is_list(value: Any) -> bool:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, bool) or isinstance(actual, bool):
        return type(expected) is type(actual) and expected == actual  # True == 1 is still a difference
    if isinstance(expected, int | float) and isinstance(actual, int | float):
        return expected == actual
    return type(expected) is type(actual) and bool(expected == actual)


@dataclass(frozen=True, slots=True)
class StreamState:
    """One stream as read: from MongoDB first (document, checkpoint), then from PostgreSQL (version, fold).

    Reading MongoDB first matters: the read model is derived from committed events, so PostgreSQL read afterwards
    can only be ahead of it; anything in MongoDB beyond PostgreSQL is then a real fault, not a race.
    """

    collection: str
    stream_id: str
    pg_version: int  # the stream's version in PostgreSQL (0: no events of its own)
    expected: ExpectedDoc | None  # None: PostgreSQL says there should be no document
    actual: Document | None
    checkpoint: int | None  # the checkpoint's version (None: no checkpoint)
    # Another stream this document depends on (an order's customer, a customer's orders) is not yet reflected.
    dependencies_behind: bool = False
    fold_error: str | None = None
    checkpointed: bool = True  # whether the projector keeps a checkpoint for this stream


@dataclass(slots=True)
class Assessment:
    findings: list[Finding] = field(default_factory=list)
    # The state may still change by itself (the projector is behind): re-check before reporting.
    pending: bool = False


def _version(doc: Document | None) -> int | None:
    if doc is None or "version" not in doc:
        return None
    value = doc["version"]
    return int(value) if isinstance(value, int) else None


def assess(state: StreamState) -> Assessment:
    """The findings for one stream, and whether they might still resolve by themselves."""
    out = Assessment()
    s = state
    stored = _version(s.actual)
    checkpoint_behind = s.checkpointed and s.pg_version > 0 and (s.checkpoint or 0) < s.pg_version
    if s.fold_error is not None:
        out.findings.append(Finding(FindingKind.UNPROJECTABLE_EVENT, s.stream_id, s.collection, s.fold_error))
    elif s.expected is None:
        if s.actual is not None:
            out.findings.append(
                Finding(
                    FindingKind.ORPHAN_DOCUMENT, s.stream_id, s.collection, "document without events in PostgreSQL",
                    stored_version=stored,
                )
            )  # fmt: skip
    elif s.actual is None:
        out.findings.append(
            Finding(
                FindingKind.DOCUMENT_MISSING, s.stream_id, s.collection,
                f"stream at version {s.pg_version} in PostgreSQL has no document", expected=s.expected,
            )
        )  # fmt: skip
        out.pending = checkpoint_behind or s.dependencies_behind
    else:
        actual = s.actual
        if s.expected.unchecked:
            actual = {k: v for k, v in actual.items() if k not in s.expected.unchecked}
        diffs = diff_documents(s.expected.doc, actual, s.expected.ranges)
        if diffs:
            out.findings.append(
                Finding(
                    FindingKind.DOCUMENT_DIFFERS, s.stream_id, s.collection,
                    f"document at version {stored} differs from the fold of PostgreSQL (version {s.pg_version})",
                    tuple(diffs), expected=s.expected, stored_version=stored,
                )
            )  # fmt: skip
            behind = s.expected.version is not None and (stored or 0) < s.expected.version
            out.pending = behind or checkpoint_behind or s.dependencies_behind
    if s.checkpointed and s.checkpoint is not None:
        if s.checkpoint > s.pg_version:
            out.findings.append(
                Finding(
                    FindingKind.CHECKPOINT_AHEAD, s.stream_id, s.collection,
                    f"checkpoint at version {s.checkpoint}, PostgreSQL at {s.pg_version}",
                )
            )  # fmt: skip
        elif s.actual is not None and stored is not None and s.checkpoint > stored:
            out.findings.append(
                Finding(
                    FindingKind.CHECKPOINT_AHEAD, s.stream_id, s.collection,
                    f"checkpoint at version {s.checkpoint}, document at {stored}",
                )
            )  # fmt: skip
    if checkpoint_behind:
        out.findings.append(
            Finding(
                FindingKind.CHECKPOINT_BEHIND, s.stream_id, s.collection,
                f"checkpoint at version {s.checkpoint or 0}, PostgreSQL at {s.pg_version}",
            )
        )  # fmt: skip
        out.pending = True
    return out


class PositionSet:
    """The event positions seen in the stream, one bit each: 100 million events take 12.5 MB."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def add(self, position: int) -> bool:
        """Marks `position`; False if it was already marked (a duplicate message)."""
        if position < 0:
            raise ValueError(f"negative position {position}")
        byte, bit = divmod(position, 8)
        if byte >= len(self._bits):
            self._bits.extend(bytes(max(byte + 1 - len(self._bits), len(self._bits) // 2)))
        mask = 1 << bit
        if self._bits[byte] & mask:
            return False
        self._bits[byte] |= mask
        return True

    def __contains__(self, position: object) -> bool:
        if not isinstance(position, int) or position < 0:
            return False
        byte, bit = divmod(position, 8)
        return byte < len(self._bits) and bool(self._bits[byte] & (1 << bit))

    def __iter__(self) -> Iterator[int]:
        """The marked positions in ascending order."""
        for byte, bits in enumerate(self._bits):
            if bits:
                for bit in range(8):
                    if bits & (1 << bit):
                        yield byte * 8 + bit
