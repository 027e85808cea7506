"""One way to validate a config section: a frozen dataclass whose fields say what they accept.

    @dataclass(frozen=True)
    class TrainerConfig(Section):
        SECTION = "trainer"
        DEFAULTS = "trainer/default.yaml"
        max_steps: int = option(number(1, integer=True))

`Section.parse(node)` checks a section of the composed config once, at the edge: unknown keys
(naming the known ones), then every value (naming `section.key=value` and what is allowed), then
the section's own rules across keys (`check`), and returns the typed, frozen object that the code
passes down, so a function's signature says what it needs. Keys the node lacks take the values of
the section's YAML file under conf/ (`DEFAULTS`): the one place a default is written; a key
written `???` there must be given. Sections nest (`model.lora`). `as_dict` gives the plain values
back (run records and ids are made from plain values).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self

import yaml
from omegaconf import DictConfig, OmegaConf

from uapt.errors import UserError
from uapt.paths import CONF_DIR


class ConfigError(UserError):
    """A bad configuration value; the message names the key and what is allowed."""


Check = tuple[Callable[[Any], bool], str]  # (accepts value?, what is allowed, in words)
REQUIRED = "???"  # OmegaConf's "must be given" in the YAML defaults


# ----------------------------------------------------------------------------- checks
def one_of(*choices: Any) -> Check:
    return (lambda v: v in choices), "one of: " + ", ".join(map(str, choices))


def number(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
) -> Check:
    def ok(v: Any) -> bool:
        if (
            isinstance(v, bool)
            or not isinstance(v, int | float)
            or (integer and not isinstance(v, int))
            or not math.isfinite(v)
        ):
            return False
        return (lo is None or (v > lo if lo_open else v >= lo)) and (
            hi is None or (v < hi if hi_open else v <= hi)
        )

    kind = "an integer" if integer else "a finite number"
    bounds = []
    if lo is not None:
        bounds.append(f"{'>' if lo_open else '>='} {lo}")
    if hi is not None:
        bounds.append(f"{'<' if hi_open else '<='} {hi}")
    return ok, kind + (" " + " and ".join(bounds) if bounds else "")


def interval(lo: float, hi: float, *, lo_open: bool = False, hi_open: bool = False) -> Check:
    """A finite number in an interval, written as one: "a finite number in [0, 1)"."""
    ok, _ = number(lo, hi, lo_open=lo_open, hi_open=hi_open)
    return (
        ok,
        f"a finite number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}",
    )


def optional(check: Check) -> Check:
    return (lambda v: v is None or check[0](v)), check[1] + " (or null)"


def satisfies(test: Callable[[Any], bool], words: str) -> Check:
    return test, words


BOOL: Check = ((lambda v: isinstance(v, bool)), "true or false")
TEXT: Check = ((lambda v: isinstance(v, str) and v != ""), "a non-empty string")
STRING: Check = ((lambda v: isinstance(v, str)), "a string")
MAPPING: Check = ((lambda v: isinstance(v, Mapping)), "a mapping")
ANY: Check = ((lambda v: True), "anything")


def is_number(value: Any) -> bool:
    """An int or float, not a bool (True is an int to Python, not a number to a config)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- sections
def option(
    check: Check | None = None,
    *,
    section: type[Section] | None = None,
    convert: Callable[[Any], Any] | None = None,
    default: Any = dataclasses.MISSING,
    semantic: bool = True,
    hashed_as: str | None = None,
) -> Any:
    """A section field: the values it accepts, how an accepted value is stored (e.g. float for a
    number written as an int), and, for a nested section, its class. `default` is for sections
    without a YAML file (the entries of a list, like an eval suite's tasks).

    `semantic=False`: the key changes how a run is executed or observed, not what it computes,
    so it does not enter the run's id (uapt.records.semantic_config). A key is semantic unless it
    says otherwise: an undecided key splits ids, it never merges two different runs.
    `hashed_as`: the name the id hashes a renamed key under (its old one), so a rename changes no
    id."""
    metadata = {
        "check": check,
        "section": section,
        "convert": convert,
        "semantic": semantic,
        "hashed_as": hashed_as,
    }
    return dataclasses.field(default=default, metadata=metadata)


@functools.cache
def yaml_defaults(relative: str) -> dict[str, Any]:
    """The plain values of a YAML file under conf/ (the defaults of a section)."""
    node = yaml.safe_load((CONF_DIR / relative).read_text(encoding="utf-8")) or {}
    node.pop("defaults", None)  # Hydra's defaults list is not a key of the section
    return node


class Section:
    """Base of the typed config sections (see the module docstring)."""

    SECTION: ClassVar[str]
    DEFAULTS: ClassVar[str | None] = None  # YAML under conf/ with every key's default
    RENAMED: ClassVar[Mapping[str, str]] = {}  # old key -> its new name: the old one is refused

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return dict(yaml_defaults(cls.DEFAULTS)) if cls.DEFAULTS else {}

    @classmethod
    def parse(cls, node: Mapping[str, Any] | Self, where: str | None = None) -> Self:
        """The checked section from a mapping (a section object is returned as it is)."""
        if isinstance(node, cls):
            return node
        if isinstance(node, DictConfig):  # Hydra's node: its plain values (??? stays ???)
            node = OmegaConf.to_container(node, resolve=True)
        where = cls.SECTION if where is None else where
        if not isinstance(node, Mapping):
            raise ConfigError(f"{where} must be a mapping, got {type(node).__name__}")
        fields = options(cls)
        unknown = [str(k) for k in node if k not in fields]
        renamed = [k for k in unknown if k in cls.RENAMED]
        if renamed:
            old, new = renamed[0], cls.RENAMED[renamed[0]]
            raise ConfigError(f"{_key(where, old)} was renamed: use {_key(where, new)}")
        if unknown:
            raise ConfigError(
                f"{_key(where, unknown[0])} is not a known option; known: {', '.join(fields)}"
            )
        values = {**cls.defaults(), **dict(node)}
        out = {}
        for name, f in fields.items():
            if name not in values and f.default is not dataclasses.MISSING:
                values[name] = f.default
            if name not in values or values[name] == REQUIRED:
                raise ConfigError(f"{_key(where, name)} is required")
            out[name] = _checked(f, values[name], _key(where, name))
        section = cls(**out)
        section.check(where)
        return section

    def check(self, where: str) -> None:
        """Rules across keys; raise ConfigError naming the keys (under `where`). None by default."""

    def as_dict(self) -> dict[str, Any]:
        return {name: _plain(getattr(self, name)) for name in options(type(self))}


def options(cls: type) -> dict[str, dataclasses.Field]:
    """The fields that are config keys (made with `option`), by name."""
    return {
        f.name: f
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
        if "check" in f.metadata
    }


def non_semantic(cls: type) -> frozenset[str]:
    """The keys of a section declared `semantic=False` (they do not enter a run's id)."""
    return frozenset(name for name, f in options(cls).items() if not f.metadata["semantic"])


def hashed_as(cls: type) -> dict[str, str]:
    """A section's renamed keys, new name -> the old name a run's id hashes them under."""
    return {
        name: f.metadata["hashed_as"]
        for name, f in options(cls).items()
        if f.metadata["hashed_as"] is not None
    }


def _key(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name  # top-level keys have no prefix


def _checked(f: dataclasses.Field, value: Any, key: str) -> Any:
    nested = f.metadata.get("section")
    if nested is not None:
        return nested.parse(value, key)
    ok, allowed = f.metadata["check"]
    try:
        good = ok(value)
    except (TypeError, ValueError):
        good = False
    if not good and value is None:
        raise ConfigError(f"{key} is required")
    if not good:
        raise ConfigError(f"{key}={value!r} is not {allowed}")
    convert = f.metadata.get("convert")
    if convert is not None and value is not None:
        return convert(value)
    return tuple(value) if isinstance(value, list) else value


def _plain(value: Any) -> Any:
    if isinstance(value, Section):
        return value.as_dict()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
