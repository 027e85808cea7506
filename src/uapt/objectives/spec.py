"""The objective's configuration: `objective.*` validated into an ObjectiveSpec (defaults: conf/objective/base.yaml)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from uapt.paths import CONF_DIR

IGNORE_INDEX = -100

SELECTS = ("nll", "excess", "entropy", "random")
SCOPES = ("sequence", "batch")
NORMALIZES = ("kept", "valid")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
DISTILL_ONS = ("unselected", "all")
TEACHERS = ("live", "cached")


def _base_yaml() -> dict[str, Any]:
    """conf/objective/base.yaml: the one place the objective's defaults are written."""
    return yaml.safe_load((CONF_DIR / "objective" / "base.yaml").read_text(encoding="utf-8"))


# Values used for keys missing from a mapping: the config tree's own defaults.
DEFAULTS: dict[str, Any] = {
    k: v for k, v in _base_yaml().items() if k not in ("name", "teacher", "teacher_topk")
}

# Keys accepted but not interpreted here (the training loop reads them; uapt.config checks them).
PASSTHROUGH_KEYS = ("name", "teacher", "teacher_topk")


@dataclass(frozen=True)
class ObjectiveSpec:
    """A validated objective configuration (see ``validate_objective``)."""

    mask_ratio: float
    distill_weight: float
    select: str
    invert: bool
    scope: str
    scope_size: int | None
    normalize: str
    divergence: str
    jsd_beta: float
    temperature: float
    distill_on: str
    chunk_size: int | None

    @property
    def needs_teacher(self) -> bool:
        return self.distill_weight > 0 or self.select == "excess"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"objective.{key}={value!r} is not one of: {', '.join(allowed)}")


def _check_number(key: str, value: Any, ok: bool, rule: str) -> None:
    if not _is_number(value) or not math.isfinite(value) or not ok:
        raise ValueError(f"objective.{key}={value!r} must be a number {rule}")


def parse_objective(objective: Mapping[str, Any] | ObjectiveSpec) -> ObjectiveSpec:
    """Validate ``objective`` (a dict or DictConfig) and return it as an ``ObjectiveSpec``.

    Keys missing from the mapping take the values of ``DEFAULTS`` (conf/objective/base.yaml).
    """
    if isinstance(objective, ObjectiveSpec):
        return objective
    if not isinstance(objective, Mapping):
        raise ValueError(f"objective must be a mapping, got {type(objective).__name__}")
    unknown = sorted(str(k) for k in objective if k not in DEFAULTS and k not in PASSTHROUGH_KEYS)
    if unknown:
        allowed = ", ".join([*DEFAULTS, *PASSTHROUGH_KEYS])
        raise ValueError(f"objective has unknown key(s) {', '.join(unknown)}; allowed: {allowed}")
    _check_choice("teacher", objective.get("teacher", "live"), TEACHERS)
    topk = objective.get("teacher_topk", _base_yaml()["teacher_topk"])
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"objective.teacher_topk={topk!r} must be an int >= 1")
    v = {k: objective.get(k, default) for k, default in DEFAULTS.items()}
    rho, lam = v["mask_ratio"], v["distill_weight"]
    _check_number("mask_ratio", rho, _is_number(rho) and 0 <= rho < 1, "in [0, 1)")
    _check_number("distill_weight", lam, _is_number(lam) and lam >= 0, ">= 0")
    tau, beta = v["temperature"], v["jsd_beta"]
    _check_number("temperature", tau, _is_number(tau) and tau > 0, "> 0")
    _check_number("jsd_beta", beta, _is_number(beta) and 0 < beta < 1, "in (0, 1)")
    _check_choice("select", v["select"], SELECTS)
    _check_choice("scope", v["scope"], SCOPES)
    _check_choice("normalize", v["normalize"], NORMALIZES)
    _check_choice("divergence", v["divergence"], DIVERGENCES)
    _check_choice("distill_on", v["distill_on"], DISTILL_ONS)
    if not isinstance(v["invert"], bool):
        raise ValueError(f"objective.invert={v['invert']!r} must be a bool (true or false)")
    size = v["scope_size"]
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"objective.scope_size={size!r} must be an int >= 1 or null")
    if size is not None and v["scope"] != "batch":
        raise ValueError(
            f"objective.scope_size={size} only applies to objective.scope=batch "
            f"(scope is {v['scope']!r}); set it to null"
        )
    chunk = v["chunk_size"]
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
        raise ValueError(f"objective.chunk_size={chunk!r} must be an int >= 0 or null")
    return ObjectiveSpec(
        mask_ratio=float(rho),
        distill_weight=float(lam),
        select=str(v["select"]),
        invert=bool(v["invert"]),
        scope=str(v["scope"]),
        scope_size=size,
        normalize=str(v["normalize"]),
        divergence=str(v["divergence"]),
        jsd_beta=float(beta),
        temperature=float(tau),
        distill_on=str(v["distill_on"]),
        chunk_size=chunk,
    )


def validate_objective(objective: Mapping[str, Any]) -> None:
    """Raise ValueError naming the key and its allowed values when ``objective`` is invalid."""
    parse_objective(objective)


def needs_teacher(objective: Mapping[str, Any] | ObjectiveSpec) -> bool:
    """True when the objective needs teacher logits: distill_weight > 0 or select == excess."""
    return parse_objective(objective).needs_teacher
