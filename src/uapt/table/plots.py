"""An experiment file's figures as PNG (matplotlib): metric vs mask ratio or distill weight,
in-distribution vs out-of-distribution, and learning curves."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from uapt.records import Run
from uapt.table.aggregate import pooling_note
from uapt.table.cells import Cell
from uapt.table.spec import Metric, PlotSpec, TableSpec
from uapt.table.values import MISSING, canonical, format_value, is_number, lookup, sort_key

_AXIS_LABELS = {"mask_ratio": "mask ratio ρ", "distill_weight": "distill weight λ"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "metric"


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value: no error bar)."""
    c = Cell(values=list(values))
    return c.mean or 0.0, c.std or 0.0


def make_plots(
    exp: TableSpec, runs: Sequence[Run], outdir: str | Path
) -> tuple[list[Path], list[str]]:
    """Draw the experiment's plots from its completed runs; return written files and notes."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state (renders with Agg)

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    done = [r for r in runs if r.completed and exp.selects(r.data)]
    written, notes, used = [], [], set()
    for i, spec in enumerate(exp.plots):
        fig = Figure(layout="constrained")
        drawer = {"id_vs_ood": _draw_id_vs_ood, "curve": _draw_curve}.get(spec.kind, _draw_sweep)
        if not drawer(fig, spec, done, notes):
            notes.append(f"plots[{i}] ({spec.kind}): no completed run has the data; not written.")
            continue
        name = (
            spec.file
            or "-".join([exp.path.stem, spec.kind, *(_slug(m.label) for m in spec.metrics)])
            + ".png"
        )
        if name in used:
            name = f"{name[:-4]}-{i}.png"
        used.add(name)
        path = outdir / name
        fig.savefig(path, dpi=130)
        written.append(path)
    return written, notes


def _panels(fig: Any, spec: PlotSpec, runs: Sequence[Run]) -> list[tuple[Any, str, list[Run]]]:
    groups: dict[tuple[Any, ...], list[Run]] = defaultdict(list)
    for r in runs:
        groups[tuple(a.key(r.data) for a in spec.panels)].append(r)
    keys = sorted(groups, key=lambda k: tuple(map(sort_key, k)))
    ncols = min(3, len(keys)) or 1
    nrows = math.ceil(len(keys) / ncols) or 1
    fig.set_size_inches(max(6.4, 5.0 * ncols), 3.8 * nrows + 0.4)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[len(keys) :]:
        ax.set_visible(False)
    titles = [
        " · ".join(a.display(k) for a, k in zip(spec.panels, key, strict=True)) for key in keys
    ]
    return [(axes[i], titles[i], groups[k]) for i, k in enumerate(keys)]


def _base_line(ax: Any, metric: Metric, runs: Sequence[Run]) -> None:
    values = {round(v, 9) for r in runs if (v := metric.base_value(r.data)) is not None}
    if len(values) == 1:
        ax.axhline(values.pop(), color="gray", linestyle="--", linewidth=1, label="base")


def _x_scale(ax: Any, xs: Sequence[float]) -> None:
    """Symmetric log x when values span decades (λ in {0, 0.1, ..., 3}); linear otherwise."""
    positive = [x for x in xs if x > 0]
    if positive and min(xs) >= 0 and max(positive) / min(positive) >= 20:
        ax.set_xscale("symlog", linthresh=min(positive))
        ax.set_xlim(left=-0.3 * min(positive))  # room for the marker at 0
    ticks = sorted(set(xs))
    ax.set_xticks(ticks, [format_value(x) for x in ticks])  # label exactly the swept values


def _draw_sweep(fig: Any, spec: PlotSpec, runs: Sequence[Run], notes: list[str]) -> bool:
    metric = spec.metrics[0]
    x_path = ("summary", spec.kind)
    usable = [
        r
        for r in runs
        if metric.value(r.data) is not None
        and is_number(lookup(r.data, x_path))
        and spec.by.key(r.data) is not MISSING
    ]
    if not usable:
        return False
    for ax, title, panel_runs in _panels(fig, spec, usable):
        lines: dict[Any, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
        for r in panel_runs:
            lines[spec.by.key(r.data)][canonical(lookup(r.data, x_path))].append(r)
        for line_key in spec.by.order(lines):
            points = sorted(lines[line_key].items())
            for x, rs in points:
                note = (
                    pooling_note(
                        f"plot {spec.kind} {title} {spec.by.display(line_key, True)} "
                        f"x={format_value(x)}",
                        rs,
                    )
                    if len(rs) > 1
                    else None
                )
                if note:
                    notes.append(note)
            stats = [_stats([metric.value(r.data) for r in rs]) for _, rs in points]  # type: ignore[misc]
            ax.errorbar(
                [x for x, _ in points],
                [m for m, _ in stats],
                yerr=[s for _, s in stats],
                marker="o",
                capsize=3,
                label=spec.by.display(line_key, True),
            )
        _base_line(ax, metric, panel_runs)
        _x_scale(ax, [x for line in lines.values() for x in line])
        ax.set_xlabel(_AXIS_LABELS[spec.kind])
        ax.set_ylabel(metric.label)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    title = spec.title or f"{metric.label} vs {_AXIS_LABELS[spec.kind]} (± std over seeds)"
    fig.suptitle(title, fontsize=11)
    return True


def _curve(run: Run, key: str) -> dict[int, float]:
    """step -> value of one metrics.jsonl column (finite values only; {} without the file)."""
    path = run.folder / "metrics.jsonl"
    if not path.is_file():
        return {}
    points = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: the rest of the file still counts
        value = row.get(key) if isinstance(row, dict) else None
        if is_number(value) and math.isfinite(value) and is_number(row.get("step")):
            points[int(row["step"])] = float(value)
    return points


def _draw_curve(fig: Any, spec: PlotSpec, runs: Sequence[Run], notes: list[str]) -> bool:
    """A metrics.jsonl column against the step: one line per `by` value, mean ± std over seeds
    (the band) at the steps every run of the line logged."""
    key = spec.metrics[0].label
    curves = {r.folder: _curve(r, key) for r in runs}
    usable = [r for r in runs if curves[r.folder] and spec.by.key(r.data) is not MISSING]
    if not usable:
        return False
    for ax, title, panel_runs in _panels(fig, spec, usable):
        lines: dict[Any, list[Run]] = defaultdict(list)
        for r in panel_runs:
            lines[spec.by.key(r.data)].append(r)
        for line_key in spec.by.order(lines):
            rs = lines.get(line_key)
            steps = sorted(set.intersection(*(set(curves[r.folder]) for r in rs))) if rs else []
            if not steps:
                continue
            stats = [_stats([curves[r.folder][s] for r in rs]) for s in steps]
            mean = [m for m, _ in stats]
            label = f"{spec.by.display(line_key, True)} (n={len(rs)})"
            (drawn,) = ax.plot(steps, mean, marker="." if len(steps) < 30 else None, label=label)
            if len(rs) > 1:
                ax.fill_between(
                    steps,
                    [m - sd for m, sd in stats],
                    [m + sd for m, sd in stats],
                    color=drawn.get_color(),
                    alpha=0.15,
                )
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(spec.title or f"{key} over training (mean ± std over seeds)", fontsize=11)
    return True


def _draw_id_vs_ood(fig: Any, spec: PlotSpec, runs: Sequence[Run], notes: list[str]) -> bool:
    mx, my = spec.metrics
    usable = [
        r
        for r in runs
        if mx.value(r.data) is not None
        and my.value(r.data) is not None
        and spec.by.key(r.data) is not MISSING
    ]
    if not usable:
        return False
    for ax, title, panel_runs in _panels(fig, spec, usable):
        points: dict[Any, list[Run]] = defaultdict(list)
        for r in panel_runs:
            points[spec.by.key(r.data)].append(r)
        for key in spec.by.order(points):
            rs = points[key]
            note = (
                pooling_note(f"plot id_vs_ood {title} {spec.by.display(key, True)}", rs)
                if len(rs) > 1
                else None
            )
            if note:
                notes.append(note)
            (xm, xs), (ym, ys) = (_stats([m.value(r.data) for r in rs]) for m in (mx, my))  # type: ignore[misc]
            ax.errorbar(
                [xm],
                [ym],
                xerr=[xs],
                yerr=[ys],
                fmt="o",
                capsize=3,
                label=spec.by.display(key, True),
            )
        bx = {round(v, 9) for r in panel_runs if (v := mx.base_value(r.data)) is not None}
        by = {round(v, 9) for r in panel_runs if (v := my.base_value(r.data)) is not None}
        if len(bx) == 1 and len(by) == 1:
            ax.plot(
                [bx.pop()],
                [by.pop()],
                marker="*",
                markersize=12,
                color="gray",
                linestyle="none",
                label="base",
            )
        ax.set_xlabel(f"{mx.label} (in-distribution)")
        ax.set_ylabel(f"{my.label} (out-of-distribution)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(spec.title or "In- vs out-of-distribution (± std over seeds)", fontsize=11)
    return True
