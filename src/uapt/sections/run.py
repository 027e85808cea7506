"""The whole run's config (conf/train.yaml composed): a RunConfig of the sections, every one
checked. Which top-level keys enter a run's id is declared here too (`semantic=False`: they do
not; see uapt.records.semantic_config)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from omegaconf import DictConfig, OmegaConf

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
from uapt.sections.dataset import DatasetConfig
from uapt.sections.eval import SuiteConfig
from uapt.sections.logger import LoggerConfig
from uapt.sections.model import ModelConfig
from uapt.sections.objective import ObjectiveSpec
from uapt.sections.plan import PlanConfig
from uapt.sections.trainer import TrainerConfig

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
    logger: LoggerConfig = option(section=LoggerConfig, semantic=False)
    seed: int = option(satisfies(_seed_ok, f"an integer in [0, {SEED_MAX}]"))
    runs_dir: str = option(TEXT, semantic=False)
    cache_dir: str = option(TEXT, semantic=False)
    experiment: str | None = option(optional(TEXT), semantic=False)
    force: bool = option(BOOL, semantic=False)
    # refuse a dirty checkout (uapt.provenance)
    require_clean: bool = option(BOOL, semantic=False)
    # the grid's own keys (sweeps/): read by Hydra
    sweep: Any = option(ANY, default=None, semantic=False)
    # content fingerprints of local data and models (uapt.inputs): in the id when given
    inputs: Mapping[str, str] | None = option(optional(MAPPING), default=None)
    # a tuning sweep's best settings: evidence only
    tuned: Any = option(ANY, default=None, semantic=False)
    plan: PlanConfig | None = option(
        optional(MAPPING), convert=PlanConfig.parse, default=None, semantic=False
    )
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
