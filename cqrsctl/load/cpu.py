"""The CPU section of a load run: what each local process (group) used while the workers ran, per 1,000 operations
and per second. Sampling reads /proc (see `cqrsctl.load.procstat`); the rest is pure."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from cqrsctl.load import procstat

# The load generator itself (this process and its worker processes), always measured beside the named groups.
SELF: Final = "cqrs-load"
SAMPLE_INTERVAL_S: Final = 1.0
# Operation kinds the report divides by: every RPC the services served in the window, commands, queries (the
# time-to-queryable probes are GetOrder calls, so they count as queries here).
OPERATION_KINDS: Final = ("requests", "commands", "queries")


def per_thousand(cpu_s: float | None, operations: int) -> float | None:
    """CPU seconds per 1,000 operations (= CPU milliseconds per operation); None when either is unknown."""
    if cpu_s is None or operations <= 0:
        return None
    return 1000.0 * cpu_s / operations


@dataclass(frozen=True)
class CpuPoint:
    """CPU each group used over one sampling interval, as cores (CPU seconds per second)."""

    t: float  # seconds from the start of the run to the end of the interval
    cores: dict[str, float | None]


@dataclass
class CpuUsage:
    """CPU seconds each group used from the workers' start to the end of the run, and their per-second trace."""

    pids: dict[str, tuple[int, ...]]
    window_s: float
    cpu_s: dict[str, float | None]
    timeline: list[CpuPoint] = field(default_factory=list)

    def to_json(self, operations: Mapping[str, int]) -> dict[str, Any]:
        """The report.json `cpu` section; `operations` maps each of OPERATION_KINDS to its count in the run."""
        processes = {}
        for name, cpu_s in self.cpu_s.items():
            processes[name] = {
                "pids": list(self.pids.get(name, ())),
                "cpu_s": _round(cpu_s),
                "cores": _round(None if cpu_s is None or self.window_s <= 0 else cpu_s / self.window_s),
                "per_1000": {kind: _round(per_thousand(cpu_s, operations[kind])) for kind in OPERATION_KINDS},
            }
        return {
            "window_s": round(self.window_s, 3),
            "operations": {kind: operations[kind] for kind in OPERATION_KINDS},
            "processes": processes,
            "timeline": [
                {"t": round(p.t, 3), "cores": {name: _round(v) for name, v in p.cores.items()}} for p in self.timeline
            ],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def usage_from(snapshots: Sequence[procstat.Snapshot], pids: Mapping[str, tuple[int, ...]]) -> CpuUsage:
    """The first-to-last totals and the per-interval trace of a series of snapshots (at least two)."""
    first, last = snapshots[0], snapshots[-1]
    timeline = []
    for before, after in itertools.pairwise(snapshots):
        dt = after.at - before.at
        if dt <= 0:
            continue
        cores = {name: None if s is None else s / dt for name, s in procstat.used(before, after).items()}
        timeline.append(CpuPoint(after.at - first.at, cores))
    return CpuUsage(dict(pids), last.at - first.at, procstat.used(first, last), timeline)


class CpuRecorder:
    """Samples the groups once per `interval` from `started` until `finish()`."""

    def __init__(self, groups: Mapping[str, tuple[int, ...]], interval: float = SAMPLE_INTERVAL_S) -> None:
        self.groups = dict(groups)
        self.interval = interval
        self.snapshots: list[procstat.Snapshot] = []
        self._task: asyncio.Task[None] | None = None

    def start(self, started: asyncio.Event) -> None:
        self._task = asyncio.create_task(self._sample(started))

    async def _take(self) -> None:
        # Reading /proc takes milliseconds: off the event loop, which is merging the workers' messages.
        self.snapshots.append(await asyncio.to_thread(procstat.snapshot, self.groups))

    async def _sample(self, started: asyncio.Event) -> None:
        await started.wait()
        t0 = time.monotonic()
        await self._take()
        k = 1
        while True:
            await asyncio.sleep(max(0.0, t0 + k * self.interval - time.monotonic()))
            await self._take()
            k += 1

    async def finish(self) -> CpuUsage | None:
        """Stops sampling and takes the last snapshot; None when the run never started."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if not self.snapshots:
            return None
        await self._take()
        return usage_from(self.snapshots, self.groups)


def summary_lines(section: Mapping[str, Any]) -> list[str]:
    """summary.md's CPU section from the report.json `cpu` section."""
    ops = section["operations"]
    lines = [
        f"CPU seconds (user + system, each process with its descendants, from /proc) used from the workers' start "
        f"to the end of the run ({section['window_s']:.2f} s): {ops['requests']:,} requests, {ops['commands']:,} "
        f"commands, {ops['queries']:,} queries (time-to-queryable probes included). Per 1,000 operations = CPU ms "
        "per operation; `cores` = CPU seconds per second.",
        "",
        "| process | pids | CPU s | cores | per 1,000 requests | per 1,000 commands | per 1,000 queries |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, entry in section["processes"].items():
        per = entry["per_1000"]
        cells = [_cell(entry["cpu_s"]), _cell(entry["cores"]), *(_cell(per[kind]) for kind in OPERATION_KINDS)]
        lines.append(f"| {name} | {' '.join(map(str, entry['pids']))} | " + " | ".join(cells) + " |")
    return lines


def _cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
