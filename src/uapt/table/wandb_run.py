"""The table as a W&B run (`uapt-table <file> --wandb`): the cells and notes the terminal shows,
and the file's plots, logged to the project and group of the study's runs (their records'
`config.logger`), offline by default like every run. A W&B failure (no network, no or a bad key,
a server error) never fails a table: it is one warning line. The study's workspace, whose panels
show this run's table, is uapt.wandb_report's.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from uapt.errors import one_line
from uapt.paths import CONF_DIR
from uapt.table.plots import make_plots
from uapt.table.render import grid

if TYPE_CHECKING:
    from uapt.records import Run
    from uapt.table.cells import Table
    from uapt.table.spec import TableSpec

CONF_LOGGER = CONF_DIR / "logger" / "wandb.yaml"
TABLE_JOB_TYPE = "table"
MODES = ("offline", "online")
TABLE_KEY, NOTES_KEY, PLOTS_KEY = "study/table", "study/notes", "study/plots"


@dataclass(frozen=True)
class Target:
    """Where a study goes in W&B: its runs' project, entity and group; `dir` holds wandb/."""

    project: str
    entity: str | None
    group: str
    dir: Path


def _most_common(values: Iterable[Any]) -> Any:
    counts = Counter(v for v in values if v not in (None, ""))
    return counts.most_common(1)[0][0] if counts else None


def _default_project() -> str:
    try:
        return str(yaml.safe_load(CONF_LOGGER.read_text())["project"])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return "uapt"


def _filtered_experiment(exp: TableSpec) -> str | None:
    """The `experiment` an experiment file selects with `runs: {experiment: NAME}`, if any."""
    for _, path, condition in exp.filters:
        if path == ("summary", "experiment") and len(condition.tests) == 1:
            op, arg = condition.tests[0]
            if op == "eq" and isinstance(arg, str):
                return arg
    return None


def study_target(exp: TableSpec, runs: Sequence[Run], runs_dir: Path) -> Target:
    """The project, entity and group the study's runs were logged to (the most common among the
    selected runs; the defaults and the file's `experiment` filter, or its name, without runs)."""
    selected = [r for r in runs if exp.selects(r.data)]
    loggers = [(r.data.get("config") or {}).get("logger") or {} for r in selected]
    group = (
        _most_common(lg.get("group") for lg in loggers)
        or _most_common(r.data["summary"].get("experiment") for r in selected)
        or _filtered_experiment(exp)
        or exp.path.stem
    )
    return Target(
        project=_most_common(lg.get("project") for lg in loggers) or _default_project(),
        entity=_most_common(lg.get("entity") for lg in loggers),
        group=str(group),
        dir=Path(runs_dir),
    )


def table_rows(header: Sequence[str], body: Sequence[Sequence[str]], keys: int) -> list[list[str]]:
    """The terminal table's rows with the row keys repeated on every line: the terminal leaves
    them blank under the first line of a group, a W&B table sorts and filters by them."""
    rows, last = [], [""] * keys
    for line in body:
        last = [cell or last[i] for i, cell in enumerate(line[:keys])]
        rows.append([*last, *line[keys:]])
    return rows


def unique_columns(header: Sequence[str]) -> list[str]:
    """W&B table columns must be distinct; a repeated header gets a `#2` suffix."""
    seen: Counter[str] = Counter()
    out = []
    for name in header:
        seen[name] += 1
        out.append(name if seen[name] == 1 else f"{name} #{seen[name]}")
    return out


def table_run_id(target: Target, exp: TableSpec) -> str:
    """One table run per (project, group, experiment file name): logging the table again after
    more seeds finish updates the same W&B run instead of adding another to the group."""
    key = f"{target.project}/{target.group}/{exp.path.stem}"
    return f"table-{hashlib.sha256(key.encode()).hexdigest()[:10]}"


def table_config(table: Table, target: Target) -> dict[str, Any]:
    exp = table.experiment
    return {
        "experiment": target.group,
        "experiment_file": str(exp.path),
        "title": exp.title,
        "rows": [a.label for a in exp.rows],
        "column": exp.column.label,
        "columns": [exp.column.display(c) for c in table.columns],
        "cells": [m.label for m in exp.cells],
        "baseline": exp.baseline,
    }


def log_table(table: Table, plots: Sequence[Path], target: Target, mode: str = "offline") -> str:
    """Log `table` (the cells and notes the terminal shows) and `plots` (PNG files) as a W&B run
    of job type `table` in the study's group; returns a line saying where it went. Raises on any
    W&B failure (report_table turns that into a warning)."""
    import wandb

    header, body, _ = grid(table)
    keys = len(table.experiment.rows) + 1  # the row fields and the metric label
    target.dir.mkdir(parents=True, exist_ok=True)
    run = wandb.init(
        project=target.project,
        entity=target.entity,
        group=target.group,
        job_type=TABLE_JOB_TYPE,
        name=f"table-{table.experiment.path.stem}",
        id=table_run_id(target, table.experiment),
        resume="allow",
        notes="\n".join(table.notes),
        tags=[f"job:{TABLE_JOB_TYPE}", f"experiment:{target.group}"],
        config=table_config(table, target),
        dir=str(target.dir),
        mode=mode,
        settings=wandb.Settings(console="off", silent=True),
    )
    failed = True
    try:
        row: dict[str, Any] = {
            TABLE_KEY: wandb.Table(
                columns=unique_columns(header), data=table_rows(header, body, keys)
            ),
            NOTES_KEY: wandb.Table(columns=["note"], data=[[n] for n in table.notes]),
        }
        if plots:
            row[PLOTS_KEY] = [wandb.Image(str(p), caption=Path(p).name) for p in plots]
        run.log(row)
        failed = False
    finally:
        where = run.url if mode == "online" else run.settings.sync_dir
        run.finish(exit_code=1 if failed else 0)
    if mode == "online":
        return f"W&B: table run {run.id} in group {target.group}: {where}"
    return f"W&B: table run {run.id} logged offline to {where} (upload: wandb sync {where})"


def report_table(
    table: Table,
    runs: Sequence[Run],
    runs_dir: Path,
    plots: Sequence[Path] | None = None,
    mode: str = "offline",
) -> str:
    """log_table that never raises: the table is the result, W&B only shows it. Without `plots`
    the experiment's plots are drawn to a temporary folder for the run."""
    exp = table.experiment
    try:
        target = study_target(exp, runs, runs_dir)
        if plots is not None or not exp.plots:
            return log_table(table, plots or [], target, mode)
        with tempfile.TemporaryDirectory(prefix="uapt-plots-") as tmp:
            drawn, _ = make_plots(exp, runs, tmp)
            return log_table(table, drawn, target, mode)
    except Exception as e:
        return (
            f"uapt-table: warning: W&B: the table was not logged ({one_line(e)}); the table stands"
        )
