"""A study's W&B workspace (`uapt-workspace <file>`): a saved view of its runs grouped by
objective variant, so that nobody builds the comparison by hand and the dashboard shows the same
numbers as the paper table, whose W&B run (`uapt-table <file> --wandb`) is uapt.table.wandb_run's
and shows in the view's panels.

It goes to the project and group of the study's runs (their records' `config.logger`), offline by
default like every run. A workspace that cannot be saved (offline, no credentials, no server) is
written to a file that `uapt-workspace --save FILE` saves once W&B is reachable.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import unicodedata
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from uapt import files
from uapt.errors import one_line
from uapt.records import load_runs
from uapt.table.spec import load_table_spec
from uapt.table.values import TableSpecError
from uapt.table.wandb_run import MODES, NOTES_KEY, PLOTS_KEY, TABLE_KEY, Target, study_target
from uapt.tracking import EVAL_SECTIONS, STEP_KEY

if TYPE_CHECKING:
    from wandb_workspaces.workspaces import Workspace

    from uapt.table.spec import TableSpec

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
DEFAULT_API_TIMEOUT_S = 30.0


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
