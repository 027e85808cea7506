"""`dataset.*` (conf/dataset/base.yaml): where the rows come from and how they become chat
messages. Reading them is uapt.data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from uapt.schema import (
    STRING,
    TEXT,
    ConfigError,
    Section,
    number,
    one_of,
    option,
    optional,
    satisfies,
)

FORMATS = ("qa", "alpaca", "sharegpt")
LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet")
SYNTHETIC = "synthetic"


def _val_size_ok(v: Any) -> bool:
    if isinstance(v, bool):
        return False
    return (isinstance(v, int) and v >= 0) or (isinstance(v, float) and 0 <= v < 1)


def _data_files_ok(v: Any) -> bool:
    return isinstance(v, str | list | tuple | Mapping)


@dataclass(frozen=True)
class DatasetConfig(Section):
    """`dataset.*`, checked (conf/dataset/base.yaml says what each key does)."""

    SECTION: ClassVar[str] = "dataset"
    DEFAULTS: ClassVar[str] = "dataset/base.yaml"

    name: str = option(TEXT)
    source: str = option(TEXT)
    subset: str | None = option(optional(TEXT))
    split: str = option(TEXT)
    data_files: Any = option(optional(satisfies(_data_files_ok, "a file name, list or mapping")))
    format: str = option(one_of(*FORMATS))
    prompt_field: str = option(TEXT)
    response_field: str = option(TEXT)
    conversations_field: str = option(TEXT)
    system_prompt: str | None = option(optional(STRING))
    max_samples: int | None = option(optional(number(1, integer=True)))
    shuffle_seed: int | None = option(optional(number(integer=True)))
    val_size: int | float = option(
        satisfies(_val_size_ok, "an integer >= 0 (rows) or a fraction in [0, 1)")
    )
    max_length: int = option(number(2, integer=True))
    num_train: int | None = option(optional(number(1, integer=True)))

    def check(self, where: str) -> None:
        if self.source == SYNTHETIC:
            if self.num_train is None:
                raise ConfigError("dataset.num_train is required when dataset.source=synthetic")
            if self.format != "qa":
                raise ConfigError(
                    f"dataset.format={self.format!r}: source=synthetic yields qa rows"
                )
        elif self.num_train is not None:
            raise ConfigError("dataset.num_train only applies to dataset.source=synthetic (arith)")
        elif is_local(self.source):
            check_local(self.source)


def validate_dataset(node: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first bad `dataset.*` key."""
    DatasetConfig.parse(node)


def is_local(source: str) -> bool:
    """A local file (by its suffix or its path), not a hub dataset."""
    return (
        source.endswith(LOCAL_SUFFIXES)
        or source.startswith(("/", "./", "../", "~"))
        or Path(source).exists()
    )


def check_local(source: str) -> Path:
    """The local file `dataset.source` names; ConfigError when it is missing or not data."""
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"dataset.source: file not found: {source}")
    if not path.is_file() or path.suffix not in LOCAL_SUFFIXES:
        raise ConfigError(f"dataset.source: {source} is not a .json, .jsonl or .parquet file")
    return path
