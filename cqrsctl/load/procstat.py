"""CPU time of named process trees on this machine, read from /proc (Linux): snapshots and their differences.

A group is a name and its root PIDs. Its CPU is the user + system time of the roots and of every descendant,
counted with `cutime`/`cstime` (the time of children that exited and were waited for): PostgreSQL's backends
come and go with connections and `cqrs load`'s workers exit at the end of a run, and their CPU must not vanish
with them. The difference of two snapshots is then exact whatever started or exited in between, provided each
exited process was waited for by a process of the same tree (the normal case; an orphan adopted by init is lost).

Used by `cqrs load --cpu-pids/--cpu-process` and by `make bench`. No third-party dependency: psutil would give
the same numbers per process, but not the waited-for children.
"""

from __future__ import annotations

import os
import re
import time
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class ProcessNotFound(LookupError):
    """A PID that is not running, or a command-line pattern that matches no process."""


@dataclass(frozen=True)
class ProcStat:
    """The fields of /proc/<pid>/stat we need."""

    pid: int
    ppid: int
    start: int  # starttime, clock ticks after boot: with the pid, it tells a restarted process from the old one
    ticks: int  # utime + stime + cutime + cstime


def parse_stat(text: str) -> ProcStat:
    """Parses one /proc/<pid>/stat line (the command name in parentheses may itself hold spaces and ')')."""
    head, _, rest = text.rpartition(")")
    fields = rest.split()
    # After the name: state ppid ... (fields 3..); utime..cstime are fields 14..17, starttime field 22 (proc(5)).
    return ProcStat(
        pid=int(head.split("(", 1)[0]),
        ppid=int(fields[1]),
        start=int(fields[19]),
        ticks=sum(int(v) for v in fields[11:15]),
    )


def _pids(proc: Path) -> Iterable[int]:
    for entry in os.scandir(proc):
        if entry.name.isdigit():
            yield int(entry.name)


def read_table(proc: Path = PROC) -> dict[int, ProcStat]:
    """Every process's stat; a process that exits while we read is left out."""
    table = {}
    for pid in _pids(proc):
        try:
            table[pid] = parse_stat((proc / str(pid) / "stat").read_text())
        except (OSError, ValueError, IndexError):
            continue
    return table


def read_cmdlines(proc: Path = PROC) -> dict[int, str]:
    """Every process's command line, arguments joined by spaces (kernel threads, which have none, left out)."""
    cmdlines = {}
    for pid in _pids(proc):
        try:
            raw = (proc / str(pid) / "cmdline").read_bytes()
        except OSError:
            continue
        if raw:
            cmdlines[pid] = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
    return cmdlines


def descendants(table: Mapping[int, ProcStat], roots: Iterable[int]) -> set[int]:
    """The roots that are running and every process below them."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in table.values():
        children[stat.ppid].append(stat.pid)
    found: set[int] = set()
    todo = [pid for pid in roots if pid in table]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, ()))
    return found


def ancestors(table: Mapping[int, ProcStat], pid: int) -> set[int]:
    """The parents of `pid` up to init (not `pid` itself)."""
    found: set[int] = set()
    stat = table.get(pid)
    while stat is not None and stat.ppid not in found and stat.ppid > 0:
        found.add(stat.ppid)
        stat = table.get(stat.ppid)
    return found


@dataclass(frozen=True)
class GroupSample:
    """One group in one snapshot: cumulative CPU seconds, and which root processes were there."""

    cpu_s: float
    roots: frozenset[tuple[int, int]]  # (pid, start) of each root found running
    complete: bool  # every root was running


@dataclass(frozen=True)
class Snapshot:
    at: float  # time.monotonic()
    groups: dict[str, GroupSample]


def snapshot(groups: Mapping[str, Sequence[int]], table: Mapping[int, ProcStat] | None = None) -> Snapshot:
    """Cumulative CPU seconds of each group (roots and descendants, waited-for children included)."""
    table = read_table() if table is None else table
    at = time.monotonic()
    samples = {}
    for name, roots in groups.items():
        members = descendants(table, roots)
        samples[name] = GroupSample(
            cpu_s=sum(table[pid].ticks for pid in members) / CLOCK_TICKS,
            roots=frozenset((pid, table[pid].start) for pid in roots if pid in table),
            complete=all(pid in table for pid in roots),
        )
    return Snapshot(at, samples)


def used(before: Snapshot, after: Snapshot) -> dict[str, float | None]:
    """CPU seconds each group used between two snapshots.

    None for a group whose roots were not all running at both snapshots, or were restarted in between: its
    earlier time is then no longer readable, and a difference would be wrong rather than approximate.
    """
    result: dict[str, float | None] = {}
    for name, first in before.groups.items():
        last = after.groups.get(name)
        same = last is not None and first.complete and last.complete and first.roots == last.roots
        result[name] = max(0.0, last.cpu_s - first.cpu_s) if same and last is not None else None
    return result


def match(pattern: re.Pattern[str], cmdlines: Mapping[int, str], exclude: Collection[int] = ()) -> list[int]:
    """PIDs whose command line `pattern` finds (re.search), sorted, leaving out `exclude`."""
    return sorted(pid for pid, cmdline in cmdlines.items() if pid not in exclude and pattern.search(cmdline))


def topmost(table: Mapping[int, ProcStat], pids: Collection[int]) -> tuple[int, ...]:
    """The PIDs that have no ancestor among `pids`: the roots of the trees the set spans."""
    chosen = set(pids)
    return tuple(sorted(pid for pid in chosen if not (ancestors(table, pid) & chosen)))


def resolve(
    pids: Mapping[str, Sequence[int]],
    patterns: Mapping[str, str],
    *,
    own_pid: int,
    proc: Path = PROC,
) -> dict[str, tuple[int, ...]]:
    """The root PIDs of each named group: given PIDs (which must be running) and the processes whose command line
    matches a pattern. Our own process, its descendants and its ancestors (the shell or tool that started it,
    whose command line names the pattern) never match. Raises ProcessNotFound naming what is missing."""
    table = read_table(proc)
    groups: dict[str, set[int]] = defaultdict(set)
    for name, wanted in pids.items():
        missing = [pid for pid in wanted if pid not in table]
        if missing:
            raise ProcessNotFound(f"{name}: no running process with pid {', '.join(map(str, missing))}")
        groups[name].update(wanted)
    if patterns:
        cmdlines = read_cmdlines(proc)
        ours = descendants(table, [own_pid]) | ancestors(table, own_pid) | {own_pid}
        for name, text in patterns.items():
            found = match(re.compile(text), cmdlines, exclude=ours)
            if not found:
                raise ProcessNotFound(f"{name}: no process's command line matches {text!r}")
            groups[name].update(topmost(table, found))
    return {name: tuple(sorted(roots)) for name, roots in groups.items()}
