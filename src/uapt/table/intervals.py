"""The deltas' intervals: a paired bootstrap of every delta to the baseline column (uapt.bootstrap),
over the runs' per-sample outcomes (uapt.evaluation.outcomes) where they exist, over seeds otherwise."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uapt import bootstrap, files
from uapt.evaluation import outcomes
from uapt.records import Run
from uapt.table.cells import Cell, Table, _where, _where_row, reference_cell
from uapt.table.spec import Metric, TableSpec
from uapt.table.values import _MISSING, TableError, _canon, _fmt_value, _sort_key, lookup

# Why an interval resamples seeds only (uapt.bootstrap.paired_seeds) rather than samples too.
NOT_EVAL = "not an eval metric"

NO_FILE = (
    "no per-sample outcomes: runs without eval_outcomes.jsonl, e.g. recorded before outcomes "
    "were kept"
)

NO_BASE_FILE = (
    "no per-sample outcomes of the base model: runs without eval_base_outcomes.jsonl, e.g. "
    "recorded before they were kept"
)

DAMAGED = "a damaged eval_outcomes.jsonl"

NOT_PER_SAMPLE = "the metric is not a mean over samples, so eval_outcomes.jsonl does not have it"

MISMATCH = "per-sample outcomes that do not reproduce the recorded score"


class _NoOutcomes(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _ZeroSamples(Exception):
    def __init__(self, task: str, seed: Any, sizes: Sequence[int]):
        super().__init__(task)
        self.task, self.seed, self.sizes = task, seed, sizes


Where = tuple[tuple[Any, ...], str, Any]  # (row key, metric label, column key): one cell


@dataclass
class _IntervalNotes:
    """What the table's notes say about its intervals, gathered cell by cell."""

    seeds_only: dict[str, list[Where]] = field(default_factory=lambda: defaultdict(list))
    none: dict[str, list[Where]] = field(default_factory=lambda: defaultdict(list))
    left_out: dict[tuple[Any, Any, str], list[str]] = field(
        default_factory=lambda: defaultdict(list)
    )
    partial: dict[tuple[Any, Any, str], list[str]] = field(
        default_factory=lambda: defaultdict(list)
    )
    damaged: list[str] = field(default_factory=list)

    def render(self, table: Table) -> list[str]:
        exp = table.experiment
        base = exp.column.display(exp.baseline, True)
        labels = [m.label for m in exp.cells]
        out = []
        for reason, wheres in self.seeds_only.items():
            if reason == NOT_EVAL:
                names = sorted({label for _, label, _ in wheres}, key=labels.index)
                what = NOT_EVAL if len(names) == 1 else "not eval metrics"
                out.append(f"{', '.join(names)}: {what}, so intervals resample seeds only.")
            else:
                out.append(f"Seeds-only intervals ({reason}): {_cells_text(table, wheres)}.")
        few = self.few_seeds(table)
        if few:
            out.append(
                f"Seeds-only intervals over {' or '.join(map(str, few))} seeds span about the "
                "range of the per-seed differences (every draw taking the same seed is likelier "
                "than the tail): they understate the uncertainty, so their marks come from the "
                "sign-flip test instead (the adjustment's note)."
            )
        for reason, wheres in self.none.items():
            out.append(f"No interval ({reason}): {_cells_text(table, wheres)}.")
        for (rk, ck, text), names in self.left_out.items():
            out.append(f"{_where(exp, rk, ck)} vs {base}: {text} ({', '.join(names)}).")
        for (rk, ck, task), parts in self.partial.items():
            out.append(
                f"{_where(exp, rk, ck)} vs {base}, task {task}: compared on the samples both "
                f"runs scored ({'; '.join(dict.fromkeys(parts))})."
            )
        return out + self.damaged

    def few_seeds(self, table: Table) -> list[int]:
        """Seed counts n of seeds-only intervals whose ends are the extremes: the chance n^-n
        that a draw takes one seed n times is above the tail (1 - level) / 2."""
        tail = (1 - table.ci.level) / 2
        counts = {
            ci.seeds
            for wheres in self.seeds_only.values()
            for where in wheres
            if (ci := table.cells[where].ci) is not None
        }
        return sorted(n for n in counts if n**-n > tail)


def _ci_note(ci: bootstrap.Settings) -> str:
    return (
        f"[lo, hi]: {100 * ci.level:g} % percentile interval of Δ from a paired bootstrap "
        f"({ci.draws} draws, seed {ci.seed}): runs paired by seed, eval samples by doc id; "
        "each draw resamples the paired seeds, then the samples of each drawn seed (only the "
        "samples when one seed pairs). p: the two-sided p-value of Δ = 0 from the same draws, "
        f"2 min(1 + #draws ≤ 0, 1 + #draws ≥ 0) / ({ci.draws} + 1), at most 1; for a "
        "seeds-only interval, the exact sign-flip test over its paired seeds."
    )


def _cells_text(table: Table, wheres: Sequence[Where]) -> str:
    """'row: label, label (column, column); row: ...' in table order."""
    exp = table.experiment
    labels = [m.label for m in exp.cells]
    by_row: dict[tuple[Any, ...], dict[str, list[Any]]] = defaultdict(lambda: defaultdict(list))
    for rk, label, ck in wheres:
        by_row[rk][label].append(ck)
    parts = []
    for rk in sorted(by_row, key=table.rows.index):
        merged: dict[tuple[Any, ...], list[str]] = defaultdict(list)  # same columns: one group
        for label in sorted(by_row[rk], key=labels.index):
            cols = tuple(sorted(by_row[rk][label], key=table.columns.index))
            merged[cols].append(label)
        groups = [
            f"{', '.join(names)} ({', '.join(exp.column.display(c, True) for c in cols)})"
            for cols, names in merged.items()
        ]
        parts.append(f"{_where_row(exp, rk)}: {', '.join(groups)}")
    return "; ".join(parts)


def _add_intervals(table: Table) -> None:
    """A paired bootstrap interval (uapt.bootstrap) for every delta, and notes saying which
    cells resample seeds only and which seeds or samples the pairing left out."""
    notes = _IntervalNotes()
    loaded: dict[tuple[Path, str], Any] = {}  # (folder, file) -> outcomes, None or DamagedFile
    for where, cell in table.cells.items():
        if cell.delta is not None:
            cell.ci = _interval(table, where, cell, loaded, notes)
    table.notes.extend(notes.render(table))


def _interval(
    table: Table,
    where: Where,
    cell: Cell,
    loaded: dict[tuple[Path, str], Any],
    notes: _IntervalNotes,
) -> bootstrap.Interval | None:
    """The interval of one cell's delta: over per-sample outcomes when every paired run has
    them, else over seeds only (none under two paired seeds)."""
    exp, (rk, label, ck) = table.experiment, where
    ref = reference_cell(table, where)
    metric = next(m for m in exp.cells if m.label == label)
    pairs, left_out = _pair_seeds(exp, cell, ck, ref)
    if not pairs:
        notes.none["no seed in both the cell and the baseline"].append(where)
        return None
    if left_out:
        notes.left_out[(rk, ck, left_out)].append(label)
    # the same draws whichever of the two is the baseline: swapping them negates the interval
    pair = sorted([repr(ck), repr(exp.baseline)])
    rng = bootstrap.rng_for(table.ci.seed, repr(rk), label, *pair)
    try:
        seeds, partial = _paired_outcomes(metric, pairs, cell, ref, loaded, notes, exp.against_base)
    except _ZeroSamples as e:
        raise TableError(
            f"bootstrap over zero samples: cell {_where(exp, rk, ck)} vs "
            f"{exp.column.display(exp.baseline, True)}, {label}, task {e.task}, seed "
            f"{_fmt_value(e.seed)}: the two runs' eval_outcomes.jsonl share no scored "
            f"doc_id (they hold {e.sizes[0]} and {e.sizes[1]} samples)"
        ) from None
    except _NoOutcomes as e:
        ci = bootstrap.paired_seeds(
            [cell.values[i] - ref.values[j] for _, i, j in pairs], table.ci, rng
        )
        if ci is None:
            notes.none[f"{e.reason}, and fewer than 2 seeds paired with the baseline"].append(where)
        else:
            notes.seeds_only[e.reason].append(where)
        return ci
    for task, text in partial:
        notes.partial[(rk, ck, task)].append(text)
    return bootstrap.paired_samples(seeds, metric.scale, table.ci, rng)


class NoPerSampleOutcomes(Exception):
    """A comparison whose paired runs do not all have per-sample outcomes of its metric."""


def paired_sample_outcomes(table: Table, where: Where) -> list[list[bootstrap.TaskSamples]]:
    """Per paired seed, per task: the cell's and the baseline's per-sample outcomes of the
    metric, aligned by doc id (what the cell's interval resamples); NoPerSampleOutcomes saying
    why when there are none (no paired seed, runs without outcomes, not an eval metric)."""
    exp, (_, label, ck) = table.experiment, where
    cell, ref = table.cells[where], reference_cell(table, where)
    metric = next(m for m in exp.cells if m.label == label)
    pairs, _ = _pair_seeds(exp, cell, ck, ref)
    if not pairs:
        raise NoPerSampleOutcomes("no seed in both the cell and the baseline")
    try:
        seeds, _ = _paired_outcomes(
            metric, pairs, cell, ref, {}, _IntervalNotes(), exp.against_base
        )
    except _NoOutcomes as e:
        raise NoPerSampleOutcomes(e.reason) from None
    except _ZeroSamples as e:
        raise NoPerSampleOutcomes(f"no shared sample in task {e.task}") from None
    return seeds


def _pair_seeds(
    exp: TableSpec, cell: Cell, ck: Any, ref: Cell
) -> tuple[list[tuple[Any, int, int]], str]:
    """(seed, index in cell, index in ref) for every seed that each cell has exactly once, in
    seed order; and what the pairing leaves out (unpaired or repeated seeds), or ""."""
    sides = [_seed_index(cell), _seed_index(ref)]
    paired = [
        (seed, sides[0][seed][0], sides[1][seed][0])
        for seed in sides[0]
        if seed is not None and len(sides[0][seed]) == 1 and len(sides[1].get(seed, ())) == 1
    ]
    paired.sort(key=lambda p: _sort_key(p[0]))
    if len(paired) == len(cell.runs) == len(ref.runs):
        return paired, ""
    left = []
    names = (exp.column.display(ck, True), exp.column.display(exp.baseline, True))
    for index, other, name in ((sides[0], sides[1], names[0]), (sides[1], sides[0], names[1])):
        alone = sorted((s for s in index if s is not None and s not in other), key=_sort_key)
        repeated = sorted((s for s in index if s is not None and len(index[s]) > 1), key=_sort_key)
        if alone:
            left.append(f"seed {', '.join(map(_fmt_value, alone))} of {name}")
        if repeated:
            left.append(f"repeated seed {', '.join(map(_fmt_value, repeated))} in {name}")
        if None in index:
            left.append(f"{len(index[None])} run(s) without a seed in {name}")
    seeds = ", ".join(_fmt_value(s) for s, _, _ in paired) or "none"
    return paired, f"intervals pair seeds {seeds}, leaving out {'; '.join(left)}, which Δ includes"


def _seed_index(cell: Cell) -> dict[Any, list[int]]:
    """seed -> indices of the cell's runs with that seed (None: runs without a seed)."""
    index: dict[Any, list[int]] = defaultdict(list)
    for i, run in enumerate(cell.runs):
        seed = run.seed
        index[None if seed is _MISSING or seed is None else _canon(seed)].append(i)
    return index


def _outcome_keys(metric: Metric) -> dict[str, list[str]] | None:
    """task -> the metric names it contributes, when every path is eval.<task>.<metric>."""
    if not all(len(p) == 3 and p[0] == "eval" for p in metric.paths):
        return None
    keys: dict[str, list[str]] = defaultdict(list)
    for _, task, name in metric.paths:
        keys[task].append(name)
    return keys


def _paired_outcomes(
    metric: Metric,
    pairs: Sequence[tuple[Any, int, int]],
    cell: Cell,
    ref: Cell,
    loaded: dict[tuple[Path, str], Any],
    notes: _IntervalNotes,
    ref_is_base: bool = False,
) -> tuple[list[list[bootstrap.TaskSamples]], list[tuple[str, str]]]:
    """Per paired seed, per task of the metric: both runs' outcomes on the samples both scored
    (`ref_is_base`: the reference side is the base model's, from the same run folder); and
    (task, text) for each pair whose runs did not score the same samples. Raises _NoOutcomes
    when a run lacks them, _ZeroSamples when two runs share no sample."""
    keys = _outcome_keys(metric)
    if keys is None:
        raise _NoOutcomes(NOT_EVAL)
    seeds, partial = [], []
    for seed, i, j in pairs:
        tasks = []
        for task, names in keys.items():
            sides = [
                _run_outcomes(cell.runs[i], task, names, loaded, notes),
                _run_outcomes(ref.runs[j], task, names, loaded, notes, base=ref_is_base),
            ]
            samples, _ = bootstrap.align(*sides)
            sizes = [len(side[0]) for side in sides]
            if samples.size == 0:
                raise _ZeroSamples(task, seed, sizes)
            if samples.size < max(sizes):
                text = (
                    f"seed {_fmt_value(seed)}: {samples.size} shared, of {sizes[0]} and {sizes[1]}"
                )
                partial.append((task, text))
            tasks.append(samples)
        seeds.append(tasks)
    return seeds, partial


def _run_outcomes(
    run: Run,
    task: str,
    names: Sequence[str],
    loaded: dict[tuple[Path, str], Any],
    notes: _IntervalNotes,
    base: bool = False,
) -> list[Mapping[Any, Any]]:
    """The run's {doc_id: outcome} for each of the task's metric names (`base`: its base
    model's), when they reproduce the score in its record (so that the interval is about the
    number the table shows)."""
    file, scores = (outcomes.BASE_FILE, "eval_base") if base else (outcomes.FILE, "eval")
    key = (run.folder, file)
    if key not in loaded:
        try:
            loaded[key] = outcomes.read(run.folder, file)
        except files.DamagedFile as e:
            loaded[key] = e
            notes.damaged.append(f"not loaded: {e} (seeds-only intervals for its cells)")
    got = loaded[key]
    if got is None:
        raise _NoOutcomes(NO_BASE_FILE if base else NO_FILE)
    if isinstance(got, files.DamagedFile):
        raise _NoOutcomes(DAMAGED)
    per_name = []
    for name in names:
        values = got.get((task, name))
        if not values:
            raise _NoOutcomes(NOT_PER_SAMPLE)
        recorded = lookup(run.data, (scores, task, name))
        try:
            agg = outcomes.aggregate(values.values())
        except (TypeError, ValueError):  # not numbers: treated like a file that disagrees
            agg = None
        if agg is None or not math.isclose(agg, recorded, rel_tol=1e-6, abs_tol=1e-9):
            raise _NoOutcomes(MISMATCH)
        per_name.append(values)
    return per_name
