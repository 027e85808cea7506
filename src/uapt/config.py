"""A composed run config checked into a RunConfig, once, before any model is loaded or folder is
created: each section is its room's typed section (uapt.schema), so a function's signature says
what it needs (`ModelConfig`, `TrainerConfig`, ...).

Every error names the key and what is allowed, e.g.
"trainer.precision='fp8' is not one of: fp32, bf16".
Unknown keys are errors too: an option that is silently ignored is worse than none.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from omegaconf import DictConfig, OmegaConf

from uapt.data import DatasetConfig
from uapt.evaluation.suite import SuiteConfig
from uapt.loop import TrainerConfig, accumulation_steps
from uapt.models import ModelConfig
from uapt.objectives import ObjectiveSpec
from uapt.schema import (
    ANY,
    BOOL,
    MAPPING,
    TEXT,
    ConfigError,
    Section,
    is_number,
    option,
    optional,
    satisfies,
)
from uapt.tracking import LoggerConfig

__all__ = ["ConfigError", "RunConfig", "accumulation_steps", "validate"]

SEED_MAX = 2**32 - 1  # numpy's and every derived generator's range


def _seed_ok(v: Any) -> bool:
    return is_number(v) and isinstance(v, int) and 0 <= v <= SEED_MAX


@dataclass(frozen=True)
class RunConfig(Section):
    """A whole run's config (conf/train.yaml composed), every section checked. `plain` keeps the
    plain values it was parsed from: run ids and records are made from those."""

    SECTION: ClassVar[str] = ""  # the top level: its keys have no prefix

    model: ModelConfig = option(section=ModelConfig)
    dataset: DatasetConfig = option(section=DatasetConfig)
    objective: ObjectiveSpec = option(section=ObjectiveSpec)
    trainer: TrainerConfig = option(section=TrainerConfig)
    eval: SuiteConfig = option(section=SuiteConfig)
    logger: LoggerConfig = option(section=LoggerConfig)
    seed: int = option(satisfies(_seed_ok, f"an integer in [0, {SEED_MAX}]"))
    runs_dir: str = option(TEXT)
    cache_dir: str = option(TEXT)
    experiment: str | None = option(optional(TEXT))
    force: bool = option(BOOL)
    require_clean: bool = option(BOOL)  # refuse a dirty checkout (uapt.provenance)
    sweep: Any = option(ANY, default=None)  # the grid's own keys (sweeps/): read by Hydra
    inputs: Mapping[str, str] | None = option(optional(MAPPING), default=None)  # uapt.inputs
    tuned: Any = option(ANY, default=None)  # a tuning sweep's best settings: evidence only
    plain: Mapping[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def parse(cls, node: Mapping[str, Any] | Self, where: str | None = None) -> Self:
        if isinstance(node, cls):
            return node
        if isinstance(node, DictConfig):
            node = OmegaConf.to_container(node, resolve=True)  # the plain values ids are made of
        if not isinstance(node, Mapping):
            raise ConfigError(f"a run config must be a mapping, got {type(node).__name__}")
        plain = dict(node)
        return dataclasses.replace(super().parse(plain, ""), plain=plain)

    def check(self, where: str) -> None:
        if not self.objective.name:
            raise ConfigError("objective.name is required (the variant's name)")
        size = self.objective.scope_size
        if size and self.trainer.batch_size % size:
            raise ConfigError(
                f"objective.scope_size={size} must divide "
                f"trainer.batch_size={self.trainer.batch_size}: "
                "selection groups are consecutive sequences of the global batch"
            )


def validate(cfg: Mapping[str, Any]) -> RunConfig:
    """The checked RunConfig of a resolved run config; ConfigError naming the first bad key."""
    return RunConfig.parse(cfg)
