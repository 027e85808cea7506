"""`objective.*` (conf/objective/base.yaml): every knob of the token-level objective, validated
into an ObjectiveSpec. The objective on tensors is uapt.objectives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from uapt.schema import (
    BOOL,
    TEXT,
    ConfigError,
    Section,
    interval,
    number,
    one_of,
    option,
    optional,
)

SELECTS = ("nll", "excess", "entropy", "random")
SCOPES = ("sequence", "batch")
NORMALIZES = ("kept", "valid")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
DISTILL_ONS = ("unselected", "all")
TEACHERS = ("live", "cached")


@dataclass(frozen=True)
class ObjectiveSpec(Section):
    """`objective.*`, checked: every knob of the token-level objective (docs/objective.md)."""

    SECTION: ClassVar[str] = "objective"
    DEFAULTS: ClassVar[str] = "objective/base.yaml"

    name: str | None = option(optional(TEXT))  # the variant's name (W&B job type, table column)
    mask_ratio: float = option(interval(0, 1, hi_open=True), convert=float)
    distill_weight: float = option(number(0), convert=float)
    select: str = option(one_of(*SELECTS))
    invert: bool = option(BOOL)
    scope: str = option(one_of(*SCOPES))
    scope_size: int | None = option(optional(number(1, integer=True)))
    normalize: str = option(one_of(*NORMALIZES))
    divergence: str = option(one_of(*DIVERGENCES))
    jsd_beta: float = option(interval(0, 1, lo_open=True, hi_open=True), convert=float)
    temperature: float = option(number(0, lo_open=True), convert=float)
    distill_on: str = option(one_of(*DISTILL_ONS))
    # the same loss, computed chunk by chunk from hidden states (not what it computes)
    chunk_size: int | None = option(optional(number(0, integer=True)), semantic=False)
    teacher: str = option(one_of(*TEACHERS))
    teacher_topk: int = option(number(1, integer=True))

    @classmethod
    def defaults(cls) -> dict[str, Any]:
        # the functions on tensors need no name: a run's config always has one (uapt.config)
        return {**super().defaults(), "name": None}

    def check(self, where: str) -> None:
        if self.scope_size is not None and self.scope != "batch":
            raise ConfigError(
                f"objective.scope_size={self.scope_size} only applies to objective.scope=batch "
                f"(scope is {self.scope!r}); set it to null"
            )

    @property
    def needs_teacher(self) -> bool:
        return self.distill_weight > 0 or self.select == "excess"


# Every knob's default: conf/objective/base.yaml, the one place they are written.
DEFAULTS: dict[str, Any] = ObjectiveSpec.defaults()


def parse_objective(objective: Mapping[str, Any] | ObjectiveSpec) -> ObjectiveSpec:
    """``objective`` (a mapping; missing keys take conf/objective/base.yaml's values) checked as
    an ObjectiveSpec; ConfigError naming the key and what is allowed."""
    return ObjectiveSpec.parse(objective)


def validate_objective(objective: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the key and its allowed values when ``objective`` is invalid."""
    parse_objective(objective)


def needs_teacher(objective: Mapping[str, Any] | ObjectiveSpec) -> bool:
    """True when the objective needs teacher logits: distill_weight > 0 or select == excess."""
    return parse_objective(objective).needs_teacher
