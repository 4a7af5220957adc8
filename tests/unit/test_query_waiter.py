"""Read-your-writes bookkeeping of the query service (pure code: token parsing, budgets, the wait book)."""

from __future__ import annotations

import base64
import json
import uuid

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


A, B = "3f2c8a9e-5b1d-4c7a-9e2f-0a1b2c3d4e5f", "0a1b2c3d-4e5f-4c7a-9e2f-3f2c8a9e5b1d"


# ------------------------------------------------------------------------------------------------- parsing


def test_tokens_become_one_requirement_per_stream_with_the_highest_version() -> None:
    requirements, violations = parse_tokens(
        [tok(A, 2), tok(B, 1, "customer"), tok(A, 5), tok(A, 3)], "consistency.consistency_tokens"
    )

    assert violations == []
    assert set(requirements) == {Requirement("order", A, 5), Requirement("customer", B, 1)}
    assert len(requirements) == 2


def test_each_malformed_token_is_a_violation_on_its_index() -> None:
    requirements, violations = parse_tokens([tok(A, 1), "junk", tok(B, 1), "v1.e30"], "c.tokens")

    assert [v.field for v in violations] == ["c.tokens[1]", "c.tokens[3]"]
    assert all(v.description for v in violations)
    assert {r.stream_id for r in requirements} == {A, B}


def test_too_many_tokens_are_one_violation_on_the_field() -> None:
    _, violations = parse_tokens([tok(str(uuid.UUID(int=i)), 1) for i in range(101)], "c.tokens")

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


# ----------------------------------------------------------------------------------------- forged tokens


def _forged(body: object) -> str:
    return "v1." + base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "body",
    [
        {"t": "invoice", "s": A, "v": 1, "p": 1},  # unknown stream type
        {"t": "order", "s": "a", "v": 1, "p": 1},  # not an id the service issues
        {"t": "order", "s": A.upper(), "v": 1, "p": 1},  # not canonical
        {"t": "order", "s": "x" * 300, "v": 1, "p": 1},
        {"t": "order", "s": A, "v": 2**63, "p": 1},  # beyond int64
        {"t": "order", "s": A, "v": 1, "p": -1},
        {"t": "order", "s": A, "v": False, "p": 1},
        {"t": {"$gt": ""}, "s": A, "v": 1, "p": 1},
        {"t": "order", "s": {"$ne": None}, "v": 1, "p": 1},
    ],
)
def test_a_forged_token_is_a_violation(body: object) -> None:
    requirements, violations = parse_tokens([_forged(body)], "c.tokens")

    assert requirements == []
    assert [v.field for v in violations] == ["c.tokens[0]"]


def test_the_largest_valid_token_is_accepted() -> None:
    largest = _forged({"t": "customer", "s": A, "v": 2**63 - 1, "p": 2**63 - 1})

    requirements, violations = parse_tokens([largest], "c.tokens")

    assert violations == []
    assert requirements == [Requirement("customer", A, 2**63 - 1)]


# ------------------------------------------------------------------------------------ bounded, fair polls


def _ids(prefix: int, count: int) -> list[str]:
    return [str(uuid.UUID(int=prefix * 1_000_000 + i)) for i in range(count)]


def test_a_poll_takes_every_pending_stream_when_they_fit() -> None:
    book = WaitBook(max_waiters=10)
    book.add(dict.fromkeys(_ids(1, 3), 1))
    book.add(dict.fromkeys(_ids(2, 2), 1))

    assert sorted(book.streams_to_poll(5)) == sorted(_ids(1, 3) + _ids(2, 2))


def test_a_capped_poll_serves_every_query_before_anyone_gets_a_second_stream() -> None:
    book = WaitBook(max_waiters=100)
    flood = [book.add(dict.fromkeys(_ids(i, 100), 1)) for i in range(1, 4)]
    book.add({A: 1})

    first = book.streams_to_poll(4)

    assert len(first) == 4
    assert A in first
    assert all(any(s in first for s in ticket.missing) for ticket in flood)


def test_capped_polls_rotate_so_that_no_query_starves_and_every_stream_is_read() -> None:
    book = WaitBook(max_waiters=100)
    flood = [book.add(dict.fromkeys(_ids(i, 50), 1)) for i in range(1, 41)]  # 2,000 streams
    small = book.add({A: 1})
    seen: set[str] = set()
    rounds_with_small = 0

    for _ in range(22):
        chosen = book.streams_to_poll(100)
        assert len(chosen) == 100
        seen.update(chosen)
        rounds_with_small += A in chosen

    assert rounds_with_small == 22  # 41 queries share 100 streams: each is served in every round
    # 2,001 streams, 99 new ones per round besides A: every one within 22 rounds (the turns are shared evenly)
    assert seen == {s for ticket in [*flood, small] for s in ticket.missing}


def test_a_capped_poll_with_more_queries_than_the_cap_reaches_every_query() -> None:
    book = WaitBook(max_waiters=1_000)
    tickets = [book.add(dict.fromkeys(_ids(i, 3), 1)) for i in range(1, 251)]
    served: set[int] = set()

    for _ in range(3):  # 250 queries, 100 streams per round: every query within ceil(250 / 100) rounds
        chosen = set(book.streams_to_poll(100))
        served.update(t.id for t in tickets if chosen & set(t.missing))

    assert served == {t.id for t in tickets}


def test_a_poll_skips_streams_already_known_to_be_reflected() -> None:
    book = WaitBook(max_waiters=10)
    book.add(dict.fromkeys(_ids(1, 10), 1))
    book.add({A: 1, B: 1})
    book.observe({A: 1})  # A is reflected; its ticket still waits for B

    assert A not in book.streams_to_poll(5)


def test_many_malformed_tokens_are_reported_briefly() -> None:
    _, violations = parse_tokens(["junk"] * 100, "c.tokens")

    assert [v.field for v in violations] == [*(f"c.tokens[{i}]" for i in range(5)), "c.tokens"]
    assert violations[-1].description == "95 more tokens are malformed"
