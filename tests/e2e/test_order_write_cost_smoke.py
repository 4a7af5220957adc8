"""Smoke test of `python -m bench.order_write_cost`: every variant is measured, each update was a real guarded write
(the tool asserts that none conflicted or failed), and the variants without the change log write smaller
documents. Timings are not asserted: a benchmark is not a test."""

from __future__ import annotations

import asyncio

from bench.order_write_cost import VARIANTS, run


def test_every_variant_writes_its_documents_and_is_measured() -> None:
    results = asyncio.run(run(orders=10, events=6, rounds=1))
    assert list(results) == [name for name, _, _ in VARIANTS]
    sizes = {name: figures[0][2] for name, figures in results.items()}
    assert sizes["as in production"] == sizes["no secondary index"] > 2 * sizes["no change log"]
    assert sizes["no change log"] == sizes["neither"]
    assert all(figures[0][1] > 0 for figures in results.values())  # a median wall time per call
