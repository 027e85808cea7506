"""An experiment file (experiments/*.yaml, docs/tables.md) read and checked into an TableSpec:
which runs, laid out as which rows and columns, with which cell metrics, paper numbers and plots.
Every error names the file, the line and the key."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import yaml

from uapt.table.values import (
    _MISSING,
    OPS,
    PLOT_KINDS,
    TableSpecError,
    _canon,
    _equal,
    _fmt_value,
    _line_of,
    _Loader,
    _sort_key,
    _YamlProblem,
    field_path,
    is_number,
    lookup,
    split_path,
)


@dataclass(frozen=True)
class Condition:
    """A test on one value: all (op, argument) pairs must hold."""

    tests: tuple[tuple[str, Any], ...]

    def __call__(self, value: Any) -> bool:
        return value is not _MISSING and all(_apply(op, value, arg) for op, arg in self.tests)


def _apply(op: str, value: Any, arg: Any) -> bool:
    if op == "eq":
        return _equal(value, arg)
    if op == "ne":
        return not _equal(value, arg)
    if op == "in":
        return any(_equal(value, a) for a in arg)
    if op == "not_in":
        return not any(_equal(value, a) for a in arg)
    if not is_number(value):
        return False
    return {"gt": value > arg, "ge": value >= arg, "lt": value < arg, "le": value <= arg}[op]


@dataclass(frozen=True)
class Axis:
    """Rows or columns: a record field, its expected values (or groups) and how to show them."""

    name: str
    path: tuple[str, ...]
    label: str
    values: tuple[Any, ...] | None = None
    groups: tuple[tuple[str, Condition], ...] | None = None
    labels: Mapping[Any, str] = field(default_factory=dict)
    format: str | None = None

    def key(self, record: Mapping[str, Any]) -> Any:
        """The record's key on this axis; _MISSING when it falls in none of the groups."""
        value = lookup(record, self.path)
        if self.groups is not None:
            return next((label for label, cond in self.groups if cond(value)), _MISSING)
        return _canon(None if value is _MISSING else value)

    def expected(self) -> tuple[Any, ...] | None:
        if self.groups is not None:
            return tuple(label for label, _ in self.groups)
        return self.values

    def order(self, keys: Iterable[Any]) -> list[Any]:
        """Expected keys in their given order, then any others observed, sorted."""
        expected = list(self.expected() or ())
        extra = sorted({k for k in keys if k not in expected}, key=_sort_key)
        return expected + extra

    def display(self, key: Any, header: bool = False) -> str:
        if key in self.labels:
            return self.labels[key]
        if self.groups is not None:
            return str(key)
        if self.format is not None:
            try:
                return self.format.format(value=key)
            except (TypeError, ValueError):  # e.g. {value:g} on a string or null
                return _fmt_value(key)
        if header and not isinstance(key, str):
            return f"{self.label}={_fmt_value(key)}"
        return _fmt_value(key)


@dataclass(frozen=True)
class Metric:
    """A cell metric: the mean of one or more record paths, times `scale`."""

    label: str
    paths: tuple[tuple[str, ...], ...]
    scale: float = 1.0
    decimals: int = 1
    where: str = field(default="", compare=False)  # e.g. cells[1], for error messages
    line: int | None = field(default=None, compare=False)

    def value(self, record: Mapping[str, Any]) -> float | None:
        return self._mean(record, self.paths)

    def base_value(self, record: Mapping[str, Any]) -> float | None:
        base = self.base_paths
        return None if base is None else self._mean(record, base)

    @property
    def base_paths(self) -> tuple[tuple[str, ...], ...] | None:
        """eval.<task>.<metric> -> eval_base.<task>.<metric>; None when a path is not an eval."""
        if all(p[0] == "eval" for p in self.paths):
            return tuple(("eval_base", *p[1:]) for p in self.paths)
        return None

    def _mean(self, record: Mapping[str, Any], paths: Sequence[tuple[str, ...]]) -> float | None:
        values = [lookup(record, p) for p in paths]
        if not all(is_number(v) and math.isfinite(v) for v in values):
            return None
        return self.scale * sum(values) / len(values)


@dataclass(frozen=True)
class PaperEntry:
    """A number the paper reports, in display units (after `scale`)."""

    metric: str
    row: tuple[tuple[int, Any], ...]  # (row axis index, key) pairs that must match
    column: Any
    value: float | None
    delta: float | None
    vs: Any
    note: str | None


@dataclass(frozen=True)
class PlotSpec:
    kind: str
    metrics: tuple[Metric, ...]  # (metric,) for sweeps, (x, y) for id_vs_ood
    by: Axis
    panels: tuple[Axis, ...]
    file: str | None
    title: str | None


BASE_BASELINE = "base"  # `baseline: base`: the base model (eval_base), not a column
AMBIGUOUS_BASE = (
    "'base' names the base model (eval_base); a column value 'base' would be ambiguous: rename it"
)


@dataclass(frozen=True)
class TableSpec:
    """One experiment file (experiments/<name>.yaml): which runs, rows, columns, cells, baseline,
    paper numbers and plots make a study's table. "Experiment" in uapt names a study: its runs
    share `experiment=<name>` (their W&B group), and its table is this file."""

    path: Path
    title: str
    description: str | None
    filters: tuple[tuple[str, tuple[str, ...], Condition], ...]
    rows: tuple[Axis, ...]
    column: Axis
    cells: tuple[Metric, ...]
    baseline: Any = None
    base: bool = True
    paper: tuple[PaperEntry, ...] = ()
    plots: tuple[PlotSpec, ...] = ()

    def selects(self, record: Mapping[str, Any]) -> bool:
        return all(cond(lookup(record, path)) for _, path, cond in self.filters)

    @property
    def against_base(self) -> bool:
        """`baseline: base`: every column's delta is to the base model (its runs' eval_base)."""
        return self.baseline == BASE_BASELINE


class _Checker:
    """Raises TableSpecError as `file:line: key: message`."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, where: str, message: str, line: int | None = None) -> NoReturn:
        loc = f"{self.file}:{line}" if line else str(self.file)
        raise TableSpecError(f"{loc}: {where}: {message}")

    def keys(
        self,
        node: Any,
        where: str,
        line: int | None,
        allowed: Sequence[str],
        required: Sequence[str] = (),
    ) -> Mapping[str, Any]:
        if not isinstance(node, Mapping):
            self.fail(where, f"expected a mapping, got {type(node).__name__}", line)
        for key in node:
            if key not in allowed:
                self.fail(
                    f"{where}.{key}" if where else str(key),
                    f"unknown key (allowed: {', '.join(allowed)})",
                    _line_of(node, key),
                )
        for key in required:
            if key not in node:
                self.fail(f"{where}.{key}" if where else key, "required key is missing", line)
        return node

    def text(self, node: Mapping[str, Any], key: str, where: str) -> str:
        v = node[key]
        if not isinstance(v, str) or not v.strip():
            self.fail(
                f"{where}.{key}" if where else key,
                "expected a non-empty string",
                _line_of(node, key),
            )
        return v

    def path(self, node: Any, where: str, line: int | None, *, as_field: bool) -> tuple[str, ...]:
        if isinstance(node, list) and node and all(isinstance(s, str) and s for s in node):
            path = tuple(node)
            return field_path(path) if as_field else path
        if not isinstance(node, str):
            self.fail(
                where,
                "expected a path string like eval.ifeval.prompt_level_strict_acc "
                "or a list of segments",
                line,
            )
        try:
            path = field_path(node) if as_field else split_path(node)
        except ValueError as e:
            self.fail(where, str(e), line)
        if not as_field and len(path) < 2:
            self.fail(
                where,
                f"a metric path needs at least two segments (e.g. "
                f"metrics.val/loss, eval.<task>.<metric>), got {node!r}",
                line,
            )
        return path

    def condition(self, node: Any, where: str, line: int | None) -> Condition:
        if isinstance(node, list):
            return Condition((("in", tuple(node)),))
        if isinstance(node, Mapping):
            tests = []
            for op, arg in node.items():
                op_line = _line_of(node, op) or line
                if op not in OPS:
                    self.fail(
                        f"{where}.{op}", f"unknown operator (allowed: {', '.join(OPS)})", op_line
                    )
                if op in ("in", "not_in") and not isinstance(arg, list):
                    self.fail(f"{where}.{op}", "expected a list", op_line)
                if op in ("gt", "ge", "lt", "le") and not is_number(arg):
                    self.fail(f"{where}.{op}", "expected a number", op_line)
                tests.append((op, tuple(arg) if isinstance(arg, list) else arg))
            if not tests:
                self.fail(where, "empty condition", line)
            return Condition(tuple(tests))
        return Condition((("eq", node),))

    def axis(self, node: Any, where: str, line: int | None) -> Axis:
        if isinstance(node, str):
            return Axis(node, self.path(node, where, line, as_field=True), node)
        allowed = ("field", "label", "values", "groups", "labels", "format")
        node = self.keys(node, where, line, allowed, ("field",))
        name = self.text(node, "field", where)
        path = self.path(name, f"{where}.field", _line_of(node, "field"), as_field=True)
        label = self.text(node, "label", where) if "label" in node else name
        values = groups = None
        if "values" in node and "groups" in node:
            self.fail(where, "give either values or groups, not both", line)
        if "values" in node:
            values = node["values"]
            if not isinstance(values, list) or not values:
                self.fail(f"{where}.values", "expected a non-empty list", _line_of(node, "values"))
            values = tuple(_canon(v) for v in values)
        if "groups" in node:
            groups = self.groups(node["groups"], f"{where}.groups", _line_of(node, "groups"))
        labels: dict[Any, str] = {}
        if "labels" in node:
            raw = node["labels"]
            if not isinstance(raw, Mapping):
                self.fail(
                    f"{where}.labels", "expected a mapping value: label", _line_of(node, "labels")
                )
            labels = {_canon(k): str(v) for k, v in raw.items()}
        fmt = None
        if "format" in node:
            fmt = self.text(node, "format", where)
            try:
                fmt.format(value=0.5)
            except (KeyError, IndexError, ValueError) as e:
                self.fail(
                    f"{where}.format",
                    f"bad format string ({e}); use {{value}}",
                    _line_of(node, "format"),
                )
        return Axis(name, path, label, values, groups, labels, fmt)

    def groups(self, node: Any, where: str, line: int | None) -> tuple[tuple[str, Condition], ...]:
        if not isinstance(node, list) or not node:
            self.fail(where, "expected a non-empty list of {label, when}", line)
        out = []
        for i, item in enumerate(node):
            w, item_line = f"{where}[{i}]", _line_of(node, i)
            item = self.keys(item, w, item_line, ("label", "when"), ("label", "when"))
            label = self.text(item, "label", w)
            if label in [g[0] for g in out]:
                self.fail(f"{w}.label", f"duplicate group label {label!r}", item_line)
            out.append((label, self.condition(item["when"], f"{w}.when", _line_of(item, "when"))))
        return tuple(out)

    def metric(self, node: Any, where: str, line: int | None) -> Metric:
        allowed = ("label", "path", "paths", "scale", "decimals")
        node = self.keys(node, where, line, allowed, ("label",))
        label = self.text(node, "label", where)
        if ("path" in node) == ("paths" in node):
            self.fail(where, "give exactly one of path (one metric) or paths (their mean)", line)
        if "path" in node:
            paths = (
                self.path(node["path"], f"{where}.path", _line_of(node, "path"), as_field=False),
            )
        else:
            raw = node["paths"]
            if not isinstance(raw, list) or not raw:
                self.fail(
                    f"{where}.paths", "expected a non-empty list of paths", _line_of(node, "paths")
                )
            paths = tuple(
                self.path(p, f"{where}.paths[{i}]", _line_of(raw, i), as_field=False)
                for i, p in enumerate(raw)
            )
        scale = node.get("scale", 1)
        if not is_number(scale) or scale == 0:
            self.fail(f"{where}.scale", "expected a non-zero number", _line_of(node, "scale"))
        decimals = node.get("decimals", 1)
        if not isinstance(decimals, int) or isinstance(decimals, bool) or not 0 <= decimals <= 10:
            self.fail(
                f"{where}.decimals", "expected an integer in [0, 10]", _line_of(node, "decimals")
            )
        key = "path" if "path" in node else "paths"
        return Metric(label, paths, float(scale), decimals, f"{where}.{key}", _line_of(node, key))


def load_table_spec(path: str | Path) -> TableSpec:
    """Read and validate an experiment file; raise TableSpecError naming file, line and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TableSpecError(f"{path}: cannot read ({e.strerror})") from None
    try:
        doc = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except _YamlProblem as e:
        raise TableSpecError(f"{path}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        raise TableSpecError(f"{path}: invalid YAML: {e}") from None
    return parse_experiment(doc, path)


def parse_experiment(doc: Any, path: Path) -> TableSpec:
    c = _Checker(path)
    top = (
        "title",
        "description",
        "runs",
        "rows",
        "columns",
        "cells",
        "baseline",
        "base",
        "paper",
        "plots",
    )
    doc = c.keys(doc, "", None, top, ("title", "rows", "columns", "cells"))
    title = c.text(doc, "title", "")
    description = c.text(doc, "description", "") if "description" in doc else None

    filters = []
    runs = doc.get("runs") or {}
    if not isinstance(runs, Mapping):
        c.fail("runs", "expected a mapping field: condition", _line_of(doc, "runs"))
    for key, cond in runs.items():
        line = _line_of(runs, key)
        filters.append(
            (
                str(key),
                c.path(str(key), f"runs.{key}", line, as_field=True),
                c.condition(cond, f"runs.{key}", line),
            )
        )

    rows_node = doc["rows"]
    if not isinstance(rows_node, list):
        c.fail("rows", "expected a list of fields, e.g. [model, dataset]", _line_of(doc, "rows"))
    rows = tuple(c.axis(r, f"rows[{i}]", _line_of(rows_node, i)) for i, r in enumerate(rows_node))
    column = c.axis(doc["columns"], "columns", _line_of(doc, "columns"))
    names = [a.name for a in (*rows, column)]
    if len(set(names)) != len(names):
        c.fail(
            "rows", f"a field appears twice among rows and columns: {names}", _line_of(doc, "rows")
        )

    cells_node = doc["cells"]
    if not isinstance(cells_node, list) or not cells_node:
        c.fail("cells", "expected a non-empty list of {label, path}", _line_of(doc, "cells"))
    cells = tuple(
        c.metric(m, f"cells[{i}]", _line_of(cells_node, i)) for i, m in enumerate(cells_node)
    )
    labels = [m.label for m in cells]
    if len(set(labels)) != len(labels):
        c.fail("cells", f"cell labels must be unique, got {labels}", _line_of(doc, "cells"))

    base = doc.get("base", True)
    if not isinstance(base, bool):
        c.fail("base", "expected true or false", _line_of(doc, "base"))
    baseline = None
    if "baseline" in doc:
        baseline = _canon(doc["baseline"])
        expected = column.expected()
        if baseline == BASE_BASELINE:
            if expected is not None and BASE_BASELINE in expected:
                c.fail("baseline", AMBIGUOUS_BASE, _line_of(doc, "baseline"))
            if not base:
                c.fail("baseline", "base needs the base column (base: true)", _line_of(doc, "base"))
        elif expected is not None and baseline not in expected:
            c.fail(
                "baseline",
                f"{doc['baseline']!r} is not among columns.values {list(expected)} "
                f"(or `{BASE_BASELINE}`: the base model)",
                _line_of(doc, "baseline"),
            )
    paper = _parse_paper(c, doc, rows, cells)
    plots = _parse_plots(c, doc, cells, column)
    return TableSpec(
        path, title, description, tuple(filters), rows, column, cells, baseline, base, paper, plots
    )


def _parse_paper(
    c: _Checker, doc: Mapping[str, Any], rows: tuple[Axis, ...], cells: tuple[Metric, ...]
) -> tuple[PaperEntry, ...]:
    node = doc.get("paper") or []
    if not isinstance(node, list):
        c.fail("paper", "expected a list", _line_of(doc, "paper"))
    labels = [m.label for m in cells]
    row_names = [a.name for a in rows]
    out = []
    for i, item in enumerate(node):
        w, line = f"paper[{i}]", _line_of(node, i)
        item = c.keys(
            item,
            w,
            line,
            ("metric", "row", "column", "value", "delta", "vs", "note"),
            ("metric", "column"),
        )
        if item["metric"] not in labels:
            c.fail(
                f"{w}.metric",
                f"{item['metric']!r} is not a cell label {labels}",
                _line_of(item, "metric"),
            )
        row = item.get("row") or {}
        if not isinstance(row, Mapping):
            c.fail(f"{w}.row", "expected a mapping field: value", _line_of(item, "row"))
        for key in row:
            if key not in row_names:
                c.fail(f"{w}.row.{key}", f"not a row field {row_names}", _line_of(row, key))
        if ("value" in item) == ("delta" in item):
            c.fail(w, "give exactly one of value (absolute) or delta (with vs)", line)
        number_key = "value" if "value" in item else "delta"
        if not is_number(item[number_key]):
            c.fail(f"{w}.{number_key}", "expected a number", _line_of(item, number_key))
        if ("delta" in item) != ("vs" in item):
            c.fail(w, "vs (the column the delta is measured against) goes with delta", line)
        note = c.text(item, "note", w) if "note" in item else None
        out.append(
            PaperEntry(
                item["metric"],
                tuple((row_names.index(k), _canon(v)) for k, v in row.items()),
                _canon(item["column"]),
                item.get("value"),
                item.get("delta"),
                _canon(item.get("vs")),
                note,
            )
        )
    return tuple(out)


def _parse_plots(
    c: _Checker, doc: Mapping[str, Any], cells: tuple[Metric, ...], column: Axis
) -> tuple[PlotSpec, ...]:
    node = doc.get("plots") or []
    if not isinstance(node, list):
        c.fail("plots", "expected a list", _line_of(doc, "plots"))
    by_label = {m.label: m for m in cells}
    default_by = {
        "mask_ratio": "distill_weight",
        "distill_weight": "mask_ratio",
        "id_vs_ood": "objective",
        "curve": column.name,
    }
    out = []
    for i, item in enumerate(node):
        w, line = f"plots[{i}]", _line_of(node, i)
        item = c.keys(
            item, w, line, ("kind", "metric", "x", "y", "by", "panels", "file", "title"), ("kind",)
        )
        kind = item["kind"]
        if kind not in PLOT_KINDS:
            c.fail(
                f"{w}.kind",
                f"{kind!r} is not one of {', '.join(PLOT_KINDS)}",
                _line_of(item, "kind"),
            )
        keys = ("x", "y") if kind == "id_vs_ood" else ("metric",)
        for key in ("metric", "x", "y"):
            if key in item and key not in keys:
                c.fail(
                    f"{w}.{key}",
                    f"not used by kind {kind} (it takes {', '.join(keys)})",
                    _line_of(item, key),
                )
            if key in keys and key not in item:
                c.fail(f"{w}.{key}", f"required for kind {kind}", line)
        metrics = []
        for key in keys:
            m = item[key]
            if kind == "curve":  # a column of the runs' metrics.jsonl, not a cell
                if not isinstance(m, str) or not m:
                    c.fail(f"{w}.metric", "expected a metrics.jsonl key, e.g. val/loss", line)
                metrics.append(Metric(m, ((m,),), 1.0, 3))
            elif isinstance(m, str):
                if m not in by_label:
                    c.fail(
                        f"{w}.{key}",
                        f"{m!r} is not a cell label {list(by_label)} "
                        "(or give a {label, path} mapping)",
                        _line_of(item, key),
                    )
                metrics.append(by_label[m])
            else:
                metrics.append(c.metric(m, f"{w}.{key}", _line_of(item, key)))
        by_node = item.get("by", default_by[kind])
        by = c.axis(by_node, f"{w}.by", _line_of(item, "by"))
        if by_node == column.name:  # same field as the table's columns: same order and labels
            by = column
        panels_node = item.get("panels", ["model", "dataset"])
        if not isinstance(panels_node, list):
            c.fail(f"{w}.panels", "expected a list of fields", _line_of(item, "panels"))
        panels = tuple(
            c.axis(p, f"{w}.panels[{j}]", _line_of(panels_node, j))
            for j, p in enumerate(panels_node)
        )
        file = c.text(item, "file", w) if "file" in item else None
        if file is not None and (Path(file).name != file or not file.endswith(".png")):
            c.fail(f"{w}.file", "expected a plain file name ending in .png", _line_of(item, "file"))
        title = c.text(item, "title", w) if "title" in item else None
        out.append(PlotSpec(kind, tuple(metrics), by, panels, file, title))
    return tuple(out)
