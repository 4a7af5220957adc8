"""The fair-share rule replicas follow to split the stream's partitions (pure)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from projector.ownership import OwnershipPlan, fair_share, plan_ownership


def test_one_replica_owns_every_partition() -> None:
    assert plan_ownership(8, ["a"], "a", {}) == OwnershipPlan(claim=tuple(range(8)), release=())


def test_a_new_replica_waits_for_the_others_to_release_then_takes_their_extras() -> None:
    owners = {p: "a" for p in range(8)}
    # b is new: everything is held, it claims nothing; a sees b and releases its highest four.
    assert plan_ownership(8, ["a", "b"], "b", owners) == OwnershipPlan(claim=(), release=())
    assert plan_ownership(8, ["a", "b"], "a", owners) == OwnershipPlan(claim=(), release=(4, 5, 6, 7))
    freed = {p: "a" for p in range(4)}
    assert plan_ownership(8, ["a", "b"], "b", freed) == OwnershipPlan(claim=(4, 5, 6, 7), release=())


def test_a_departed_replicas_partitions_are_claimed_once_free() -> None:
    owners = {0: "a", 1: "a", 2: "a", 3: "b", 4: "b", 5: "b", 6: "c", 7: "c"}
    # c is gone and its leases expired (absent from `owners`): a and b each grow to four.
    alive = {p: o for p, o in owners.items() if o != "c"}
    assert plan_ownership(8, ["a", "b"], "a", alive) == OwnershipPlan(claim=(6,), release=())
    assert plan_ownership(8, ["a", "b"], "b", alive) == OwnershipPlan(claim=(6,), release=())  # one of them wins


def test_the_remainder_goes_to_the_first_members_by_id() -> None:
    assert [fair_share(8, ["a", "b", "c"], m) for m in "abc"] == [3, 3, 2]
    assert fair_share(2, ["a", "b", "c"], "c") == 0
    assert fair_share(8, [], "z") == 8  # itself counted even before its first heartbeat is seen


@given(
    partitions=st.integers(1, 32),
    members=st.lists(st.text("abcdefgh", min_size=1, max_size=3), min_size=1, max_size=6, unique=True),
    data=st.data(),
)
def test_repeated_rounds_converge_on_every_partition_owned_exactly_once(
    partitions: int, members: list[str], data: st.DataObject
) -> None:
    # Any starting assignment (some partitions free, some held by members no longer alive).
    holders = st.sampled_from([*members, "gone", None])
    owners: dict[int, str | None] = {p: data.draw(holders) for p in range(partitions)}
    owners = {p: (None if o == "gone" else o) for p, o in owners.items()}  # leases of the gone have expired
    for _ in range(4):
        for me in members:  # members act in turn against the store, as their rounds interleave
            plan = plan_ownership(partitions, members, me, {p: o for p, o in owners.items() if o is not None})
            for p in plan.release:
                owners[p] = None
            for p in plan.claim:
                if owners.get(p) is None:
                    owners[p] = me
    counts = {m: sum(1 for o in owners.values() if o == m) for m in members}
    assert all(o is not None for o in owners.values()), owners
    assert counts == {m: fair_share(partitions, members, m) for m in members}
