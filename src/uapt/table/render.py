"""A Table as text: the terminal (rich), Markdown, LaTeX (booktabs) and tidy CSV."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Sequence
from typing import Any

from uapt import bootstrap
from uapt.table.cells import Cell, Table, _count_text, _signed
from uapt.table.spec import Metric
from uapt.table.values import FORMATS, MARK, MISSING_TEXT, NONE_TEXT, is_number


def _cell_text(cell: Cell, metric: Metric, show_n: bool) -> str:
    if not cell.n:
        extra = f" ({_count_text(cell.incomplete)})" if cell.incomplete else ""
        return MISSING_TEXT + extra
    d = metric.decimals
    std = NONE_TEXT if cell.std is None else f"{cell.std:.{d}f}"
    text = f"{cell.mean:.{d}f} ± {std}"
    if cell.delta is not None:
        text += f" ({_delta_text(cell.delta, cell.ci, d, cell.marked)})"
    if show_n:
        text += f" [n={cell.n}]"
    return text


def _delta_text(delta: float, ci: bootstrap.Interval | None, d: int, marked: bool) -> str:
    """+4.0, or +4.0* [+1.2, +6.8]: the marked delta survives the table's adjustment."""
    if ci is None:
        return _signed(delta, d)
    mark = MARK if marked else ""
    return f"{_signed(delta, d)}{mark} [{_signed(ci.lo, d)}, {_signed(ci.hi, d)}]"


def _base_text(value: float | str | None, metric: Metric) -> str:
    if value is None:
        return NONE_TEXT
    if isinstance(value, str):
        return value
    return f"{value:.{metric.decimals}f}"


def grid(table: Table) -> tuple[list[str], list[list[str]], list[bool]]:
    """Header, body rows (strings) and which body rows start a new row group."""
    exp = table.experiment
    header = [a.label for a in exp.rows] + ["metric"]
    header += ["base"] if exp.base else []
    header += [exp.column.display(ck, True) for ck in table.columns]
    header += ["paper"] if exp.paper else []
    body, starts = [], []
    for rk in table.rows:
        for j, metric in enumerate(exp.cells):
            line = [a.display(k) if j == 0 else "" for a, k in zip(exp.rows, rk, strict=True)]
            line.append(metric.label)
            if exp.base:
                line.append(_base_text(table.base.get((rk, metric.label)), metric))
            line += [
                _cell_text(table.cells[(rk, metric.label, ck)], metric, table.show_n)
                for ck in table.columns
            ]
            if exp.paper:
                line.append("; ".join(table.paper.get((rk, metric.label), [])))
            body.append(line)
            starts.append(j == 0)
    return header, body, starts


def _numeric_columns(table: Table) -> list[bool]:
    exp = table.experiment
    flags = [False] * (len(exp.rows) + 1) + [True] * (int(exp.base) + len(table.columns))
    return flags + ([False] if exp.paper else [])


def to_markdown(table: Table) -> str:
    header, body, _ = grid(table)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(_md_escape(c) for c in cells) + " |"

    out = [f"## {table.experiment.title}", ""]
    if table.experiment.description:
        out += [table.experiment.description.strip(), ""]
    out.append(line(header))
    out.append(line(["---:" if num else "---" for num in _numeric_columns(table)]))
    out += [line(row) for row in body]
    if table.notes:
        out += ["", *(f"- {_md_escape(n, table_cell=False)}" for n in table.notes)]
    return "\n".join(out) + "\n"


def _md_escape(text: str, table_cell: bool = True) -> str:
    """`*` (the significance marker) would start emphasis; in a cell `|` would split it."""
    text = text.replace(MARK, "\\" + MARK)
    return text.replace("|", "\\|") if table_cell else text


_LATEX_SPECIAL = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
    "~": r"\textasciitilde{}",
    "^": r"\textasciicircum{}",
    "±": r"$\pm$",
    NONE_TEXT: "---",
    "λ": r"$\lambda$",
    "ρ": r"$\rho$",
    "Δ": r"$\Delta$",
    "<": r"$<$",
    ">": r"$>$",
    "≥": r"$\geq$",
    "≤": r"$\leq$",
}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in text)


def to_latex(table: Table) -> str:
    header, body, starts = grid(table)
    spec = "".join("r" if num else "l" for num in _numeric_columns(table))
    out = [
        r"\begin{table}[htbp]",
        r"  \centering",
        f"  \\caption{{{latex_escape(table.experiment.title)}}}",
        f"  \\begin{{tabular}}{{{spec}}}",
        r"    \toprule",
        "    " + " & ".join(latex_escape(h) for h in header) + r" \\",
        r"    \midrule",
    ]
    for i, (row, start) in enumerate(zip(body, starts, strict=True)):
        if start and i > 0:
            out.append(r"    \midrule")
        out.append("    " + " & ".join(latex_escape(c) for c in row) + r" \\")
    out += [r"    \bottomrule", r"  \end{tabular}"]
    if table.notes:
        out.append(r"  \par\smallskip")
        out.append("  {\\footnotesize " + r"\par ".join(latex_escape(n) for n in table.notes) + "}")
    out.append(r"\end{table}")
    return "\n".join(out) + "\n"


def to_csv(table: Table) -> str:
    """Tidy CSV: one line per (row, metric, column) with numbers at full precision; the delta's
    interval in delta_lo, delta_hi, delta_significant and how it was made in the ci_ columns; its
    raw and adjusted p-values, the adjustment and whether the delta is marked."""
    exp = table.experiment

    def num(x: float | None) -> str:
        return "" if x is None else format(x, ".10g")

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        [a.name for a in exp.rows]
        + [
            "metric",
            exp.column.name,
            "mean",
            "std",
            "n",
            "delta",
            "base",
            "paper_value",
            "paper_delta",
            "not_aggregated",
            *CSV_CI_COLUMNS,
        ]
    )
    for rk in table.rows:
        for metric in exp.cells:
            base = table.base.get((rk, metric.label))
            for ck in table.columns:
                cell = table.cells[(rk, metric.label, ck)]
                paper = table.paper_cells.get((rk, metric.label, ck), {})
                writer.writerow(
                    [
                        *(_csv_key(k) for k in rk),
                        metric.label,
                        _csv_key(ck),
                        num(cell.mean),
                        num(cell.std),
                        cell.n,
                        num(cell.delta),
                        num(base) if isinstance(base, float) else "",
                        num(paper.get("value")),
                        num(paper.get("delta")),
                        _count_text(cell.incomplete, "; "),
                        *_csv_ci(cell, table, num),
                    ]
                )
    return buf.getvalue()


CSV_CI_COLUMNS = (
    "delta_lo",
    "delta_hi",
    "delta_significant",
    "ci_method",
    "ci_level",
    "ci_draws",
    "ci_seed",
    "ci_paired_seeds",
    "p_value",
    "p_adjusted",
    "adjust",
    "marked",
)


def _csv_ci(cell: Cell, table: Table, num: Callable[[Any], str]) -> list[str]:
    ci, settings = cell.ci, table.ci
    if ci is None:
        return [""] * len(CSV_CI_COLUMNS)
    level, draws, seed = num(settings.level), str(settings.draws), str(settings.seed)
    return [
        num(ci.lo),
        num(ci.hi),
        _bool(ci.significant),
        ci.method,
        level,
        draws,
        seed,
        str(ci.seeds),
        num(ci.p_value),
        num(cell.p_adjusted),
        table.adjust,
        _bool(cell.marked),
    ]


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _csv_key(key: Any) -> str:
    if key is None:
        return ""
    return format(key, ".10g") if is_number(key) else str(key)


def _rich_table(table: Table) -> Any:
    from rich.table import Table as RichTable
    from rich.text import Text

    header, body, starts = grid(table)
    rt = RichTable(title=Text(table.experiment.title, style="bold"), header_style="bold")
    for name, num in zip(header, _numeric_columns(table), strict=True):
        # fold, never truncate with an ellipsis: a cut number is a wrong number
        rt.add_column(Text(name), justify="right" if num else "left", overflow="fold")
    for i, (row, start) in enumerate(zip(body, starts, strict=True)):
        if start and i > 0:
            rt.add_section()
        rt.add_row(*(Text(c, style="dim" if c.startswith(MISSING_TEXT) else "") for c in row))
    return rt


def to_rich(table: Table) -> Any:
    """A rich renderable: the table, then its notes."""
    from rich.console import Group
    from rich.text import Text

    notes = [Text(f"• {n}", style="dim") for n in table.notes]
    return Group(_rich_table(table), *notes)


def to_text(table: Table, width: int | None = None) -> str:
    """The rich rendering as plain text, by default as wide as the table needs."""
    from rich.console import Console

    if width is None:
        wide = Console(width=1000, color_system=None, file=io.StringIO())
        width = min(1000, max(80, wide.measure(_rich_table(table)).maximum))
    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, force_terminal=False).print(to_rich(table))
    return buf.getvalue()


def render(table: Table, fmt: str) -> str:
    renderers: dict[str, Callable[[Table], str]] = {
        "markdown": to_markdown,
        "csv": to_csv,
        "latex": to_latex,
        "rich": to_text,
    }
    if fmt not in renderers:
        raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return renderers[fmt](table)
