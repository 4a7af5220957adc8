"""What a worker tells the parent. Plain picklable dataclasses: they cross a multiprocessing queue."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WorkerSpec:
    """One worker's share of the run."""

    worker_id: int
    command_addr: str
    query_addr: str
    mode: str
    rate: float  # open loop: this worker's arrivals per second
    phase: float  # open loop: offset of this worker's arrivals, in arrival intervals
    concurrency: int  # closed loop: this worker's callers
    duration: float
    max_requests: int
    mix: tuple[tuple[str, float], ...]
    customer_ids: tuple[str, ...]
    ttq_sample: float
    deadline: float
    max_in_flight: int
    pool_size: int
    ttq_timeout: float
    max_ttq_probes: int
    seed: int
    start_timeout: float = 120.0
    read_consistency: str = "eventual"  # config.ReadConsistency: does `get` carry its order's last token?


@dataclass(frozen=True)
class Ready:
    worker_id: int


@dataclass(frozen=True)
class Tick:
    """What completed in one second of the run (second k covers [k, k+1) after the worker's start)."""

    worker_id: int
    second: int
    requests: int
    errors: int
    dropped: int
    commands: bytes  # encoded coarse histogram
    queries: bytes
    final: bool = False  # the worker sent its last request; it may still wait for time-to-queryable probes
    pending_probes: int = 0
    not_yet_visible: int = 0  # reads of the run's own writes the read model did not show yet (not in `errors`)


@dataclass(frozen=True)
class RpcResult:
    count: int
    errors_by_code: dict[str, int]  # real errors only: not_yet_visible replies are counted apart
    histogram: bytes  # encoded precise histogram
    not_yet_visible: int = 0


@dataclass(frozen=True)
class WorkerResult:
    worker_id: int
    elapsed_s: float  # from the start until its last request completed
    dropped: int
    rpcs: dict[str, RpcResult]
    ttq_histogram: bytes
    ttq_timeouts: int
    ttq_skipped: int
    ttq_polls: int  # GetOrder calls the probes made (load on the query side not in the query figures)
    fallbacks: int  # operations sent as CreateOrder because no pooled order was in a fitting state
    evicted: int
    pool_size: int
    ticks: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Done:
    result: WorkerResult


@dataclass(frozen=True)
class Failed:
    worker_id: int
    error: str


WorkerMessage = Ready | Tick | Done | Failed
