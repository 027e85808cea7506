"""A composed run config checked into a RunConfig, once, before any model is loaded or folder is
created: each section is a typed section (uapt.schema) of uapt.sections, so a function's
signature says what it needs (`ModelConfig`, `TrainerConfig`, ...). Checking a config imports
the sections and the schema only: not torch, transformers, datasets or lm_eval (a test holds it).

Every error names the key and what is allowed, e.g.
"trainer.precision='fp8' is not one of: fp32, bf16".
Unknown keys are errors too: an option that is silently ignored is worse than none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from uapt.schema import ConfigError
from uapt.sections.run import RunConfig

__all__ = ["ConfigError", "refuse_renamed_keys", "renamed_keys", "validate"]


def validate(cfg: Mapping[str, Any]) -> RunConfig:
    """The checked RunConfig of a resolved run config; ConfigError naming the first bad key."""
    return RunConfig.parse(cfg)


def renamed_keys() -> dict[str, str]:
    """Every renamed key as `section.old` -> `section.new` (the sections' RENAMED)."""
    out: dict[str, str] = {}
    for f in dataclasses.fields(RunConfig):
        section = f.metadata.get("section")
        if section is not None:
            out |= {f"{f.name}.{old}": f"{f.name}.{new}" for old, new in section.RENAMED.items()}
    return out


def refuse_renamed_keys(overrides: Sequence[str]) -> None:
    """ConfigError naming the new key when a command-line override sets (`key=`, `+key=`,
    `++key=`) or deletes (`~key`) a renamed one: Hydra would refuse it as unknown without
    saying what it is called now. A config file's renamed key is refused by its section."""
    renamed = renamed_keys()
    for arg in overrides:
        key = arg.split("=", 1)[0].lstrip("~+")
        if not arg.startswith("-") and key in renamed:
            raise ConfigError(f"{key} was renamed: use {renamed[key]}")
