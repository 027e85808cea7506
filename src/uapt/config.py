"""Validation of a composed run config, before any model is loaded or folder is created.

Every error names the key and what is allowed, e.g.
"trainer.precision='fp8' is not one of: fp32, bf16".
Unknown keys are errors too: an option that is silently ignored is worse than none.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from uapt.errors import UserError

SEED_MAX = 2**32 - 1  # numpy's and every derived generator's range


class ConfigError(UserError):
    """A bad configuration value; the message names the key."""


Check = Callable[[Any], bool]


def one_of(*choices: Any) -> tuple[Check, str]:
    return (lambda v: v in choices), "one of: " + ", ".join(map(str, choices))


def number(
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    integer: bool = False,
) -> tuple[Check, str]:
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


def optional(check: tuple[Check, str]) -> tuple[Check, str]:
    return (lambda v: v is None or check[0](v)), check[1] + " (or null)"


BOOL = ((lambda v: isinstance(v, bool)), "true or false")
TEXT = ((lambda v: isinstance(v, str) and v != ""), "a non-empty string")
ANY = ((lambda v: True), "anything")

TRAINER: dict[str, tuple[Check, str]] = {
    "max_steps": number(1, integer=True),
    "batch_size": number(1, integer=True),
    "micro_batch_size": number(1, integer=True),
    "lr": number(0, lo_open=True),
    "weight_decay": number(0),
    "betas": ((lambda v: len(v) == 2 and all(0 <= b < 1 for b in v)), "two numbers in [0, 1)"),
    "warmup_steps": number(0, integer=True),
    "min_lr_ratio": number(0, 1),
    "grad_clip": number(0),
    "precision": one_of("fp32", "bf16"),
    "device": (
        (lambda v: v in ("auto", "cpu", "cuda") or str(v).startswith("cuda:")),
        "auto, cpu, cuda or cuda:N",
    ),
    "log_every": number(1, integer=True),
    "eval_every": number(0, integer=True),
    "val_batches": optional(number(1, integer=True)),
    "deterministic": BOOL,
    "checkpoint_every": number(0, integer=True),
    "keep_checkpoints": number(1, integer=True),
    "nproc": number(1, integer=True),
    "fsdp": BOOL,
    "save_model": BOOL,
    "packing": BOOL,
    "max_tokens_per_micro_batch": optional(number(1, integer=True)),
    "compile": one_of("auto", True, False),
}
MODEL: dict[str, tuple[Check, str]] = {
    "name": TEXT,
    "path": optional(TEXT),
    "tokenizer": optional(TEXT),
    "source": one_of("auto", "hub", "embedded"),
    "arch": one_of("llama", "gemma2", "phi3"),
    "config": ((lambda v: v is None or isinstance(v, Mapping)), "a mapping of architecture keys"),
    "dtype": one_of("auto", "float32", "bfloat16", "float16"),
    "attn_implementation": one_of("eager", "sdpa", "auto"),
    "chat_template": optional(TEXT),
    "trust_remote_code": BOOL,
    "lora": ANY,  # validated by uapt.models when set
}
LOGGER: dict[str, tuple[Check, str]] = {
    "name": one_of("wandb", "none"),
    "mode": one_of("offline", "online", "disabled"),
    "project": TEXT,
    "entity": optional(TEXT),
    "group": optional(TEXT),
    "tags": ((lambda v: all(isinstance(t, str) for t in v)), "a list of strings"),
    "dir": TEXT,
}
TOP_LEVEL = {
    "model",
    "dataset",
    "objective",
    "trainer",
    "eval",
    "logger",
    "seed",
    "runs_dir",
    "cache_dir",
    "experiment",
    "force",
    "sweep",
    "inputs",  # set by uapt: content fingerprints of local inputs (uapt.inputs)
    "tuned",  # the best settings of a tuning sweep (sweeps/tuned/, uapt.tune): evidence only
}


def check_section(
    section: str, node: Mapping[str, Any], schema: Mapping[str, tuple[Check, str]]
) -> None:
    for key, value in node.items():
        if key not in schema:
            raise ConfigError(f"{section}.{key} is not a known option; known: {', '.join(schema)}")
        ok, allowed = schema[key]
        try:
            good = ok(value)
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ConfigError(f"{section}.{key}={value!r} is not {allowed}")


def validate(cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first bad key of a resolved (plain-dict) run config."""
    from uapt.objectives import validate_objective

    unknown = set(cfg) - TOP_LEVEL
    if unknown:
        raise ConfigError(f"unknown top-level key(s): {', '.join(sorted(unknown))}")
    seed = cfg.get("seed")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed <= SEED_MAX:
        raise ConfigError(f"seed={seed!r} is not an integer in [0, {SEED_MAX}]")
    check_section("trainer", cfg["trainer"], TRAINER)
    check_section("model", cfg["model"], MODEL)
    check_section("logger", cfg["logger"], LOGGER)
    try:
        validate_objective(cfg["objective"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_model_path(cfg["model"])
    _check_batch(cfg["trainer"])
    _check_scope_size(cfg["objective"], cfg["trainer"])
    _validate_room("uapt.models", "validate_model", cfg["model"])
    _validate_room("uapt.data", "validate_dataset", cfg["dataset"])
    _validate_room("uapt.evaluation", "validate_suite", cfg["eval"])


def _validate_room(module: str, function: str, node: Mapping[str, Any]) -> None:
    """Each room validates its own section (uapt.data knows dataset keys, and so on)."""
    try:
        getattr(importlib.import_module(module), function)(node)
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _check_model_path(model: Mapping[str, Any]) -> None:
    """A path written as a path (./, /, ~) must exist; `org/name` is a hub id, checked on load."""
    for key in ("path", "tokenizer"):
        path = str(model.get(key) or "")
        if path.startswith((".", "/", "~")) and not Path(path).expanduser().exists():
            raise ConfigError(f"model.{key}={path!r}: no such local folder")


def _check_batch(trainer: Mapping[str, Any], world_size: int = 1) -> None:
    per_step = trainer["micro_batch_size"] * world_size
    if trainer["batch_size"] % per_step:
        raise ConfigError(
            f"trainer.batch_size={trainer['batch_size']} must be a multiple of "
            f"trainer.micro_batch_size x ranks = {per_step}"
        )


def _check_scope_size(objective: Mapping[str, Any], trainer: Mapping[str, Any]) -> None:
    size = objective.get("scope_size")
    if size and trainer["batch_size"] % size:
        raise ConfigError(
            f"objective.scope_size={size} must divide trainer.batch_size={trainer['batch_size']}: "
            "selection groups are consecutive sequences of the global batch"
        )


def accumulation_steps(trainer: Mapping[str, Any], world_size: int) -> int:
    _check_batch(trainer, world_size)
    return trainer["batch_size"] // (trainer["micro_batch_size"] * world_size)
