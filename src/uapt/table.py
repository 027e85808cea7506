"""uapt-table: the paper's tables and plots from finished run records.

An experiment file (experiments/*.yaml, documented in docs/tables.md) selects runs among
`<runs_dir>/<slug>-<id>/run.json`, lays them out as rows x columns, aggregates every cell over
seeds (mean ± sample std), gives every delta to the baseline column a paired bootstrap interval
(uapt.bootstrap, over the runs' per-sample outcomes in uapt.outcomes) and renders it for the
terminal (rich), Markdown, CSV or LaTeX (booktabs); `--plot OUTDIR` draws the file's figures as
PNG. Runs that are not completed are counted and reported, never aggregated; expected cells
without results read "missing".
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import re
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, NoReturn

import yaml

from uapt import bootstrap, files, outcomes
from uapt.records import semantic_config

FORMATS = ("rich", "markdown", "csv", "latex")
PLOT_KINDS = ("mask_ratio", "distill_weight", "id_vs_ood", "curve")
OPS = ("eq", "ne", "in", "not_in", "gt", "ge", "lt", "le")
# Bare field names resolve to summary.<name>, except these top-level record fields.
TOP_LEVEL_FIELDS = ("id", "slug", "status")
MISSING_TEXT = "missing"
NONE_TEXT = "—"  # an em dash: "not applicable" / "no std for n = 1"
MARK = "*"  # on a delta whose interval excludes 0


class ExperimentError(ValueError):
    """A bad experiment file; the message names the file, line and key."""


class TableError(ValueError):
    """Data a table cannot be built from (e.g. paired runs sharing no eval sample); the message
    names the cell and the task."""


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()  # a path that does not exist in a record


# --------------------------------------------------------------------------- YAML with lines


class _Map(dict):
    """A YAML mapping that remembers the line of each key, for error messages."""

    lines: dict[Any, int]


class _Seq(list):
    """A YAML sequence that remembers the line of each item."""

    lines: list[int]


class _Loader(yaml.SafeLoader):
    pass


class _YamlProblem(Exception):
    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:
            raise _YamlProblem(line, f"unhashable mapping key {key!r}") from None
        if key in out:
            raise _YamlProblem(line, f"duplicate key {key!r}")
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = line
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(item, deep=True) for item in node.value)
    out.lines = [item.start_mark.line + 1 for item in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def _line_of(container: Any, key: Any) -> int | None:
    lines = getattr(container, "lines", None)
    if isinstance(lines, dict):
        return lines.get(key)
    if isinstance(lines, list) and isinstance(key, int) and 0 <= key < len(lines):
        return lines[key]
    return None


# --------------------------------------------------------------------------- values and paths


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _canon(v: Any) -> Any:
    """A hashable key for a record value; numbers rounded so YAML 0.1 equals JSON 0.1."""
    if _is_number(v):
        return float(round(float(v), 10))
    if isinstance(v, list | tuple):
        return tuple(_canon(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((str(k), _canon(x)) for k, x in v.items()))
    return v


def _equal(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return _canon(a) == _canon(b)


def _sort_key(v: Any) -> tuple[int, Any]:
    if _is_number(v):
        return (0, v)
    if isinstance(v, str):
        return (1, v)
    if v is None:
        return (3, "")
    return (2, str(v))


def _fmt_value(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if _is_number(v):
        return f"{v:g}"
    return str(v)


def split_path(text: str) -> tuple[str, ...]:
    """Split a dotted path; a segment holding a '.' is written in double quotes.

    '/' and ',' need no escaping: `metrics.val/loss`, `eval.gsm8k.exact_match,strict-match`.
    """
    segments: list[str] = []
    i = 0
    while True:
        if text.startswith('"', i):
            end = text.find('"', i + 1)
            if end < 0:
                raise ValueError(f"unclosed quote in path {text!r}")
            segments.append(text[i + 1 : end])
            i = end + 1
            if i < len(text) and text[i] != ".":
                raise ValueError(f"expected '.' after a quoted segment in path {text!r}")
        else:
            end = text.find(".", i)
            end = len(text) if end < 0 else end
            segments.append(text[i:end])
            i = end
        if i >= len(text):
            break
        i += 1  # the '.'
        if i == len(text):
            raise ValueError(f"path {text!r} ends with '.'")
    if any(s == "" for s in segments):
        raise ValueError(f"empty segment in path {text!r}")
    return tuple(segments)


def field_path(spec: str | Sequence[str]) -> tuple[str, ...]:
    """A field: a bare name means summary.<name> (id/slug/status: the record's own fields)."""
    path = split_path(spec) if isinstance(spec, str) else tuple(spec)
    if len(path) == 1 and path[0] not in TOP_LEVEL_FIELDS:
        return ("summary", path[0])
    return path


def lookup(record: Any, path: Sequence[str]) -> Any:
    cur = record
    for seg in path:
        if not isinstance(cur, Mapping) or seg not in cur:
            return _MISSING
        cur = cur[seg]
    return cur


# --------------------------------------------------------------------------- experiment model


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
    if not _is_number(value):
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
        if not all(_is_number(v) and math.isfinite(v) for v in values):
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


@dataclass(frozen=True)
class Experiment:
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


# --------------------------------------------------------------------------- validation


class _Checker:
    """Raises ExperimentError as `file:line: key: message`."""

    def __init__(self, file: Path):
        self.file = file

    def fail(self, where: str, message: str, line: int | None = None) -> NoReturn:
        loc = f"{self.file}:{line}" if line else str(self.file)
        raise ExperimentError(f"{loc}: {where}: {message}")

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
                if op in ("gt", "ge", "lt", "le") and not _is_number(arg):
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
        if not _is_number(scale) or scale == 0:
            self.fail(f"{where}.scale", "expected a non-zero number", _line_of(node, "scale"))
        decimals = node.get("decimals", 1)
        if not isinstance(decimals, int) or isinstance(decimals, bool) or not 0 <= decimals <= 10:
            self.fail(
                f"{where}.decimals", "expected an integer in [0, 10]", _line_of(node, "decimals")
            )
        key = "path" if "path" in node else "paths"
        return Metric(label, paths, float(scale), decimals, f"{where}.{key}", _line_of(node, key))


def load_experiment(path: str | Path) -> Experiment:
    """Read and validate an experiment file; raise ExperimentError naming file, line and key."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ExperimentError(f"{path}: cannot read ({e.strerror})") from None
    try:
        doc = yaml.load(text, Loader=_Loader)  # a SafeLoader subclass: no arbitrary objects
    except _YamlProblem as e:
        raise ExperimentError(f"{path}:{e.line}: {e}") from None
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: invalid YAML: {e}") from None
    return parse_experiment(doc, path)


def parse_experiment(doc: Any, path: Path) -> Experiment:
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

    baseline = None
    if "baseline" in doc:
        baseline = _canon(doc["baseline"])
        expected = column.expected()
        if expected is not None and baseline not in expected:
            c.fail(
                "baseline",
                f"{doc['baseline']!r} is not among columns.values {list(expected)}",
                _line_of(doc, "baseline"),
            )
    base = doc.get("base", True)
    if not isinstance(base, bool):
        c.fail("base", "expected true or false", _line_of(doc, "base"))
    paper = _parse_paper(c, doc, rows, cells)
    plots = _parse_plots(c, doc, cells, column)
    return Experiment(
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
        if not _is_number(item[number_key]):
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


# --------------------------------------------------------------------------- run records


@dataclass(frozen=True)
class Run:
    folder: Path
    data: Mapping[str, Any]

    @property
    def status(self) -> str:
        return str(self.data.get("status") or "unknown")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def name(self) -> str:
        return str(self.data.get("slug") or self.folder.name)

    @property
    def seed(self) -> Any:
        return lookup(self.data, ("summary", "seed"))

    def identity(self) -> dict[str, Any]:
        """What a run computes apart from its seed (equal identities differ by seed only)."""
        config = self.data.get("config")
        try:
            ident = semantic_config(config) if isinstance(config, Mapping) else None
        except (KeyError, TypeError, AttributeError):
            ident = None
        if ident is None:
            ident = {"summary": dict(self.data.get("summary") or {})}
            ident["summary"].pop("experiment", None)
        ident.pop("seed", None)
        ident.get("summary", {}).pop("seed", None)
        return ident


def load_runs(dirs: Iterable[str | Path]) -> tuple[list[Run], list[str]]:
    """Every `<dir>/*/run.json` (or `<dir>/run.json`); returns the runs and load problems."""
    runs: list[Run] = []
    problems: list[str] = []
    for d in map(Path, dirs):
        folders = (
            [d]
            if (d / "run.json").is_file()
            # wandb/: W&B's own folder (logger.dir defaults to the runs directory), not a run
            else sorted(
                p
                for p in d.iterdir()
                if p.is_dir() and not p.name.startswith(".") and p.name != "wandb"
            )
        )
        for folder in folders:
            path = folder / "run.json"
            if not path.is_file():
                problems.append(f"{folder}: no run.json (skipped)")
                continue
            try:
                data = files.read_json(path)
            except OSError as e:
                problems.append(f"{path}: unreadable ({e}) (skipped)")
                continue
            except files.DamagedFile as e:
                problems.append(f"{e} (skipped)")
                continue
            if not isinstance(data, dict) or not isinstance(data.get("summary"), dict):
                problems.append(f"{path}: not a run record (no summary) (skipped)")
                continue
            runs.append(Run(folder, data))
    return runs, problems


# --------------------------------------------------------------------------- the table


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)  # scaled, one per completed run
    incomplete: Counter[str] = field(default_factory=Counter)
    delta: float | None = None
    runs: list[Run] = field(default_factory=list)  # the run of each value
    ci: bootstrap.Interval | None = None  # of the delta, paired with the baseline cell

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / self.n if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (ddof=1); None for fewer than two seeds."""
        if self.n < 2:
            return None
        m = sum(self.values) / self.n
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1))


@dataclass
class Table:
    experiment: Experiment
    rows: list[tuple[Any, ...]]
    columns: list[Any]
    cells: dict[tuple[tuple[Any, ...], str, Any], Cell]
    base: dict[tuple[tuple[Any, ...], str], float | str | None]  # value, "missing", "varies", None
    paper: dict[tuple[tuple[Any, ...], str], list[str]]
    paper_cells: dict[tuple[tuple[Any, ...], str, Any], dict[str, float]]
    notes: list[str]
    show_n: bool
    ci: bootstrap.Settings = field(default_factory=bootstrap.Settings)


def _count_text(counts: Mapping[str, int], sep: str = ", ") -> str:
    return sep.join(f"{n} {status}" for status, n in sorted(counts.items()))


def _signed(x: float, decimals: int) -> str:
    text = f"{x:+.{decimals}f}"
    return "+" + text[1:] if float(text) == 0 else text


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _pooling_note(where: str, runs: Sequence[Run]) -> str | None:
    """Say when a cell pools runs that differ in more than their seed."""
    idents = [_flatten(r.identity()) for r in runs]
    distinct = {json.dumps(i, sort_keys=True, default=str) for i in idents}
    seeds = Counter(_canon(r.seed) for r in runs)
    dup = sorted((s for s, n in seeds.items() if n > 1), key=_sort_key)
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
        parts.append(f"with repeated seed(s) {', '.join(map(_fmt_value, dup))}")
    return " ".join(parts) + "; narrow `runs` or add a row field."


def build_table(
    exp: Experiment,
    runs: Sequence[Run],
    problems: Sequence[str] = (),
    ci: bootstrap.Settings | None = None,
) -> Table:
    """Aggregate the selected runs into the experiment's grid (all the arithmetic lives here);
    `ci`: level, draws and seed of the deltas' intervals (default 95 %, 10000, 0).

    Raises ExperimentError for a cell path no selected completed run has, TableError for paired
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
        bad = [a.name for a, k in zip((*exp.rows, exp.column), keys, strict=True) if k is _MISSING]
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
    table = Table(exp, rows, columns, {}, {}, defaultdict(list), {}, notes, False, settings)
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
        note = _pooling_note(f"cell {_where(exp, rk, ck)}", done) if len(done) > 1 else None
        if note:
            notes.append(note)

    _add_deltas(table)
    _add_intervals(table)
    _add_base(table, placed)
    _add_paper(table)
    _add_notes(table, selected, unplaced, absent, problems)
    return table


def _where(exp: Experiment, rk: tuple[Any, ...], ck: Any) -> str:
    parts = [a.display(k) for a, k in zip(exp.rows, rk, strict=True)]
    return " / ".join([*parts, exp.column.display(ck)])


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
    base_col = table.experiment.baseline
    if base_col is None:
        return
    for (rk, label, ck), cell in table.cells.items():
        ref = table.cells.get((rk, label, base_col))
        if ck != base_col and ref is not None and cell.n and ref.n:
            cell.delta = cell.mean - ref.mean  # type: ignore[operator]


def _check_metrics(exp: Experiment, done: Sequence[Run]) -> None:
    """A cell path that no selected completed run has (a typo, or a metric the runs never
    computed) is an error naming the key, not a table of "missing"."""
    if not done:
        return  # nothing has finished yet: cells read "missing (n running)", not an error
    for metric in exp.cells:
        for path in metric.paths:
            if not any(_is_number(lookup(r.data, path)) for r in done):
                loc = f"{exp.path}:{metric.line}" if metric.line else str(exp.path)
                raise ExperimentError(
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
                    f"{_where_row(exp, rk)} (different base models or suites)."
                )
            else:
                table.base[(rk, metric.label)] = values[0]


def _where_row(exp: Experiment, rk: tuple[Any, ...]) -> str:
    return " / ".join(a.display(k) for a, k in zip(exp.rows, rk, strict=True)) or "(all)"


def _add_paper(table: Table) -> None:
    exp = table.experiment
    col = exp.column
    for i, entry in enumerate(exp.paper):
        metric = next(m for m in exp.cells if m.label == entry.metric)
        d = metric.decimals
        matched = [rk for rk in table.rows if all(_equal(rk[j], v) for j, v in entry.row)]
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
                    f"ours {_signed(a.mean - b.mean, d)}"
                    if a and b and a.n and b.n  # type: ignore[operator]
                    else f"ours {MISSING_TEXT}"
                )
                text = (
                    f"{col.display(entry.column, True)} vs {col.display(entry.vs, True)}: "
                    f"{_signed(entry.delta, d)} ({ours})"
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
    if exp.baseline is not None:
        notes.append(f"(±Δ): difference to the {exp.column.display(exp.baseline, True)} column.")
        if any(c.ci is not None for c in table.cells.values()):
            notes.append(_ci_note(table.ci))
    if exp.base:
        notes.append("base: the model before post-training (eval_base).")
    if not selected:
        notes.append("No run matched the experiment's `runs` filter.")
    incomplete = [r for r in selected if not r.completed]
    if incomplete:
        notes.append(f"Not aggregated: {_count_text(Counter(r.status for r in incomplete))}.")
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


# --------------------------------------------------------------------------- the deltas' intervals
# Pairs the runs of a cell and of its baseline cell by seed and their per-sample outcomes
# (uapt.outcomes) by doc id; the statistics are uapt.bootstrap's.

# Why an interval resamples seeds only (uapt.bootstrap.paired_seeds) rather than samples too.
NOT_EVAL = "not an eval metric"
NO_FILE = (
    "no per-sample outcomes: runs without eval_outcomes.jsonl, e.g. recorded before outcomes "
    "were kept"
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
                f"than the tail): they understate the uncertainty, and {MARK} on them says little "
                "more than that every paired seed moved the same way."
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
        f"samples when one seed pairs); {MARK} marks an interval that excludes 0."
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
    loaded: dict[Path, Any] = {}  # run folder -> its outcomes, None or the DamagedFile
    for where, cell in table.cells.items():
        if cell.delta is not None:
            cell.ci = _interval(table, where, cell, loaded, notes)
    table.notes.extend(notes.render(table))


def _interval(
    table: Table, where: Where, cell: Cell, loaded: dict[Path, Any], notes: _IntervalNotes
) -> bootstrap.Interval | None:
    """The interval of one cell's delta: over per-sample outcomes when every paired run has
    them, else over seeds only (none under two paired seeds)."""
    exp, (rk, label, ck) = table.experiment, where
    ref = table.cells[(rk, label, exp.baseline)]
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
        seeds, partial = _paired_outcomes(metric, pairs, cell, ref, loaded, notes)
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


def _pair_seeds(
    exp: Experiment, cell: Cell, ck: Any, ref: Cell
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
    loaded: dict[Path, Any],
    notes: _IntervalNotes,
) -> tuple[list[list[bootstrap.TaskSamples]], list[tuple[str, str]]]:
    """Per paired seed, per task of the metric: both runs' outcomes on the samples both scored;
    and (task, text) for each pair whose runs did not score the same samples. Raises
    _NoOutcomes when a run lacks them, _ZeroSamples when two runs share no sample."""
    keys = _outcome_keys(metric)
    if keys is None:
        raise _NoOutcomes(NOT_EVAL)
    seeds, partial = [], []
    for seed, i, j in pairs:
        tasks = []
        for task, names in keys.items():
            sides = [
                _run_outcomes(r, task, names, loaded, notes) for r in (cell.runs[i], ref.runs[j])
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
    run: Run, task: str, names: Sequence[str], loaded: dict[Path, Any], notes: _IntervalNotes
) -> list[Mapping[Any, Any]]:
    """The run's {doc_id: outcome} for each of the task's metric names, when they reproduce
    the score in its record (so that the interval is about the number the table shows)."""
    if run.folder not in loaded:
        try:
            loaded[run.folder] = outcomes.read(run.folder)
        except files.DamagedFile as e:
            loaded[run.folder] = e
            notes.damaged.append(f"not loaded: {e} (seeds-only intervals for its cells)")
    got = loaded[run.folder]
    if got is None:
        raise _NoOutcomes(NO_FILE)
    if isinstance(got, files.DamagedFile):
        raise _NoOutcomes(DAMAGED)
    per_name = []
    for name in names:
        values = got.get((task, name))
        if not values:
            raise _NoOutcomes(NOT_PER_SAMPLE)
        recorded = lookup(run.data, ("eval", task, name))
        try:
            agg = outcomes.aggregate(values.values())
        except (TypeError, ValueError):  # not numbers: treated like a file that disagrees
            agg = None
        if agg is None or not math.isclose(agg, recorded, rel_tol=1e-6, abs_tol=1e-9):
            raise _NoOutcomes(MISMATCH)
        per_name.append(values)
    return per_name


# --------------------------------------------------------------------------- rendering


def _cell_text(cell: Cell, metric: Metric, show_n: bool) -> str:
    if not cell.n:
        extra = f" ({_count_text(cell.incomplete)})" if cell.incomplete else ""
        return MISSING_TEXT + extra
    d = metric.decimals
    std = NONE_TEXT if cell.std is None else f"{cell.std:.{d}f}"
    text = f"{cell.mean:.{d}f} ± {std}"
    if cell.delta is not None:
        text += f" ({_delta_text(cell.delta, cell.ci, d)})"
    if show_n:
        text += f" [n={cell.n}]"
    return text


def _delta_text(delta: float, ci: bootstrap.Interval | None, d: int) -> str:
    """+4.0, or +4.0* [+1.2, +6.8]: the marked delta's interval excludes 0."""
    if ci is None:
        return _signed(delta, d)
    mark = MARK if ci.significant else ""
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
    interval in delta_lo, delta_hi, delta_significant and how it was made in the ci_ columns."""
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
                        *_csv_ci(cell.ci, table.ci, num),
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
)


def _csv_ci(
    ci: bootstrap.Interval | None, settings: bootstrap.Settings, num: Callable[[Any], str]
) -> list[str]:
    if ci is None:
        return [""] * len(CSV_CI_COLUMNS)
    significant = "true" if ci.significant else "false"
    level, draws, seed = num(settings.level), str(settings.draws), str(settings.seed)
    return [num(ci.lo), num(ci.hi), significant, ci.method, level, draws, seed, str(ci.seeds)]


def _csv_key(key: Any) -> str:
    if key is None:
        return ""
    return format(key, ".10g") if _is_number(key) else str(key)


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


# --------------------------------------------------------------------------- plots


_AXIS_LABELS = {"mask_ratio": "mask ratio ρ", "distill_weight": "distill weight λ"}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "metric"


def _stats(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value: no error bar)."""
    c = Cell(values=list(values))
    return c.mean or 0.0, c.std or 0.0


def make_plots(
    exp: Experiment, runs: Sequence[Run], outdir: str | Path
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
    keys = sorted(groups, key=lambda k: tuple(map(_sort_key, k)))
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
    ax.set_xticks(ticks, [_fmt_value(x) for x in ticks])  # label exactly the swept values


def _draw_sweep(fig: Any, spec: PlotSpec, runs: Sequence[Run], notes: list[str]) -> bool:
    metric = spec.metrics[0]
    x_path = ("summary", spec.kind)
    usable = [
        r
        for r in runs
        if metric.value(r.data) is not None
        and _is_number(lookup(r.data, x_path))
        and spec.by.key(r.data) is not _MISSING
    ]
    if not usable:
        return False
    for ax, title, panel_runs in _panels(fig, spec, usable):
        lines: dict[Any, dict[float, list[Run]]] = defaultdict(lambda: defaultdict(list))
        for r in panel_runs:
            lines[spec.by.key(r.data)][_canon(lookup(r.data, x_path))].append(r)
        for line_key in spec.by.order(lines):
            points = sorted(lines[line_key].items())
            for x, rs in points:
                note = (
                    _pooling_note(
                        f"plot {spec.kind} {title} {spec.by.display(line_key, True)} "
                        f"x={_fmt_value(x)}",
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
        if _is_number(value) and math.isfinite(value) and _is_number(row.get("step")):
            points[int(row["step"])] = float(value)
    return points


def _draw_curve(fig: Any, spec: PlotSpec, runs: Sequence[Run], notes: list[str]) -> bool:
    """A metrics.jsonl column against the step: one line per `by` value, mean ± std over seeds
    (the band) at the steps every run of the line logged."""
    key = spec.metrics[0].label
    curves = {r.folder: _curve(r, key) for r in runs}
    usable = [r for r in runs if curves[r.folder] and spec.by.key(r.data) is not _MISSING]
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
        and spec.by.key(r.data) is not _MISSING
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
                _pooling_note(f"plot id_vs_ood {title} {spec.by.display(key, True)}", rs)
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


# --------------------------------------------------------------------------- CLI


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
        "--wandb",
        action="store_true",
        help="also log the table and plots to W&B: a run of job type `table` in the runs' group",
    )
    parser.add_argument("--wandb-mode", choices=("offline", "online"), default="offline")
    args = parser.parse_args(argv)

    try:
        exp = load_experiment(args.experiment)
    except ExperimentError as e:
        print(f"uapt-table: error: {e}", file=sys.stderr)
        return 2
    dirs = args.runs or [Path("runs")]
    for d in dirs:
        if not d.is_dir():
            print(f"uapt-table: error: runs directory not found: {d}", file=sys.stderr)
            return 2
    runs, problems = load_runs(dirs)
    try:
        table = build_table(
            exp, runs, problems, bootstrap.Settings(args.ci, args.bootstrap, args.seed)
        )
    except (ExperimentError, TableError) as e:
        print(f"uapt-table: error: {e}", file=sys.stderr)
        return 2
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(render(table, args.format))
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
        from uapt.wandb_report import report_table

        print(report_table(table, runs, dirs[0], written, args.wandb_mode), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
