"""Latency histograms (HdrHistogram, microseconds, 1 µs .. 60 s) and how they travel between processes.

Workers record into their own histograms and send them encoded (compressed, a few hundred bytes); the parent
decodes and adds them. Adding histograms is exact, unlike averaging percentiles.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Final

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LOWEST_US: Final = 1
HIGHEST_US: Final = 60_000_000
PRECISE_DIGITS: Final = 3  # per-RPC and time-to-queryable histograms
COARSE_DIGITS: Final = 2  # per-second histograms (live progress and the latency-over-time chart): 8x smaller

PERCENTILES: Final = (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))

Histogram = Any  # hdrh ships no type information


def new_histogram(digits: int = PRECISE_DIGITS) -> Histogram:
    return HdrHistogram(LOWEST_US, HIGHEST_US, digits)


def record_seconds(histogram: Histogram, seconds: float) -> None:
    """Records a duration, clamped into the trackable range (a reply faster than 1 µs still counts)."""
    histogram.record_value(min(HIGHEST_US, max(LOWEST_US, round(seconds * 1_000_000))))


def encode(histogram: Histogram) -> bytes:
    data: bytes = histogram.encode()
    return data


def decode(data: bytes) -> Histogram:
    return HdrHistogram.decode(data)


def merge_into(target: Histogram, source: Histogram) -> Histogram:
    """Adds `source` into `target` and returns `target`.

    An empty source is skipped: hdrh would otherwise lower the target's minimum to 0.
    """
    if source.get_total_count() > 0:
        target.add(source)
    return target


def merged(encoded: Iterable[bytes], digits: int = PRECISE_DIGITS) -> Histogram:
    total = new_histogram(digits)
    for data in encoded:
        merge_into(total, decode(data))
    return total


def count(histogram: Histogram) -> int:
    return int(histogram.get_total_count())


def percentile_ms(histogram: Histogram, percentile: float) -> float:
    if count(histogram) == 0:
        return 0.0
    return round(int(histogram.get_value_at_percentile(percentile)) / 1000.0, 3)


def max_ms(histogram: Histogram) -> float:
    """The largest recorded value (to the histogram's resolution) in milliseconds; 0 when empty."""
    if count(histogram) == 0:
        return 0.0
    return round(int(histogram.get_max_value()) / 1000.0, 3)


def summary_ms(histogram: Histogram) -> dict[str, float]:
    """{"p50", "p90", "p99", "p99_9", "max"} in milliseconds (all 0.0 for an empty histogram)."""
    summary = {key: percentile_ms(histogram, p) for key, p in PERCENTILES}
    summary["max"] = max_ms(histogram)
    return summary


def recorded_values_ms(histogram: Histogram) -> list[tuple[float, int]]:
    """(value in ms, count) for each non-empty bucket, ascending: for drawing the distribution."""
    return [
        (int(item.value_iterated_to) / 1000.0, int(item.count_at_value_iterated_to))
        for item in histogram.get_recorded_iterator()
    ]
