"""The `eval` section's entry points: a suite checked (its SuiteConfig and TaskSpecs are a config
section: uapt.sections.eval)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from uapt.sections.eval import SuiteConfig, TaskSpec


def parse_suite(suite: Mapping[str, Any] | SuiteConfig) -> SuiteConfig:
    """The `eval` section checked."""
    return SuiteConfig.parse(suite)


def validate_suite(suite_cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first bad key of an `eval` node (files must exist)."""
    parse_suite(suite_cfg)


def suite_tasks(suite_cfg: Mapping[str, Any] | SuiteConfig) -> list[TaskSpec]:
    """The suite's tasks as TaskSpecs (validated; empty for the `none` suite)."""
    return list(parse_suite(suite_cfg).task_specs)
