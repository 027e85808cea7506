"""Many deltas, one threshold: the table's deltas adjusted for multiple comparisons.

Every delta with an interval is a test of "no difference" at alpha = 1 - the interval's level,
with the bootstrap p-value of the interval's own draws (uapt.bootstrap.p_value). The family is
every delta the table prints with an interval, across rows, metrics and columns: a reader scans
the whole table for stars, and a claim picked from it (the best cell) is a claim about the whole
family. `holm` (the default) bounds the chance that any `*` of the table is a false positive by
alpha (family-wise error); `bh` (Benjamini-Hochberg) bounds the expected share of false
positives among the `*` by alpha, which suits a large exploratory grid; `none` marks every
interval that excludes 0 (per comparison). The adjustment itself is statsmodels'
`multipletests`. Adjusted p-values are never below the raw ones, so a surviving delta's interval
excludes 0 (see uapt.bootstrap.p_value); the intervals themselves stay per comparison.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from uapt.bootstrap import SEEDS
from uapt.table.cells import Cell, Table
from uapt.table.values import MARK

METHODS = {  # option -> statsmodels' name, and what the table's notes call it
    "holm": ("holm", "Holm", "family-wise error rate"),
    "bh": ("fdr_bh", "Benjamini-Hochberg", "false discovery rate"),
    "none": (None, "no", ""),
}
DEFAULT = "holm"


def adjusted(
    p_values: Sequence[float], method: str, alpha: float
) -> tuple[list[float], list[bool]]:
    """(adjusted p-values, which are <= alpha) for one family; `none` returns them as they are."""
    if method not in METHODS:
        raise ValueError(f"unknown adjustment {method!r}; choose one of {', '.join(METHODS)}")
    name = METHODS[method][0]
    if not p_values:
        return [], []
    if name is None:
        return list(p_values), [p <= alpha for p in p_values]
    from statsmodels.stats.multitest import multipletests  # a second's import: only when used

    reject, corrected, _, _ = multipletests(list(p_values), alpha=alpha, method=name)
    return [float(p) for p in corrected], [bool(r) for r in reject]


def family(table: Table) -> list[Cell]:
    """The deltas tested, in table order: every cell whose delta has an interval."""
    return [
        cell
        for rk in table.rows
        for metric in table.experiment.cells
        for ck in table.columns
        if (cell := table.cells[(rk, metric.label, ck)]).ci is not None
    ]


def add_adjustment(table: Table) -> list[str]:
    """Set every tested cell's adjusted p-value and `*`; returns the notes saying what was done."""
    cells = family(table)
    if not cells:
        return []
    alpha = 1 - table.ci.level
    corrected, survives = adjusted([c.ci.p_value for c in cells], table.adjust, alpha)
    for cell, p, kept in zip(cells, corrected, survives, strict=True):
        cell.p_adjusted = p
        # a mark needs both: the test passes, and the interval the cell prints excludes 0 (the
        # bootstrap p-value implies it; a seeds-only cell's sign-flip test does not)
        test = cell.ci.p_value <= alpha if table.adjust == "none" else kept
        cell.marked = test and cell.ci.significant
    return _notes(table, cells, alpha)


def _notes(table: Table, cells: Sequence[Cell], alpha: float) -> list[str]:
    m = len(cells)
    raw = sum(c.ci.significant for c in cells)
    untested = sum(c.delta is not None and c.ci is None for c in table.cells.values())
    scope = f"all {m} deltas with an interval in this table" if m > 1 else "the table's one delta"
    if untested:
        scope += f"; {untested} without one {'is' if untested == 1 else 'are'} not tested"
    if table.adjust == "none":
        return [
            f"No adjustment for multiple comparisons (--adjust none): {MARK} marks every interval "
            f"that excludes 0, {raw} of {m}; at {100 * table.ci.level:g} % about "
            f"{alpha * m:.2g} of {m} would by chance alone if nothing differed."
        ]
    _, name, controls = METHODS[table.adjust]
    kept = sum(c.marked for c in cells)
    notes = [
        f"{MARK} marks a delta whose {name}-adjusted p-value is ≤ {alpha:.3g} ({controls} over "
        f"{scope}): {kept} of {m} survive; {raw} of {m} intervals exclude 0 without "
        "adjustment. The intervals are per comparison, not adjusted."
    ]
    seeds_only = [c for c in cells if c.ci.method == SEEDS]
    if seeds_only:
        counts = sorted({c.ci.seeds for c in seeds_only})
        best = 2 / 2 ** max(counts)
        notes.append(
            f"Seeds-only deltas ({len(seeds_only)} of {m}) are tested by the exact sign-flip test "
            f"over their {' or '.join(map(str, counts))} paired seeds, whose smallest p-value is "
            f"2 / 2^k = {best:.3g}"
            + (f" > {alpha:.3g}: none of them can be marked" if best > alpha else "")
            + "; per-sample outcomes give p-values the seeds alone cannot."
        )
    # Holm's first threshold is alpha/m; BH rejects nothing only when every p exceeds alpha
    threshold, words = (alpha / m, f"alpha/{m}") if table.adjust == "holm" else (alpha, "alpha")
    smallest = 2 / (table.ci.draws + 1)  # uapt.bootstrap.p_value's floor
    if smallest > threshold:
        needed = math.ceil(2 / threshold - 1)
        notes.append(
            f"With {table.ci.draws} draws no p-value is below {smallest:.2g}, above "
            f"{words} = {threshold:.2g}: no delta can survive; --bootstrap {needed} or more "
            "lifts that floor."
        )
    return notes
