"""Shared pieces of the reporting code: record paths and values, YAML that remembers its lines
(for error messages), the constants and errors."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from uapt.schema import is_number

FORMATS = ("rich", "markdown", "csv", "latex")

PLOT_KINDS = ("mask_ratio", "distill_weight", "id_vs_ood", "curve")

OPS = ("eq", "ne", "in", "not_in", "gt", "ge", "lt", "le")

# Bare field names resolve to summary.<name>, except these top-level record fields.
TOP_LEVEL_FIELDS = ("id", "slug", "status")

MISSING_TEXT = "missing"

NONE_TEXT = "—"  # an em dash: "not applicable" / "no std for n = 1"

MARK = "*"  # on a delta that survives the table's adjustment (uapt.table.adjust)


class TableSpecError(ValueError):
    """A bad experiment file; the message names the file, line and key."""


class TableError(ValueError):
    """Data a table cannot be built from (e.g. paired runs sharing no eval sample); the message
    names the cell and the task."""


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()  # a path that does not exist in a record


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


def _canon(v: Any) -> Any:
    """A hashable key for a record value; numbers rounded so YAML 0.1 equals JSON 0.1."""
    if is_number(v):
        return float(round(float(v), 10))
    if isinstance(v, list | tuple):
        return tuple(_canon(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((str(k), _canon(x)) for k, x in v.items()))
    return v


def _equal(a: Any, b: Any) -> bool:
    if is_number(a) and is_number(b):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return _canon(a) == _canon(b)


def _sort_key(v: Any) -> tuple[int, Any]:
    if is_number(v):
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
    if is_number(v):
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
