"""What a day's sales report may hold while batches are in flight: each additive figure between two folds (pure).

The projector writes an order's checkpoint after the roll-up of its batch, and a roll-up never replaces a report
that counts more facts (`report_version` only grows, and the shards only gain). So a report read *after* the day's
orders' checkpoints counts every fact at or below its order's checkpoint: those are *certain*. The orders read
after the report hold every fact it counts (a batch writes its orders before it counts their facts). The report
is then the certain facts plus some of the others (*uncertain*: the batches in flight, and every fact of a
partition whose projector replica is behind), whatever their order.

So each additive figure of a report right for its sources lies between the certain facts' sum and that sum plus
the uncertain ones of its kind; with `k` uncertain placements counted (its placed orders less the certain ones),
between the sums of the `k` smallest and the `k` largest of them, per figure. Its derived figures (net, average,
`report_version`) follow from its own sums, its SKUs are the certain facts' and only SKUs some fact has. Sound for
any set of facts in flight; a lost fact is caught unless an uncounted fact of the same kind that is at least as
large on every figure stands in for it, and only while that one is still in flight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from core.projections.sales import KINDS, Row, SalesKey, SalesRowGroups, fact_rows, sales_documents

# Uncertain facts of one kind whose figures are kept one by one for the `k` smallest and largest sums (a few MB);
# past that, a figure's bounds are the sums of all of them (still sound, looser).
UNCERTAIN_FACTS_KEPT: Final = 5000

Document = dict[str, Any]
# A summed figure of a report: (kind, sku or None for the order row, "orders" | "quantity" | "revenue_minor").
Figure = tuple[str, str | None, str]


@dataclass(slots=True)
class _Uncertain:
    """The uncertain facts of one kind: how many, and each figure's values (nonzero ones) or their sums."""

    count: int = 0
    values: dict[Figure, list[int]] | None = field(default_factory=dict)
    below: dict[Figure, int] = field(default_factory=dict)  # sum of the negative values
    above: dict[Figure, int] = field(default_factory=dict)  # sum of the positive values

    def add(self, figures: Mapping[Figure, int]) -> None:
        self.count += 1
        if self.values is not None and self.count > UNCERTAIN_FACTS_KEPT:
            self.values = None
        for figure, value in figures.items():
            sums = self.below if value < 0 else self.above
            sums[figure] = sums.get(figure, 0) + value
            if self.values is not None and value:
                self.values.setdefault(figure, []).append(value)

    def span(self, figure: Figure, counted: int) -> tuple[int, int]:
        """What `counted` of these facts (clamped to what there are) may add to a figure, at least and at most."""
        if self.values is None:
            return self.below.get(figure, 0), self.above.get(figure, 0)
        k = max(0, min(counted, self.count))
        values = self.values.get(figure, [])
        padded = values + [0] * min(k, self.count - len(values))  # facts without this figure add 0
        return sum(sorted(padded)[:k]), sum(sorted(padded, reverse=True)[:k])


class ReportBounds:
    """The facts of one report's day and currency, each certain or not, fed one order at a time."""

    def __init__(self, key: SalesKey) -> None:
        self.key = key
        self._start, self._end = key.window()
        self._certain = SalesRowGroups()
        self._uncertain = {kind: _Uncertain() for kind in KINDS}
        self._skus: set[str] = set()  # every SKU a fact of the day has

    def add(self, order: Mapping[str, Any], checkpoint: int) -> None:
        """An order document read after the report, with its checkpoint as read before it (0: none)."""
        # Its facts are certain when the checkpoint covers the whole document (the usual case: only the orders of
        # the batches in flight are ahead of theirs); else every one of them is taken as uncertain, the one counted
        # long ago too, which only widens the bounds (dating each fact by the change log cost a fifth more time).
        certain = int(order.get("version") or 0) <= checkpoint
        for at, rows in fact_rows(order):
            if not self._start <= at < self._end:
                continue
            self._skus.update(str(row["_id"]["sku"]) for row in rows if row["_id"]["sku"] is not None)
            if certain:
                self._certain.add(rows)
            else:
                self._uncertain[str(rows[0]["_id"]["kind"])].add(_figures(rows))

    def expected(self, report: Mapping[str, Any]) -> tuple[Document, dict[str, tuple[int, int]]]:
        """The report as its own sums make it, SKUs as the facts allow, and the bounds each sum must lie in (for
        `cqrsctl.verify.compare.diff_documents`)."""
        lower = _sums(self._certain.rows([self.key]))
        claimed = _rows_of(self.key, report)
        own = _sums(claimed)
        skus = sorted({sku for _, sku, _ in own if sku is not None and sku in self._skus}
                      | {sku for _, sku, _ in lower if sku is not None})  # fmt: skip
        rows = [row for row in claimed if row["_id"]["sku"] is None or row["_id"]["sku"] in skus]
        rows += [_zero_row(self.key, kind, sku) for kind in KINDS for sku in skus]
        expected = sales_documents(rows).get(self.key.id) or {}
        ranges: dict[str, tuple[int, int]] = {}
        for kind in KINDS:
            pending = self._uncertain[kind]
            counted = own.get((kind, None, "orders"), 0) - lower.get((kind, None, "orders"), 0)
            figures: list[tuple[str, Figure]] = [
                (f"{kind}_orders", (kind, None, "orders")),
                (f"{kind}_revenue_minor", (kind, None, "revenue_minor")),
            ]
            for index, sku in enumerate(skus):
                figures.append((f"skus.{index}.{kind}_quantity", (kind, sku, "quantity")))
                figures.append((f"skus.{index}.{kind}_revenue_minor", (kind, sku, "revenue_minor")))
            for path, figure in figures:
                least, most = pending.span(figure, counted) if figure[2] != "orders" else (0, pending.count)
                ranges[path] = (lower.get(figure, 0) + least, lower.get(figure, 0) + most)
        return expected, ranges

    @property
    def certain_facts(self) -> int:
        return sum(row["orders"] for row in self._certain.rows([self.key]) if row["_id"]["sku"] is None)


def _figures(rows: list[Row]) -> dict[Figure, int]:
    """One fact's figures (a SKU on two lines adds up)."""
    figures: dict[Figure, int] = {}
    for row in rows:
        group = row["_id"]
        names = ("orders", "revenue_minor") if group["sku"] is None else ("quantity", "revenue_minor")
        for name in names:
            figure = (str(group["kind"]), group["sku"], name)
            figures[figure] = figures.get(figure, 0) + int(row[name])
    return figures


def _sums(rows: list[Row]) -> dict[Figure, int]:
    sums: dict[Figure, int] = {}
    for row in rows:
        for figure, value in _figures([row]).items():
            sums[figure] = sums.get(figure, 0) + value
    return sums


def _zero_row(key: SalesKey, kind: str, sku: str) -> Row:
    return {"_id": {"day": key.day, "currency": key.currency, "kind": kind, "sku": sku},
            "orders": 0, "quantity": 0, "revenue_minor": 0}  # fmt: skip


def _rows_of(key: SalesKey, report: Mapping[str, Any]) -> list[Row]:
    """The rows a stored report's own sums make (what it claims to have counted); values that are not integers
    count as 0 here and show as differences against the report."""
    rows: list[Row] = []
    for kind in KINDS:
        rows.append({"_id": {"day": key.day, "currency": key.currency, "kind": kind, "sku": None},
                     "orders": _int(report.get(f"{kind}_orders")), "quantity": 0,
                     "revenue_minor": _int(report.get(f"{kind}_revenue_minor"))})  # fmt: skip
        for entry in report.get("skus") or ():
            if not isinstance(entry, Mapping) or not isinstance(entry.get("sku"), str):
                continue
            rows.append({"_id": {"day": key.day, "currency": key.currency, "kind": kind, "sku": entry["sku"]},
                         "orders": 0, "quantity": _int(entry.get(f"{kind}_quantity")),
                         "revenue_minor": _int(entry.get(f"{kind}_revenue_minor"))})  # fmt: skip
    return rows


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0
