"""The parent's side of a run: gathers the workers' messages into live totals and a per-second timeline."""

from __future__ import annotations

from dataclasses import dataclass, field

from cqrsctl.load import histograms as hist
from cqrsctl.load.messages import Done, Failed, Ready, Tick, WorkerMessage, WorkerResult


@dataclass(frozen=True)
class TimelinePoint:
    """One second of the run, all workers together; latencies in ms (None when nothing of that kind completed)."""

    second: int
    requests: int
    errors: int
    dropped: int
    commands_p50: float | None
    commands_p99: float | None
    queries_p50: float | None
    queries_p99: float | None
    not_yet_visible: int = 0  # reads of the run's own writes the read model did not show yet (not in `errors`)


@dataclass
class _Second:
    commands: hist.Histogram = field(default_factory=lambda: hist.new_histogram(hist.COARSE_DIGITS))
    queries: hist.Histogram = field(default_factory=lambda: hist.new_histogram(hist.COARSE_DIGITS))
    requests: int = 0
    errors: int = 0
    dropped: int = 0
    not_yet_visible: int = 0


class Collector:
    """Merges Ticks per second; a second is final (and its histograms dropped) once every running worker passed it."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.ready: set[int] = set()
        self.results: dict[int, WorkerResult] = {}
        self.failures: dict[int, str] = {}
        self.requests = 0
        self.errors = 0
        self.not_yet_visible = 0
        self.dropped = 0
        self.live = hist.new_histogram(hist.COARSE_DIGITS)  # every request so far, for the live p99
        self.timeline: list[TimelinePoint] = []
        self.pending_probes: dict[int, int] = {}  # workers past their last request -> probes they wait for
        self._pending: dict[int, _Second] = {}
        self._last_tick: dict[int, int] = {}

    @property
    def sending_over(self) -> bool:
        """Every worker sent its last request (some may still wait for time-to-queryable probes)."""
        return all(w in self.pending_probes or w in self.failures for w in range(self.workers))

    @property
    def finished(self) -> bool:
        return len(self.results) + len(self.failures) >= self.workers

    def handle(self, message: WorkerMessage) -> None:
        if isinstance(message, Ready):
            self.ready.add(message.worker_id)
        elif isinstance(message, Tick):
            self._tick(message)
        elif isinstance(message, Done):
            self.results[message.result.worker_id] = message.result
            self._finalize()
        elif isinstance(message, Failed):
            self.failures[message.worker_id] = message.error
            self._finalize()

    def _tick(self, tick: Tick) -> None:
        second = self._pending.get(tick.second)
        if second is None:
            second = self._pending[tick.second] = _Second()
        commands, queries = hist.decode(tick.commands), hist.decode(tick.queries)
        hist.merge_into(second.commands, commands)
        hist.merge_into(second.queries, queries)
        hist.merge_into(self.live, commands)
        hist.merge_into(self.live, queries)
        second.requests += tick.requests
        second.errors += tick.errors
        second.dropped += tick.dropped
        second.not_yet_visible += tick.not_yet_visible
        self.requests += tick.requests
        self.errors += tick.errors
        self.dropped += tick.dropped
        self.not_yet_visible += tick.not_yet_visible
        self._last_tick[tick.worker_id] = tick.second
        if tick.final:
            self.pending_probes[tick.worker_id] = tick.pending_probes
        self._finalize()

    def _finalize(self) -> None:
        running = [w for w in range(self.workers) if w not in self.results and w not in self.failures]
        horizon = min((self._last_tick.get(w, -1) for w in running), default=None)
        for s in sorted(self._pending):
            if horizon is not None and s > horizon:
                break
            self._close(s, self._pending.pop(s))

    def _close(self, index: int, second: _Second) -> None:
        def pct(h: hist.Histogram, p: float) -> float | None:
            return hist.percentile_ms(h, p) if hist.count(h) else None

        self.timeline.append(
            TimelinePoint(
                second=index,
                requests=second.requests,
                errors=second.errors,
                dropped=second.dropped,
                commands_p50=pct(second.commands, 50.0),
                commands_p99=pct(second.commands, 99.0),
                queries_p50=pct(second.queries, 50.0),
                queries_p99=pct(second.queries, 99.0),
                not_yet_visible=second.not_yet_visible,
            )
        )

    def live_p99_ms(self) -> float:
        return hist.percentile_ms(self.live, 99.0)
