"""A study in W&B: its table as a run (`uapt-table <file> --wandb`) and its workspace
(`uapt-workspace <file>`), so that nobody builds the comparison by hand and the dashboard shows
the same numbers as the paper table.

Both go to the project and group of the study's runs (their records' `config.logger`), offline by
default like every run. A W&B failure (no network, no or a bad key, a server error) never fails a
table: it is one warning line. A workspace that cannot be saved (offline, no credentials, no
server) is written to a file that `uapt-workspace --save FILE` saves once W&B is reachable.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tempfile
import unicodedata
import urllib.request
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import yaml

from uapt import files
from uapt.paths import CONF_DIR
from uapt.tracking import EVAL_SECTIONS, STEP_KEY, one_line

if TYPE_CHECKING:
    from wandb_workspaces.workspaces import Workspace

    from uapt.table import Run, Table, TableSpec

CONF_LOGGER = CONF_DIR / "logger" / "wandb.yaml"
TABLE_JOB_TYPE = "table"
MODES = ("offline", "online")
GROUP_KEY = "variant"  # records.run_summary's objective variant, e.g. masked_mle_distill-r0.5-l1
TRAINING_CURVES = (
    "loss",
    "loss/mle",
    "loss/distill",
    "kept_frac",
    "kept_overlap",
    "nll/kept",
    "nll/unkept",
)
SWEEP_AXES = ("mask_ratio", "distill_weight")
TABLE_KEY, NOTES_KEY, PLOTS_KEY = "study/table", "study/notes", "study/plots"
DEFAULT_API_TIMEOUT_S = 30.0


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


# --------------------------------------------------------------------------- the table run


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

    from uapt.table import grid

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
    from uapt.table import make_plots

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


# --------------------------------------------------------------------------- the workspace


def wandb_key(path: Sequence[str]) -> str | None:
    """The W&B summary key of a run-record path: eval.<task>.<metric> -> eval/<task>/<metric>
    (eval_base, eval_delta alike), metrics.<key> -> <key> (train/..., val/loss)."""
    if len(path) == 3 and path[0] in EVAL_SECTIONS:
        return "/".join(path)
    if len(path) == 2 and path[0] == "metrics":
        return path[1]
    return None


def cell_keys(exp: TableSpec) -> list[tuple[str, list[str]]]:
    """(label, W&B keys) per cell metric with a W&B counterpart; a cell that averages several
    paths lists them all (W&B has no per-run mean of keys: the table shows their mean)."""
    out = []
    for metric in exp.cells:
        keys = [wandb_key(p) for p in metric.paths]
        if keys and all(keys):
            out.append((metric.label, [k for k in keys if k]))
    return out


def main_metric(exp: TableSpec) -> str | None:
    """The first eval cell's key (the study's headline score), else the first cell's."""
    cells = cell_keys(exp)
    evals = [keys[0] for _, keys in cells if keys[0].split("/")[0] in EVAL_SECTIONS]
    return (evals or [keys[0] for _, keys in cells] or [None])[0]


def workspace_name(exp: TableSpec, target: Target) -> str:
    """`uapt: <group> (<file>)`. Not the title: W&B refuses symbols in a view's name (Unicode
    categories S*, such as ± and +), which titles use."""
    name = f"uapt: {target.group} ({exp.path.name})"
    return "".join(c for c in name if not unicodedata.category(c).startswith(("S", "Cs")))


def _eval_bars(exp: TableSpec) -> list[Any]:
    import wandb_workspaces.reports.v2 as wr

    return [
        wr.BarPlot(
            title=label if len(keys) == 1 else f"{label} (its parts; the table shows their mean)",
            metrics=[wr.SummaryMetric(k) for k in keys],
            groupby=wr.Config(GROUP_KEY),
            groupby_aggfunc="mean",
            groupby_rangefunc="stddev",
        )
        for label, keys in cell_keys(exp)
    ]


def _curves() -> list[Any]:
    import wandb_workspaces.reports.v2 as wr

    return [
        wr.LinePlot(
            title=key, x=STEP_KEY, y=[key], groupby_aggfunc="mean", groupby_rangefunc="stddev"
        )
        for key in TRAINING_CURVES
    ]


def _ablation(exp: TableSpec) -> Any:
    import wandb_workspaces.reports.v2 as wr

    axes = [wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in SWEEP_AXES]
    main = main_metric(exp)
    if main:
        axes.append(wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(main)))
    return wr.ParallelCoordinatesPlot(title="mask ratio, distill weight", columns=axes)


def _study_panels() -> list[Any]:
    import wandb_workspaces.reports.v2 as wr

    return [
        wr.WeavePanelSummaryTable(table_name=TABLE_KEY),
        wr.WeavePanelSummaryTable(table_name=NOTES_KEY),
        wr.MediaBrowser(title="plots", media_keys=[PLOTS_KEY]),
    ]


def _sections(exp: TableSpec) -> list[Any]:
    import wandb_workspaces.workspaces as ws

    return [
        ws.Section(
            name="Evaluation: mean and std over seeds", panels=_eval_bars(exp), is_open=True
        ),
        ws.Section(name="Training curves", panels=_curves(), is_open=True),
        ws.Section(name="Ablation", panels=[_ablation(exp)], is_open=True),
        ws.Section(name="Study table (uapt-table --wandb)", panels=_study_panels(), is_open=True),
    ]


def build_workspace(exp: TableSpec, target: Target) -> Workspace:
    """The study's saved view: its group's runs grouped by objective variant; eval bars, training
    curves vs step, a parallel-coordinates panel and the table run's table, notes and plots."""
    import wandb_workspaces.workspaces as ws

    return ws.Workspace(
        entity=target.entity or "",  # resolved to the default entity when saved
        project=target.project,
        name=workspace_name(exp, target),
        sections=_sections(exp),
        settings=ws.WorkspaceSettings(x_axis=STEP_KEY),
        runset_settings=ws.RunsetSettings(
            filters=[ws.Metric("Group") == target.group], groupby=[ws.Config(GROUP_KEY)]
        ),
    )


def write_workspace(workspace: Workspace, path: Path) -> Path:
    """The view exactly as the library would upload it (its model, as JSON)."""
    spec = workspace._to_model().model_dump(by_alias=True, exclude_none=True, mode="json")
    files.write_text(path, json.dumps(spec, indent=1) + "\n")
    return path


def read_workspace(path: Path) -> Workspace:
    import wandb_workspaces.workspaces as ws
    from wandb_workspaces.workspaces import internal

    # _to_model/_from_model: the library's own (de)serialisation, pinned with it in pyproject.toml
    return ws.Workspace._from_model(internal.View.model_validate(json.loads(path.read_text())))


def api_timeout() -> float:
    """Seconds to wait for the W&B server: W&B's own init timeout when set (WANDB_INIT_TIMEOUT)."""
    try:
        return float(os.environ.get("WANDB_INIT_TIMEOUT", DEFAULT_API_TIMEOUT_S))
    except ValueError:
        return DEFAULT_API_TIMEOUT_S


def server_url() -> str:
    """The W&B server wandb.Api would talk to (WANDB_BASE_URL, the settings file, the default)."""
    import wandb
    from wandb.sdk import wandb_setup

    return wandb.env.get_base_url(wandb_setup.singleton().settings.base_url)


def first_hop(url: str) -> tuple[str, int]:
    """Host and port a request to `url` connects to: the proxy of its scheme (HTTPS_PROXY, ...)
    unless the host is exempt (NO_PROXY), else the server itself."""
    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(parts.hostname or ""):
        parts = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def check_server_reachable(url: str, timeout: float) -> None:
    """Refuse, in `timeout` seconds, a server (or its proxy) that accepts no connection. wandb.Api
    would start wandb-core, which keeps retrying and can hold the process at exit for minutes."""
    host, port = first_hop(url)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        raise ConnectionError(
            f"W&B server {url} unreachable via {host}:{port} ({one_line(e)})"
        ) from None


def save_workspace(workspace: Workspace) -> str:
    """Save the view to the W&B server; returns its URL. Raises when no server or credentials."""
    import wandb

    check_server_reachable(server_url(), api_timeout())
    api = wandb.Api(timeout=api_timeout())  # fails here, in bounded time, on bad credentials
    if not workspace.entity:
        workspace.entity = api.default_entity
    workspace.save()
    return str(workspace.url)


def workspace_file(target: Target, exp: TableSpec) -> Path:
    return target.dir / "wandb" / "workspaces" / f"{exp.path.stem}.json"


def publish_workspace(
    exp: TableSpec, target: Target, mode: str = "offline", output: Path | None = None
) -> str:
    """Save the study's workspace online, or write it to a file; returns the one line to print."""
    workspace = build_workspace(exp, target)
    path = output or workspace_file(target, exp)
    if mode == "online":
        try:
            return f"W&B workspace for group {target.group}: {save_workspace(workspace)}"
        except Exception as e:
            reason = f"not saved ({one_line(e)})"
    else:
        reason = "offline"
    write_workspace(workspace, path)
    return (
        f"W&B workspace for group {target.group} {reason}: written to {path}; "
        f"save it when W&B is reachable: uapt-workspace --save {path}"
    )


# --------------------------------------------------------------------------- uapt-workspace


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="uapt-workspace",
        description="A W&B workspace (saved view) comparing a study's objectives.",
    )
    parser.add_argument("experiment", type=Path, nargs="?", help="e.g. experiments/demo.yaml")
    parser.add_argument(
        "--runs", action="append", type=Path, metavar="DIR", help="runs directory (default ./runs)"
    )
    parser.add_argument(
        "--mode", choices=MODES, default="offline", help="online: save it to the W&B server"
    )
    parser.add_argument("--output", type=Path, metavar="FILE", help="where an unsaved one goes")
    parser.add_argument("--save", type=Path, metavar="FILE", help="save a written workspace")
    return parser


def _save_file(path: Path) -> int:
    try:
        url = save_workspace(read_workspace(path))
    except Exception as e:
        print(f"uapt-workspace: error: {path} not saved: {one_line(e)}", file=sys.stderr)
        return 1
    print(f"W&B workspace saved: {url}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from uapt.table import TableSpecError, load_runs, load_table_spec

    parser = _parser()
    args = parser.parse_args(argv)
    if (args.experiment is None) == (args.save is None):
        parser.error("give an experiment file, or --save FILE")
    if args.save is not None:
        return _save_file(args.save)
    try:
        exp = load_table_spec(args.experiment)
    except TableSpecError as e:
        print(f"uapt-workspace: error: {e}", file=sys.stderr)
        return 2
    missing = [d for d in args.runs or [] if not d.is_dir()]
    if missing:
        print(f"uapt-workspace: error: runs directory not found: {missing[0]}", file=sys.stderr)
        return 2
    dirs = args.runs or [Path("runs")]  # no ./runs yet: the file's experiment, default project
    runs, _ = load_runs(d for d in dirs if d.is_dir())
    print(publish_workspace(exp, study_target(exp, runs, dirs[0]), args.mode, args.output))
    return 0


if __name__ == "__main__":
    sys.exit(main())
