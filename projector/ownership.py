"""Which partitions a projector replica should hold: a fair share of them, decided from the live members (pure).

Every replica runs the same rule over the same view of the lease store, so they converge on one assignment: with
M live members and N partitions, member i (members sorted by id) owns N // M partitions, plus one when i < N % M.
A replica over its share releases its highest partitions; one under its share claims the lowest free ones. A
partition whose lease another member still holds is never claimed: it is freed by its owner (a rebalance or a
stop) or by its lease expiring (a crash).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class OwnershipPlan:
    claim: tuple[int, ...]
    release: tuple[int, ...]


def fair_share(partitions: int, members: Collection[str], me: str) -> int:
    """How many of `partitions` `me` should own among `members` (itself counted even if not listed yet)."""
    live = sorted(set(members) | {me})
    count, extra = divmod(partitions, len(live))
    return count + (1 if live.index(me) < extra else 0)


def plan_ownership(
    partitions: int, members: Collection[str], me: str, owners: Mapping[int, str | None]
) -> OwnershipPlan:
    """What `me` claims and releases, given each partition's current owner (None or absent: free to claim).

    `owners` holds unexpired leases only: an expired lease is free whoever wrote it.
    """
    target = fair_share(partitions, members, me)
    mine = sorted(p for p in range(partitions) if owners.get(p) == me)
    if len(mine) > target:
        return OwnershipPlan(claim=(), release=tuple(mine[target:]))
    free = [p for p in range(partitions) if owners.get(p) is None]
    return OwnershipPlan(claim=tuple(free[: target - len(mine)]), release=())
