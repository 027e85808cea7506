"""The table's arithmetic: runs placed into cells, aggregated over seeds (mean ± sample std), the
delta to the baseline column, the base model's score, the paper's numbers and the notes."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from itertools import product
from typing import Any

from uapt import bootstrap
from uapt.records import Run
from uapt.table.adjust import DEFAULT as DEFAULT_ADJUST
from uapt.table.adjust import add_adjustment
from uapt.table.cells import (
    Cell,
    Table,
    cell_label,
    count_text,
    reference_cell,
    row_label,
    signed,
)
from uapt.table.intervals import add_intervals, ci_note
from uapt.table.mixing import cell_note, table_notes
from uapt.table.spec import Axis, TableSpec
from uapt.table.values import (
    MISSING,
    MISSING_TEXT,
    NONE_TEXT,
    TableSpecError,
    canonical,
    format_value,
    is_number,
    lookup,
    sort_key,
    values_equal,
)


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def pooling_note(where: str, runs: Sequence[Run]) -> str | None:
    """Say when a cell pools runs that differ in more than their seed."""
    idents = [_flatten(r.identity()) for r in runs]
    distinct = {json.dumps(i, sort_keys=True, default=str) for i in idents}
    seeds = Counter(canonical(r.seed) for r in runs)
    dup = sorted((s for s, n in seeds.items() if n > 1), key=sort_key)
    if len(distinct) < 2 and not dup:
        return None
    keys = sorted(
        {
            k
            for i in idents
            for k in i
            if len({json.dumps(j.get(k), default=str) for j in idents}) > 1
        }
    )
    parts = [f"{where} pools {len(runs)} runs"]
    if len(distinct) > 1:
        parts.append(f"of {len(distinct)} configurations (differing in {', '.join(keys)})")
    if dup:
        parts.append(f"with repeated seed(s) {', '.join(map(format_value, dup))}")
    return " ".join(parts) + "; narrow `runs` or add a row field."


def build_table(
    exp: TableSpec,
    runs: Sequence[Run],
    problems: Sequence[str] = (),
    ci: bootstrap.Settings | None = None,
    adjust: str = DEFAULT_ADJUST,
) -> Table:
    """Aggregate the selected runs into the experiment's grid (all the arithmetic lives here);
    `ci`: level, draws and seed of the deltas' intervals (default 95 %, 10000, 0); `adjust`:
    how the deltas' `*` survive multiple comparisons (holm, bh or none; uapt.table.adjust).

    Raises TableSpecError for a cell path no selected completed run has, TableError for paired
    runs that share no eval sample."""
    notes: list[str] = []
    selected, seen = [], {}
    for run in runs:
        if not exp.selects(run.data):
            continue
        rid = run.data.get("id") or str(run.folder)
        if rid in seen:
            notes.append(f"run id {rid} found twice ({seen[rid]}, {run.folder}): counted once.")
            continue
        seen[rid] = run.folder
        selected.append(run)

    placed: dict[tuple[tuple[Any, ...], Any], list[Run]] = defaultdict(list)
    unplaced: dict[str, list[str]] = defaultdict(list)
    for run in selected:
        keys = [a.key(run.data) for a in (*exp.rows, exp.column)]
        bad = [a.name for a, k in zip((*exp.rows, exp.column), keys, strict=True) if k is MISSING]
        if bad:
            unplaced[bad[0]].append(run.name)
            continue
        placed[(tuple(keys[:-1]), keys[-1])].append(run)

    _check_metrics(exp, [r for r in selected if r.completed])
    rows = _row_order(exp.rows, [rk for rk, _ in placed])
    columns = exp.column.order([ck for _, ck in placed])
    if exp.column.expected() is None and exp.baseline in columns:  # unlisted: baseline first
        columns.insert(0, columns.pop(columns.index(exp.baseline)))
    settings = ci or bootstrap.Settings()
    table = Table(exp, rows, columns, {}, {}, defaultdict(list), {}, notes, False, settings, adjust)
    absent: dict[str, list[str]] = defaultdict(list)
    for rk, ck in product(rows, columns):
        cell_runs = placed.get((rk, ck), [])
        done = [r for r in cell_runs if r.completed]
        incomplete = Counter(r.status for r in cell_runs if not r.completed)
        for metric in exp.cells:
            cell = Cell(incomplete=Counter(incomplete))
            for run in done:
                v = metric.value(run.data)
                if v is None:
                    absent[metric.label].append(run.name)
                else:
                    cell.values.append(v)
                    cell.runs.append(run)
            table.cells[(rk, metric.label, ck)] = cell
        where = f"cell {cell_label(exp, rk, ck)}"
        note = pooling_note(where, done) if len(done) > 1 else None
        notes.extend(n for n in (note, cell_note(where, done)) if n)

    _add_deltas(table)
    add_intervals(table)
    adjustment = add_adjustment(table)
    _add_base(table, placed)
    _add_paper(table)
    _add_notes(table, selected, unplaced, absent, problems, adjustment)
    return table


def _row_order(
    axes: tuple[Axis, ...], observed: Iterable[tuple[Any, ...]]
) -> list[tuple[Any, ...]]:
    """Observed row keys (plus the full product when every row axis lists its values), ordered
    by each axis's expected order, then naturally."""
    keys = set(observed)
    expected = [a.expected() for a in axes]
    if all(e is not None for e in expected):
        keys |= set(product(*expected))  # type: ignore[arg-type]
    if not axes:
        keys = {()}
    orders = [a.order(k[i] for k in keys) for i, a in enumerate(axes)]
    return sorted(keys, key=lambda k: tuple(orders[i].index(v) for i, v in enumerate(k)))


def _add_deltas(table: Table) -> None:
    exp = table.experiment
    if exp.baseline is None:
        return
    for (rk, label, ck), cell in table.cells.items():
        ref = reference_cell(table, (rk, label, ck))
        if ck != exp.baseline and ref is not None and cell.n and ref.n:
            cell.delta = cell.mean - ref.mean  # type: ignore[operator]


def _check_metrics(exp: TableSpec, done: Sequence[Run]) -> None:
    """A cell path that no selected completed run has (a typo, or a metric the runs never
    computed) is an error naming the key, not a table of "missing"."""
    if not done:
        return  # nothing has finished yet: cells read "missing (n running)", not an error
    for metric in exp.cells:
        for path in metric.paths:
            if not any(is_number(lookup(r.data, path)) for r in done):
                loc = f"{exp.path}:{metric.line}" if metric.line else str(exp.path)
                raise TableSpecError(
                    f"{loc}: {metric.where}: unknown metric {_dotted(path)!r}: none of the "
                    f"{len(done)} completed run(s) selected by `runs` has it{_nearby(path, done)}"
                )


def _dotted(path: Sequence[str]) -> str:
    return ".".join(f'"{s}"' if "." in s else s for s in path)


def _nearby(path: tuple[str, ...], runs: Sequence[Run], limit: int = 12) -> str:
    """What the runs do have next to a path that none has: the keys of its longest prefix."""
    for k in range(len(path) - 1, 0, -1):
        keys = {
            str(key)
            for r in runs
            if isinstance(node := lookup(r.data, path[:k]), Mapping)
            for key in node
        }
        if keys:
            shown = sorted(keys)
            more = ", ..." if len(shown) > limit else ""
            return f" ({_dotted(path[:k])} has: {', '.join(shown[:limit])}{more})"
    return ""


def _add_base(table: Table, placed: Mapping[tuple[tuple[Any, ...], Any], list[Run]]) -> None:
    exp = table.experiment
    if not exp.base:
        return
    for rk in table.rows:
        done = [r for (k, _), runs in placed.items() if k == rk for r in runs if r.completed]
        for metric in exp.cells:
            if metric.base_paths is None:
                table.base[(rk, metric.label)] = None
                continue
            values = [v for r in done if (v := metric.base_value(r.data)) is not None]
            if not values:
                table.base[(rk, metric.label)] = MISSING_TEXT
            elif max(values) - min(values) > 1e-9 * max(1.0, abs(max(values))):
                table.base[(rk, metric.label)] = "varies"
                table.notes.append(
                    f"base score of {metric.label} differs between the runs of row "
                    f"{row_label(exp, rk)} (different base models or suites)."
                )
            else:
                table.base[(rk, metric.label)] = values[0]


def _add_paper(table: Table) -> None:
    exp = table.experiment
    col = exp.column
    for i, entry in enumerate(exp.paper):
        metric = next(m for m in exp.cells if m.label == entry.metric)
        d = metric.decimals
        matched = [rk for rk in table.rows if all(values_equal(rk[j], v) for j, v in entry.row)]
        if not matched:
            table.notes.append(
                f"paper[{i}] ({entry.metric}, {col.display(entry.column)}) "
                "matches no row of this table."
            )
        for rk in matched:
            key = (rk, entry.metric)
            if entry.value is not None:
                text = f"{col.display(entry.column, True)}: {entry.value:.{d}f}"
                table.paper_cells[(rk, entry.metric, entry.column)] = {"value": entry.value}
            else:
                a = table.cells.get((rk, entry.metric, entry.column))
                b = table.cells.get((rk, entry.metric, entry.vs))
                ours = (
                    f"ours {signed(a.mean - b.mean, d)}"
                    if a and b and a.n and b.n  # type: ignore[operator]
                    else f"ours {MISSING_TEXT}"
                )
                text = (
                    f"{col.display(entry.column, True)} vs {col.display(entry.vs, True)}: "
                    f"{signed(entry.delta, d)} ({ours})"
                )  # type: ignore[arg-type]
                table.paper_cells[(rk, entry.metric, entry.column)] = {"delta": entry.delta}  # type: ignore[dict-item]
            table.paper[key].append(text)
        if entry.note:
            table.notes.append(f"paper: {entry.note}")


def _add_notes(
    table: Table,
    selected: Sequence[Run],
    unplaced: Mapping[str, list[str]],
    absent: Mapping[str, list[str]],
    problems: Sequence[str],
    adjustment: Sequence[str] = (),
) -> None:
    exp = table.experiment
    notes: list[str] = []
    ns = {c.n for c in table.cells.values() if c.n}
    table.show_n = len(ns) > 1
    if ns == {1}:
        notes.append(f"One seed per cell (n = 1): no std ({NONE_TEXT}).")
    elif len(ns) == 1:
        notes.append(f"Mean ± sample std (ddof=1) over seeds; n = {ns.pop()} per cell.")
    elif ns:
        notes.append(
            f"Mean ± sample std (ddof=1) over seeds; [n=k]: seeds in the cell; "
            f"± {NONE_TEXT} where n = 1."
        )
    if exp.against_base:
        notes.append("(±Δ): difference to the base model (eval_base of the same runs).")
    elif exp.baseline is not None:
        notes.append(f"(±Δ): difference to the {exp.column.display(exp.baseline, True)} column.")
    if any(c.ci is not None for c in table.cells.values()):  # against a column or the base
        notes.append(ci_note(table.ci))
        notes.extend(adjustment)
    if exp.base:
        notes.append("base: the model before post-training (eval_base).")
    notes.extend(table_notes([r for r in selected if r.completed]))
    if not selected:
        notes.append("No run matched the experiment's `runs` filter.")
    incomplete = [r for r in selected if not r.completed]
    if incomplete:
        notes.append(f"Not aggregated: {count_text(Counter(r.status for r in incomplete))}.")
        for r in sorted(incomplete, key=lambda r: r.name):
            error = r.data.get("error")
            notes.append(f"{r.status}: {r.name}" + (f" ({error})" if error else ""))
    for name, runs in unplaced.items():
        notes.append(f"{len(runs)} run(s) match no group of {name}: {_names(runs)}.")
    for label, runs in absent.items():
        notes.append(f"{label}: no value in {len(runs)} completed run(s): {_names(runs)}.")
    notes.extend(f"not loaded: {p}" for p in problems)
    table.notes[:0] = notes  # general notes first, then the per-cell/paper ones gathered earlier


def _names(names: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")
