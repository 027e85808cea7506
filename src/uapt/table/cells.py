"""What a table is made of: cells (values over seeds, the delta to the baseline and its interval)
and the table around them."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from uapt import bootstrap
from uapt.records import Run
from uapt.table.spec import TableSpec


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)  # scaled, one per completed run
    incomplete: Counter[str] = field(default_factory=Counter)
    delta: float | None = None
    runs: list[Run] = field(default_factory=list)  # the run of each value
    ci: bootstrap.Interval | None = None  # of the delta, paired with the baseline cell
    p_adjusted: float | None = None  # ci.p_value adjusted over the table's family (table.adjust)
    marked: bool = False  # the delta's `*`: it survives the table's adjustment

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for fewer than two seeds."""
        if self.n < 2:
            return None
        m = sum(self.values) / self.n
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))


@dataclass
class Table:
    experiment: TableSpec
    rows: list[tuple[Any, ...]]
    columns: list[Any]
    cells: dict[tuple[tuple[Any, ...], str, Any], Cell]
    base: dict[tuple[tuple[Any, ...], str], float | str | None]  # value, "missing", "varies", None
    paper: dict[tuple[tuple[Any, ...], str], list[str]]
    paper_cells: dict[tuple[tuple[Any, ...], str, Any], dict[str, float]]
    notes: list[str]
    show_n: bool
    ci: bootstrap.Settings = field(default_factory=bootstrap.Settings)
    adjust: str = "holm"  # multiple-comparison adjustment of the deltas (uapt.table.adjust)


def _count_text(counts: Mapping[str, int], sep: str = ", ") -> str:
    return sep.join(f"{n} {status}" for status, n in sorted(counts.items()))


def _signed(x: float, decimals: int) -> str:
    text = f"{x:+.{decimals}f}"
    return "+" + text[1:] if float(text) == 0 else text


def _where(exp: TableSpec, rk: tuple[Any, ...], ck: Any) -> str:
    parts = [a.display(k) for a, k in zip(exp.rows, rk, strict=True)]
    return " / ".join([*parts, exp.column.display(ck)])


def _where_row(exp: TableSpec, rk: tuple[Any, ...]) -> str:
    return " / ".join(a.display(k) for a, k in zip(exp.rows, rk, strict=True)) or "(all)"


def reference_cell(table: Table, where: tuple[tuple[Any, ...], str, Any]) -> Cell | None:
    """What a cell's delta is taken against: the baseline column's cell in the same row, or with
    `baseline: base` the cell's own runs read as the base model (their eval_base scores; a run
    without one leaves the cell without a delta)."""
    exp, (rk, label, _) = table.experiment, where
    if not exp.against_base:
        return table.cells.get((rk, label, exp.baseline))
    metric = next(m for m in exp.cells if m.label == label)
    cell = table.cells[where]
    ref = Cell(runs=list(cell.runs))
    for run in cell.runs:
        value = metric.base_value(run.data)
        if value is None:
            return Cell()
        ref.values.append(value)
    return ref
