"""Every config section, typed and checked (uapt.schema), in one light layer: these modules
import the schema and each other only, never torch, transformers, datasets or lm_eval, so
checking a config (uapt.config.validate, `uapt-train --help`, every exit-2 config error) loads
none of them. The rooms that use a section (uapt.models, uapt.data, uapt.loop, ...) import it
from here.

- `model`: `model.*` and `model.lora.*` (ModelConfig, LoraConfig);
- `dataset`: `dataset.*` (DatasetConfig);
- `objective`: `objective.*` (ObjectiveSpec);
- `trainer`: `trainer.*` (TrainerConfig);
- `eval`: `eval.*` (SuiteConfig of TaskSpecs);
- `logger`: `logger.*` (LoggerConfig);
- `plan`: `plan.*` (PlanConfig);
- `run`: the whole config (RunConfig).

Each field says whether it changes what a run computes (`option(..., semantic=False)` when it
does not): a run's id hashes the semantic keys only (uapt.records.semantic_config).
"""

from uapt.sections.dataset import DatasetConfig
from uapt.sections.eval import SuiteConfig, TaskSpec
from uapt.sections.logger import LoggerConfig
from uapt.sections.model import LoraConfig, ModelConfig
from uapt.sections.objective import ObjectiveSpec
from uapt.sections.plan import PlanConfig
from uapt.sections.run import RunConfig
from uapt.sections.trainer import TrainerConfig

__all__ = [
    "DatasetConfig",
    "LoggerConfig",
    "LoraConfig",
    "ModelConfig",
    "ObjectiveSpec",
    "PlanConfig",
    "RunConfig",
    "SuiteConfig",
    "TaskSpec",
    "TrainerConfig",
]
