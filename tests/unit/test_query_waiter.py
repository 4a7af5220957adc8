"""Read-your-writes bookkeeping of the query service (pure code: token parsing, budgets, the wait book)."""

from __future__ import annotations

import pytest

from core.consistency import ConsistencyToken
from query_service.consistency import (
    Lag,
    Requirement,
    TooManyWaiters,
    VersionCache,
    WaitBook,
    WaitOutcome,
    parse_tokens,
    wait_budget,
)


def tok(stream_id: str, version: int, stream_type: str = "order") -> str:
    return ConsistencyToken(stream_type, stream_id, version, position=version * 10).encode()


# ------------------------------------------------------------------------------------------------- parsing


def test_tokens_become_one_requirement_per_stream_with_the_highest_version() -> None:
    requirements, violations = parse_tokens(
        [tok("a", 2), tok("b", 1, "customer"), tok("a", 5), tok("a", 3)], "consistency.consistency_tokens"
    )

    assert violations == []
    assert sorted(requirements, key=lambda r: r.stream_id) == [
        Requirement("order", "a", 5),
        Requirement("customer", "b", 1),
    ]


def test_each_malformed_token_is_a_violation_on_its_index() -> None:
    requirements, violations = parse_tokens([tok("a", 1), "junk", tok("b", 1), "v1.e30"], "c.tokens")

    assert [v.field for v in violations] == ["c.tokens[1]", "c.tokens[3]"]
    assert all(v.description for v in violations)
    assert {r.stream_id for r in requirements} == {"a", "b"}


def test_too_many_tokens_are_one_violation_on_the_field() -> None:
    _, violations = parse_tokens([tok(f"s{i}", 1) for i in range(101)], "c.tokens")

    assert [v.field for v in violations] == ["c.tokens"]


@pytest.mark.parametrize(
    ("remaining", "cap", "expected"),
    [
        (None, 5.0, 5.0),  # no deadline: the server's cap
        (30.0, 5.0, 5.0),  # a long deadline: the cap
        (1.0, 5.0, 0.85),  # 1 s: 50 ms + 10% earlier
        (10.0, 20.0, 9.5),  # the margin is at most 500 ms
        (0.04, 5.0, 0.0),  # too little left: do not wait at all
    ],
)
def test_the_wait_budget_ends_before_the_callers_deadline(remaining: float | None, cap: float, expected: float) -> None:
    assert wait_budget(remaining, cap) == pytest.approx(expected)


# ------------------------------------------------------------------------------------------------- outcome


def test_an_outcome_that_is_behind_reads_as_stale_and_explains_itself() -> None:
    outcome = WaitOutcome(waited_seconds=0.9123, behind=(Lag("order", "o-1", 5, 2), Lag("customer", "c-1", 1, 0)))

    consistency = outcome.read_consistency()

    assert not outcome.reached
    assert consistency.stale and consistency.waited_ms == 912
    assert [(lag.stream_id, lag.required_version, lag.applied_version) for lag in consistency.behind] == [
        ("o-1", 5, 2),
        ("c-1", 1, 0),
    ]
    message = outcome.describe()
    assert "after waiting 0.912s" in message
    assert "order o-1 is at version 2, the token needs 5" in message
    assert "customer c-1 is at version 0, the token needs 1" in message


def test_a_reached_outcome_is_fresh() -> None:
    consistency = WaitOutcome(waited_seconds=0.0304).read_consistency()

    assert (consistency.stale, consistency.waited_ms, list(consistency.behind)) == (False, 30, [])


# --------------------------------------------------------------------------------------------- version cache


def test_the_cache_only_moves_forward() -> None:
    cache = VersionCache()
    cache.raise_to("a", 5)
    cache.raise_to("a", 3)

    assert cache.get("a") == 5
    assert cache.get("unknown") == 0


def test_the_cache_forgets_the_least_recently_used_streams() -> None:
    cache = VersionCache(capacity=2)
    cache.raise_to("a", 1)
    cache.raise_to("b", 1)
    cache.get("a")  # a is used again: b is now the oldest
    cache.raise_to("c", 1)

    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (1, 0, 1)
    assert len(cache) == 2


# ------------------------------------------------------------------------------------------------- wait book


def test_known_reflected_requirements_need_no_waiting() -> None:
    book = WaitBook(max_waiters=10)
    book.observe({"a": 3})

    assert book.unmet([Requirement("order", "a", 3), Requirement("order", "b", 1)]) == {"b": 1}


def test_a_ticket_is_satisfied_only_when_all_its_streams_are() -> None:
    book = WaitBook(max_waiters=10)
    both = book.add({"a": 2, "b": 1})
    only_a = book.add({"a": 3})

    assert sorted(book.pending_streams()) == ["a", "b"]
    assert book.observe({"a": 3}) == [only_a]
    assert sorted(book.pending_streams()) == ["a", "b"]  # `both` still waits for b
    assert book.observe({"b": 0}) == []
    assert book.observe({"b": 1}) == [both]
    assert book.pending_streams() == [] and len(book) == 0


def test_removing_tickets_forgets_their_streams_and_is_idempotent() -> None:
    book = WaitBook(max_waiters=10)
    first = book.add({"a": 1, "b": 1})
    second = book.add({"b": 2})

    book.remove(first)
    book.remove(first)

    assert book.pending_streams() == ["b"]
    book.remove(second)
    assert book.pending_streams() == [] and len(book) == 0


def test_the_book_refuses_waiters_beyond_its_limit() -> None:
    book = WaitBook(max_waiters=2)
    first = book.add({"a": 1})
    book.add({"a": 1})

    with pytest.raises(TooManyWaiters):
        book.add({"a": 1})
    book.remove(first)
    book.add({"a": 1})  # room again
