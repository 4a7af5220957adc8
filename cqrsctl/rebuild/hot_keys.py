"""Hot keys in the shadow comparison: a derived document that still differs once the re-checks ran out is in flight
when each side equals this release's fold of its own sources (`cqrsctl.verify.own_sources`)."""

from __future__ import annotations

import logging
import time
from typing import Any

from pymongo.asynchronous.database import AsyncDatabase

from cqrsctl.rebuild.shadow import MISSING_IN_GENERATION, MISSING_IN_LIVE, Difference, IgnoredFields
from cqrsctl.verify.own_sources import DERIVED_CHECKS, PAUSE_SECONDS, SECONDS_PER_VIEW, held_on_own_sources, view_of

log = logging.getLogger(__name__)


async def held_on_each_side(
    differences: list[Difference], live: AsyncDatabase[dict[str, Any]], generation: AsyncDatabase[dict[str, Any]],
    ignored: IgnoredFields, *, seconds: float = SECONDS_PER_VIEW, pause: float = PAUSE_SECONDS,
) -> tuple[list[Difference], int]:  # fmt: skip
    """The differences left once those in a derived view's fields whose two sides each equal the fold of their own
    sources are taken out, and how many were."""
    by_view: dict[str, list[str]] = {}
    for d in differences:
        both_present = d.kind not in (MISSING_IN_LIVE, MISSING_IN_GENERATION)
        if (name := view_of(d.collection, (f.path for f in d.fields), both_present)) is not None:
            by_view.setdefault(name, []).append(d.doc_id)
    explained: set[tuple[str, str]] = set()
    for name, ids in by_view.items():
        started = time.monotonic()
        held = await held_on_own_sources(name, live, ids, ignored.ignores, seconds=seconds, pause=pause)
        held = await held_on_own_sources(name, generation, sorted(held), ignored.ignores, seconds=seconds,
                                         pause=pause)  # fmt: skip
        log.info("%s: %d of %d documents still differing are right on each side for their own sources (%.1fs)",
                 name, len(held), len(ids), time.monotonic() - started)  # fmt: skip
        explained.update((DERIVED_CHECKS[name].collection, doc_id) for doc_id in held)
    left = [d for d in differences if (d.collection, d.doc_id) not in explained]
    return left, len(differences) - len(left)
