"""What `cqrs rebuild` is told (`RebuildConfig`) and what it reports (`RebuildResult`)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cqrsctl import stores
from cqrsctl.rebuild.cutover import CutoverResult
from cqrsctl.rebuild.shadow import Difference

# Always ignored by the comparison: bookkeeping whose value depends on how events were batched, not on the events.
# `order_stats_version` stamps how far a customer's statistics are: a recompute sets the sum of its orders'
# versions, an increment adds the version steps of the orders it counts (`projector.order_stats`), and which
# of the two ran depends on the batches (verify checks it as a range). `order_stats_seq` counts the writes, and
# `order_stats_increments` the latest run of them that were increments.
BOOKKEEPING_FIELDS: tuple[str, ...] = (
    "customers.order_stats_version",
    "customers.order_stats_seq",
    "customers.order_stats_increments",
)


@dataclass(frozen=True, slots=True)
class RebuildConfig:
    """Where the stores are and how to rebuild; `from_env` reads the services' CQRS_* variables."""

    postgres_dsn: str
    mongo_url: str
    mongo_database: str = "cqrs"  # the base database: generation 1, and home of the control collection
    # Events per batch (read, applied and recorded together): memory is bounded by it (a few MB at 2,000). Each
    # batch recomputes the derived views of every customer it touches, so bigger batches rebuild faster: 368
    # events/s at 2,000 against 159 at 500 on the local test servers.
    batch_size: int = 2000
    # Every network call gives up after this long.
    timeout_seconds: float = 30.0
    ignore_fields: tuple[str, ...] = ()
    sample: int | None = None  # None: compare every document
    # Differences that may be in flight (one side behind the other) are re-checked for up to this long.
    settle_seconds: float = 10.0
    generation: int | None = None  # resume this generation (default: the latest unfinished one)
    new: bool = False  # start a new generation even if one is unfinished
    max_listed: int = 1000  # differences listed individually (all are counted)
    # Switch the services to the new generation once compared equal (or `accept_differences`).
    cutover: bool = False
    accept_differences: bool = False
    # Rebuild only when the active generation was built with other projection versions (the deployment Job).
    if_needed: bool = False
    # A projector whose heartbeat is older than this is presumed gone: the switch does not wait for it. Must
    # exceed the projectors' CQRS_GENERATION_POLL_SECONDS plus the longest batch.
    writer_ttl_seconds: float = 15.0
    # The switch gives up (exit 2, the new generation stays active) when a projector or a PostgreSQL transaction
    # holds it up for longer.
    switch_timeout_seconds: float = 120.0
    # The build (and its catch-up passes) waits between batches, and the comparison waits before it starts, while
    # the live read model is more than this many seconds behind PostgreSQL (`cqrsctl.rebuild.live_lag`); 0: never.
    max_live_lag_seconds: float = 10.0
    # Drop the generations retired (switched away from) more than this many hours ago; None: keep them.
    drop_retired_after_hours: float | None = None

    @classmethod
    def from_env(cls, **overrides: Any) -> RebuildConfig:
        """Defaults from CQRS_POSTGRES_DSN, CQRS_MONGO_URL (else the `make dev` stack), CQRS_MONGO_DATABASE;
        `overrides` win."""
        values: dict[str, Any] = {
            "postgres_dsn": stores.postgres_dsn(),
            "mongo_url": stores.mongo_url(),
            "mongo_database": os.environ.get("CQRS_MONGO_DATABASE", "cqrs"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def changed_components(built: Mapping[str, int], wanted: Mapping[str, int]) -> list[str]:
    """The projections and views whose version differs between a generation's record and this build's registry
    (new ones included), sorted."""
    return sorted(name for name, version in wanted.items() if built.get(name) != version)


@dataclass(slots=True)
class RebuildResult:
    generation: int
    database: str
    live_database: str
    resumed: bool
    state: str = ""
    events_applied: int = 0  # by this run
    build_seconds: float = 0.0
    position: int = 0  # the highest position the generation reflects
    documents_compared: int = 0
    differences: list[Difference] = field(default_factory=list)
    difference_count: int = 0
    # Derived documents that differed to the end (hot keys) but equal, on each side, the fold of that side's sources.
    hot_keys_in_flight: int = 0
    ignored_fields: tuple[str, ...] = ()
    sampled: int | None = None
    skipped_collections: tuple[str, ...] = ()  # written by changed projections: not compared
    up_to_date: bool = False  # `if_needed` and nothing changed: nothing was built
    cutover: CutoverResult | None = None
    dropped: list[int] = field(default_factory=list)  # retired generations dropped by this run
    held_back_seconds: float = 0.0  # waiting for the live read model to catch up (`max_live_lag_seconds`)

    @property
    def events_per_second(self) -> float:
        return self.events_applied / self.build_seconds if self.build_seconds > 0 else 0.0

    @property
    def equal(self) -> bool:
        return self.difference_count == 0
