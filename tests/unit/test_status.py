"""`cqrs status` arithmetic: quantiles from Prometheus histogram buckets."""

from __future__ import annotations

import math

import pytest

from cqrsctl.status import histogram_quantile


def test_no_observations_gives_none() -> None:
    assert histogram_quantile(0.5, []) is None
    assert histogram_quantile(0.5, [(0.01, 0), (math.inf, 0)]) is None


def test_quantiles_interpolate_within_the_bucket() -> None:
    buckets = [(0.01, 50.0), (0.1, 90.0), (1.0, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.01 + 0.09 * 0.5)
    assert histogram_quantile(0.95, buckets) == pytest.approx(0.1 + 0.9 * 0.5)


def test_observations_beyond_the_last_finite_bucket_report_that_bound() -> None:
    assert histogram_quantile(0.99, [(0.01, 1.0), (math.inf, 10.0)]) == 0.01
