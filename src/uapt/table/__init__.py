"""uapt-table: the paper's tables and plots from finished run records (docs/tables.md).

An experiment file (experiments/*.yaml) selects runs among `<runs_dir>/<slug>-<id>/run.json`, lays
them out as rows x columns, aggregates every cell over seeds (mean ± sample std), gives every
delta to the baseline column a paired bootstrap interval and p-value, marks the deltas that
survive the table's multiple-comparison adjustment, notes cells whose runs come from different
code, and renders it for the terminal (rich), Markdown, CSV or LaTeX; `--plot OUTDIR` draws the file's figures as PNG. Runs that are not
completed are counted and reported, never aggregated; expected cells without results read
"missing". Read in the order of the flow:

- `spec`: the experiment file, checked (`values`: paths, YAML with lines, constants);
- `aggregate` (with `cells`, `intervals`, `adjust`, `mixing`): the arithmetic of the table;
- `render`, `plots`: text and figures; `wandb_run`: the table as a W&B run (`--wandb`);
- `cli`: the command (the console script's module, not imported here: nothing that imports the
  table's data loads its command). Run records are read by uapt.records (load_runs), next to
  where they are written.
"""

from uapt.records import Run, load_runs
from uapt.table.aggregate import build_table
from uapt.table.cells import Cell, Table
from uapt.table.plots import make_plots
from uapt.table.render import grid, render, to_csv, to_latex, to_markdown, to_rich, to_text
from uapt.table.spec import Metric, TableSpec, load_table_spec, parse_experiment
from uapt.table.values import TableError, TableSpecError, field_path, lookup, split_path

__all__ = [
    "Cell",
    "Metric",
    "Run",
    "Table",
    "TableError",
    "TableSpec",
    "TableSpecError",
    "build_table",
    "field_path",
    "grid",
    "load_runs",
    "load_table_spec",
    "lookup",
    "make_plots",
    "parse_experiment",
    "render",
    "split_path",
    "to_csv",
    "to_latex",
    "to_markdown",
    "to_rich",
    "to_text",
]
