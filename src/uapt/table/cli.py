"""uapt-table: an experiment file's table and plots from finished runs (docs/tables.md)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from uapt import bootstrap, files
from uapt.records import load_runs
from uapt.table.adjust import DEFAULT as DEFAULT_ADJUST
from uapt.table.adjust import METHODS as ADJUSTMENTS
from uapt.table.aggregate import build_table
from uapt.table.cells import Table
from uapt.table.plots import make_plots
from uapt.table.power import DEFAULT_POWER, describe_missing, power_report, render_power
from uapt.table.render import render, to_rich, to_text
from uapt.table.spec import load_table_spec
from uapt.table.values import FORMATS, TableError, TableSpecError


class _Parser(argparse.ArgumentParser):
    """One line for a bad option, like every other uapt error (argparse adds the usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help for usage)\n")


def _level(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:  # also false for nan
        raise argparse.ArgumentTypeError(
            f"expected a confidence level strictly between 0 and 1 (e.g. 0.95), got {text!r}"
        )
    return value


def _draws(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= bootstrap.MAX_DRAWS:
        raise argparse.ArgumentTypeError(
            f"expected a number of bootstrap draws from 1 to {bootstrap.MAX_DRAWS}, got {text!r}"
        )
    return value


def _power(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a power strictly between 0 and 1 (e.g. 0.8), got {text!r}"
        )
    return value


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(
            f"expected an effect size > 0 in the metric's display units, got {text!r}"
        )
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = _Parser(
        prog="uapt-table",
        description="Tables (mean ± std over seeds, deltas with paired bootstrap intervals) and "
        "plots from finished uapt runs.",
    )
    parser.add_argument("experiment", type=Path, help="experiment file, e.g. experiments/demo.yaml")
    parser.add_argument(
        "--runs",
        action="append",
        type=Path,
        metavar="DIR",
        help="runs directory holding <slug>-<id>/run.json (repeatable; default ./runs)",
    )
    parser.add_argument("--format", choices=FORMATS, default="rich")
    parser.add_argument("--output", type=Path, metavar="FILE", help="write the table here")
    parser.add_argument("--plot", type=Path, metavar="OUTDIR", help="write the file's plots here")
    parser.add_argument(
        "--ci",
        type=_level,
        default=0.95,
        metavar="LEVEL",
        help="level of the deltas' paired bootstrap intervals (default 0.95)",
    )
    parser.add_argument(
        "--bootstrap",
        type=_draws,
        default=10_000,
        metavar="N",
        help="bootstrap draws per interval (default 10000)",
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of the bootstrap draws; the same seed gives the same table (default 0)",
    )
    parser.add_argument(
        "--adjust",
        choices=tuple(ADJUSTMENTS),
        default=DEFAULT_ADJUST,
        help="multiple-comparison adjustment of the deltas' marks over the whole table: holm "
        "(family-wise error), bh (Benjamini-Hochberg, false discovery rate) or none "
        f"(default {DEFAULT_ADJUST})",
    )
    parser.add_argument(
        "--power",
        type=_power,
        nargs="?",
        const=DEFAULT_POWER,
        metavar="P",
        help="print what the runs can resolve instead of the table: per delta, the paired and "
        f"seed standard deviations and the minimum detectable effect at power P (default "
        f"{DEFAULT_POWER}) for the runs' samples x seeds (docs/tables.md, Power)",
    )
    parser.add_argument(
        "--mde",
        type=_positive,
        metavar="X",
        help="with --power: the samples and the seeds each delta needs for an MDE of X "
        "(display units)",
    )
    parser.add_argument(
        "--wandb",
        action="store_true",
        help="also log the table and plots to W&B: a run of job type `table` in the runs' group",
    )
    parser.add_argument("--wandb-mode", choices=("offline", "online"), default="offline")
    args = parser.parse_args(argv)
    if args.mde is not None and args.power is None:
        parser.error("--mde needs --power")

    try:
        exp = load_table_spec(args.experiment)
    except TableSpecError as e:
        print(f"uapt-table: error: {e}", file=sys.stderr)
        return 2
    dirs = args.runs or [Path("runs")]
    for d in dirs:
        if not d.is_dir():
            print(f"uapt-table: error: runs directory not found: {d}", file=sys.stderr)
            return 2
    runs, problems = load_runs(dirs)
    try:
        settings = bootstrap.Settings(args.ci, args.bootstrap, args.seed)
        table = build_table(exp, runs, problems, settings, args.adjust)
    except (TableSpecError, TableError) as e:
        print(f"uapt-table: error: {e}", file=sys.stderr)
        return 2
    if args.power is not None:
        return _print_power(table, args.power, args.mde, args.output)
    if args.output is not None:
        files.write_text(args.output, render(table, args.format))  # atomic: never half a table
        print(f"wrote {args.output}", file=sys.stderr)
    elif args.format == "rich":
        from rich.console import Console

        console = Console()
        if console.is_terminal:
            console.print(to_rich(table))
        else:  # piped: no terminal width to respect, keep every cell on one line
            sys.stdout.write(to_text(table))
    else:
        sys.stdout.write(render(table, args.format))
    written = None
    if args.plot is not None:
        written, notes = make_plots(exp, runs, args.plot)
        for note in notes:
            print(f"plot note: {note}", file=sys.stderr)
        for path in written:
            print(f"wrote {path}", file=sys.stderr)
    if args.wandb:  # never fails the table: a W&B problem is one warning line
        from uapt.table.wandb_run import report_table  # wandb: only with --wandb

        print(report_table(table, runs, dirs[0], written, args.wandb_mode), file=sys.stderr)
    return 0


def _print_power(table: Table, power: float, target: float | None, output: Path | None) -> int:
    report = power_report(table, power, target)
    if not report.rows:
        print(f"uapt-table: error: {describe_missing(report, table)}", file=sys.stderr)
        return 2
    text = render_power(table, report)
    if output is not None:
        files.write_text(output, text)
        print(f"wrote {output}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
