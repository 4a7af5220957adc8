"""Named failpoints for fault-injection tests: off unless `CQRS_FAILPOINTS` turns one on, free when off.

`CQRS_FAILPOINTS` is a comma-separated list of `name=action`, read once at import:

* `name=kill`: SIGKILL this process when the point is reached (a crash at exactly that point);
* `name=kill@N`: SIGKILL the N-th time the point is reached (1-based), pass the earlier times;
* `name=raise`: raise `FailpointError` there (an unexpected exception in the code under test).

A point in the code is `failpoint("relay.after_ack_before_delete")`. When the variable is unset, `failpoint` is
a dictionary lookup on an empty dict, so production pays nothing worth measuring. Names in use are listed in
`POINTS` so a test cannot switch on a point that no longer exists.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

log = logging.getLogger(__name__)

ENV_VAR = "CQRS_FAILPOINTS"

POINTS = frozenset(
    {
        "relay.after_commit_before_publish",  # the relay fetched committed outbox rows, nothing published yet
        "relay.after_ack_before_delete",  # JetStream acked the batch, the outbox rows are not deleted yet
        "projector.after_write_before_ack",  # MongoDB has the batch's writes, JetStream has no ack yet
        "projector.loop",  # inside the projector's consume loop (an unexpected exception there)
    }
)


class FailpointError(RuntimeError):
    """Raised by a failpoint whose action is `raise`."""


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    points: dict[str, tuple[str, int]] = {}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, action = item.partition("=")
        action, _, nth = action.partition("@")
        if name not in POINTS or action not in ("kill", "raise"):
            raise ValueError(f"{ENV_VAR}: unknown failpoint or action in {item!r} (points: {sorted(POINTS)})")
        points[name] = (action, int(nth) if nth else 1)
    return points


_ACTIVE: dict[str, tuple[str, int]] = _parse(os.environ.get(ENV_VAR, ""))
_HITS: dict[str, int] = {}


def failpoint(name: str) -> None:
    """Does nothing unless `name` is switched on in `CQRS_FAILPOINTS` (see the module docstring)."""
    if not _ACTIVE:
        return
    armed = _ACTIVE.get(name)
    if armed is None:
        return
    action, nth = armed
    hits = _HITS[name] = _HITS.get(name, 0) + 1
    if hits < nth:
        return
    if action == "kill":
        print(f"failpoint {name}: SIGKILL", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    log.warning("failpoint %s: raising", name)
    raise FailpointError(f"failpoint {name}")


def configure(spec: str) -> None:
    """Replaces the active failpoints (for in-process tests); the empty string switches all off."""
    global _ACTIVE
    _ACTIVE = _parse(spec)
    _HITS.clear()
