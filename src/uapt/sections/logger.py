"""`logger.*` (conf/logger/*.yaml): where a run's metrics go besides metrics.jsonl. Tracking
itself is uapt.tracking."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from uapt.schema import TEXT, Section, one_of, option, optional, satisfies


def _tags_ok(v: Any) -> bool:
    return isinstance(v, list | tuple) and all(isinstance(t, str) for t in v)


@dataclass(frozen=True)
class LoggerConfig(Section):
    """`logger.*`, checked (conf/logger/wandb.yaml says what each key does; `logger=none` sets
    only the name)."""

    SECTION: ClassVar[str] = "logger"
    DEFAULTS: ClassVar[str] = "logger/wandb.yaml"

    name: str = option(one_of("wandb", "none"))
    mode: str = option(one_of("offline", "online", "disabled"))
    project: str = option(TEXT)
    entity: str | None = option(optional(TEXT))
    group: str | None = option(optional(TEXT))
    tags: tuple[str, ...] = option(satisfies(_tags_ok, "a list of strings"))
    dir: str = option(TEXT)

    @property
    def wandb(self) -> bool:
        return self.name == "wandb" and self.mode != "disabled"
