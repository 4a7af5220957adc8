"""What a load run does: the operation mix, the loop mode, the bounds. Pure data, no I/O."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from cqrsctl.load.channels import check_target

Mode = Literal["open", "closed"]
# How the mix's GetOrder reads its own writes: "eventual" sends no consistency token (a read may come before the
# projector applied the write: counted as not yet visible), "token" sends the token of the order's last
# acknowledged command, so the query service waits until the read model reflects it.
ReadConsistency = Literal["eventual", "token"]
READ_CONSISTENCIES: Final[tuple[ReadConsistency, ...]] = ("eventual", "token")

# Operation name in --mix -> the RPC it sends (CreateOrder is also the fallback when no pooled order fits).
OPERATIONS: Final[Mapping[str, str]] = {
    "create": "CreateOrder",
    "add": "AddOrderItem",
    "change": "ChangeItemQuantity",
    "place": "PlaceOrder",
    "cancel": "CancelOrder",
    "get": "GetOrder",
    "list": "ListOrders",
}
COMMAND_RPCS: Final = frozenset({"CreateOrder", "AddOrderItem", "ChangeItemQuantity", "PlaceOrder", "CancelOrder"})
QUERY_RPCS: Final = frozenset({"GetOrder", "ListOrders"})

DEFAULT_MIX_TEXT: Final = "create=1,add=3,change=1,place=1,cancel=0.3,get=4,list=1"

# Hard caps: a load run always stops by itself, even when only one bound is given.
MAX_DURATION_S: Final = 3600.0
MAX_REQUESTS: Final = 100_000_000
MAX_WORKERS: Final = 64
MAX_CONCURRENCY: Final = 10_000
MAX_RATE: Final = 1_000_000.0
MAX_CUSTOMERS: Final = 10_000


class ConfigError(ValueError):
    """A load configuration that cannot run (bad flag values); the CLI exits 2 with this message."""


def parse_mix(text: str) -> dict[str, float]:
    """Parses `create=1,add=3,...` into operation weights; operations left out get weight 0 (not sent).

    Raises ConfigError for unknown operations, repeated ones, weights that are not finite non-negative numbers,
    or a mix whose weights are all zero.
    """
    weights: dict[str, float] = {}
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            continue
        name, sep, value = item.partition("=")
        name = name.strip().lower()
        if not sep:
            raise ConfigError(f"mix entry {item!r} is not of the form op=weight")
        if name not in OPERATIONS:
            raise ConfigError(f"unknown operation {name!r} in mix; known: {', '.join(OPERATIONS)}")
        if name in weights:
            raise ConfigError(f"operation {name!r} appears twice in mix")
        try:
            weight = float(value)
        except ValueError:
            raise ConfigError(f"weight of {name!r} must be a number, got {value.strip()!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ConfigError(f"weight of {name!r} must be a finite number >= 0, got {value.strip()!r}")
        weights[name] = weight
    if not any(w > 0 for w in weights.values()):
        raise ConfigError("mix needs at least one operation with a weight > 0")
    return {name: w for name, w in weights.items() if w > 0}


# A CPU group's name: it becomes a report column, so plain; `cqrs-load` is the load generator's own group.
_CPU_NAME = re.compile(r"[A-Za-z0-9_.-]{1,40}")
RESERVED_CPU_NAME: Final = "cqrs-load"


def _cpu_name(name: str, item: str) -> str:
    name = name.strip()
    if not _CPU_NAME.fullmatch(name):
        raise ConfigError(f"CPU process name in {item!r} must be 1-40 letters, digits, '_', '.' or '-'")
    if name == RESERVED_CPU_NAME:
        raise ConfigError(f"{RESERVED_CPU_NAME!r} is the load generator's own CPU group: choose another name")
    return name


def parse_cpu_pids(texts: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Parses `--cpu-pids name=PID[,name=PID...]` (repeatable; a name given twice gets both PIDs)."""
    groups: dict[str, tuple[int, ...]] = {}
    for text in texts:
        for raw in text.split(","):
            item = raw.strip()
            if not item:
                continue
            name, sep, value = item.partition("=")
            if not sep:
                raise ConfigError(f"--cpu-pids entry {item!r} is not of the form name=PID")
            name = _cpu_name(name, item)
            try:
                pid = int(value)
            except ValueError:
                raise ConfigError(f"--cpu-pids: {value.strip()!r} in {item!r} is not a process id") from None
            if pid <= 0:
                raise ConfigError(f"--cpu-pids: {pid} in {item!r} is not a process id")
            groups[name] = (*groups.get(name, ()), pid)
    return groups


def parse_cpu_patterns(texts: Sequence[str]) -> dict[str, str]:
    """Parses repeated `--cpu-process name=REGEX` (one each: a regular expression may hold commas)."""
    patterns: dict[str, str] = {}
    for text in texts:
        name, sep, pattern = text.partition("=")
        if not sep or not pattern:
            raise ConfigError(f"--cpu-process {text!r} is not of the form name=REGEX")
        name = _cpu_name(name, text)
        if name in patterns:
            raise ConfigError(f"--cpu-process names {name!r} twice: one pattern per name (use | inside it)")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"--cpu-process {name}: {pattern!r} is not a regular expression ({exc})") from None
        patterns[name] = pattern
    return patterns


def format_mix(mix: Mapping[str, float]) -> str:
    return ",".join(f"{name}={weight:g}" for name, weight in mix.items())


def default_workers() -> int:
    return max(1, min(2, os.cpu_count() or 1))


DEFAULT_MIX: Final[Mapping[str, float]] = parse_mix(DEFAULT_MIX_TEXT)


@dataclass(frozen=True)
class LoadConfig:
    """One load run. `duration` and/or `max_requests` bound it (whichever comes first); both are hard-capped.

    `processes=True` runs each worker in its own process (what the CLI does); `False` runs the workers as tasks
    in the caller's event loop, which is handy for tests but makes the client compete with whatever else runs
    there.
    """

    command_addr: str = "127.0.0.1:50051"
    query_addr: str = "127.0.0.1:50052"
    mode: Mode = "closed"
    rate: float | None = None  # open loop: total arrivals per second across workers
    concurrency: int = 8  # closed loop: concurrent callers in total
    duration: float | None = None  # seconds
    max_requests: int | None = None
    workers: int = field(default_factory=default_workers)
    mix: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MIX))
    customers: int = 20
    ttq_sample: float = 0.1
    deadline: float = 5.0  # per RPC, seconds
    out_dir: Path | None = None
    charts: bool = True
    quiet: bool = True
    processes: bool = False
    max_in_flight: int = 2000  # open loop, per worker: arrivals beyond it are dropped and counted
    pool_size: int = 1000  # orders each worker keeps to act on
    ttq_timeout: float = 10.0
    max_ttq_probes: int = 256  # per worker; samples beyond it are skipped (and counted) rather than queued
    seed: int | None = None
    read_consistency: ReadConsistency = "eventual"
    # Local processes whose CPU the run records (name -> PIDs, name -> command-line regex); see cqrsctl.load.cpu.
    cpu_pids: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    cpu_patterns: Mapping[str, str] = field(default_factory=dict)

    @property
    def measures_cpu(self) -> bool:
        return bool(self.cpu_pids or self.cpu_patterns)

    def validate(self) -> None:
        """Raises ConfigError naming the first bad setting."""
        if self.mode not in ("open", "closed"):
            raise ConfigError(f"mode must be 'open' or 'closed', got {self.mode!r}")
        if self.duration is None and self.max_requests is None:
            raise ConfigError("give --duration and/or --max-requests: a load run needs a bound")
        if self.duration is not None and not (0 < self.duration <= MAX_DURATION_S):
            raise ConfigError(f"duration must be in (0, {MAX_DURATION_S:g}] seconds, got {self.duration:g}")
        if self.max_requests is not None and not (1 <= self.max_requests <= MAX_REQUESTS):
            raise ConfigError(f"max-requests must be in [1, {MAX_REQUESTS}], got {self.max_requests}")
        if self.mode == "open":
            if self.rate is None:
                raise ConfigError("open loop needs --rate (arrivals per second)")
            if not (math.isfinite(self.rate) and 0 < self.rate <= MAX_RATE):
                raise ConfigError(f"rate must be in (0, {MAX_RATE:g}], got {self.rate:g}")
        elif not (1 <= self.concurrency <= MAX_CONCURRENCY):
            raise ConfigError(f"concurrency must be in [1, {MAX_CONCURRENCY}], got {self.concurrency}")
        if not (1 <= self.workers <= MAX_WORKERS):
            raise ConfigError(f"workers must be in [1, {MAX_WORKERS}], got {self.workers}")
        if not any(self.mix.get(op, 0) > 0 for op in OPERATIONS) or any(op not in OPERATIONS for op in self.mix):
            raise ConfigError(f"mix must weigh some of {', '.join(OPERATIONS)} and nothing else")
        if self.read_consistency not in READ_CONSISTENCIES:
            raise ConfigError(
                f"read-consistency must be one of {', '.join(READ_CONSISTENCIES)}, got {self.read_consistency!r}"
            )
        if not (1 <= self.customers <= MAX_CUSTOMERS):
            raise ConfigError(f"customers must be in [1, {MAX_CUSTOMERS}], got {self.customers}")
        if not (0.0 <= self.ttq_sample <= 1.0):
            raise ConfigError(f"ttq-sample must be in [0, 1], got {self.ttq_sample:g}")
        if not (math.isfinite(self.deadline) and 0 < self.deadline <= 600):
            raise ConfigError(f"deadline must be in (0, 600] seconds, got {self.deadline:g}")
        for name in ("max_in_flight", "pool_size", "max_ttq_probes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1")
        if not (0 < self.ttq_timeout <= 600):
            raise ConfigError(f"ttq timeout must be in (0, 600] seconds, got {self.ttq_timeout:g}")
        for name, addr in (("command-addr", self.command_addr), ("query-addr", self.query_addr)):
            problem = check_target(addr)
            if problem is not None:
                raise ConfigError(f"{name} {problem}")
        for name, pids in self.cpu_pids.items():
            _cpu_name(name, name)
            if not pids or any(pid <= 0 for pid in pids):
                raise ConfigError(f"CPU group {name!r} needs process ids > 0, got {pids}")
        for name, pattern in self.cpu_patterns.items():
            _cpu_name(name, name)
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ConfigError(f"CPU group {name!r}: {pattern!r} is not a regular expression ({exc})") from None

    @property
    def effective_duration(self) -> float:
        return self.duration if self.duration is not None else MAX_DURATION_S

    @property
    def effective_max_requests(self) -> int:
        return self.max_requests if self.max_requests is not None else MAX_REQUESTS

    @property
    def effective_workers(self) -> int:
        """No worker without callers (closed loop) or without a request to send."""
        workers = min(self.workers, self.concurrency) if self.mode == "closed" else self.workers
        return min(workers, self.effective_max_requests)

    def describe(self) -> dict[str, Any]:
        """The settings as they go into the report's `config` section."""
        return {
            "command_addr": self.command_addr,
            "query_addr": self.query_addr,
            "mode": self.mode,
            "rate": self.rate if self.mode == "open" else None,
            "concurrency": self.concurrency if self.mode == "closed" else None,
            "duration_s": self.duration,
            "max_requests": self.max_requests,
            "workers": self.effective_workers,
            "processes": self.processes,
            "mix": dict(self.mix),
            "read_consistency": self.read_consistency,
            "customers": self.customers,
            "ttq_sample": self.ttq_sample,
            "deadline_s": self.deadline,
            "max_in_flight_per_worker": self.max_in_flight,
            "pool_size_per_worker": self.pool_size,
            "ttq_timeout_s": self.ttq_timeout,
            "ttq_probe": "GetOrder with the reply's consistency token (the query service waits for the read model)",
            "cpu_pids": {name: "+".join(map(str, pids)) for name, pids in self.cpu_pids.items()} or None,
            "cpu_process_patterns": dict(self.cpu_patterns) or None,
        }
