"""`trainer.*` (conf/trainer/default.yaml): the optimizer, the global batch and its split, and how
a run is executed and observed. The loop itself is uapt.loop.

Keys declared `semantic=False` change how a run is executed or observed, not what it computes:
every token mean is taken over the optimizer step's global batch, however it is split into
micro-batches and ranks (uapt.batches), so the split (micro_batch_size, which a run's id counts
as batch_size: uapt.records), nproc and fsdp do not change the numbers (nor the device type:
selection noise is drawn on the CPU).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

from uapt.schema import (
    BOOL,
    ConfigError,
    Section,
    is_number,
    number,
    one_of,
    option,
    optional,
    satisfies,
)


def _device_ok(v: Any) -> bool:
    return v in ("auto", "cpu", "cuda") or str(v).startswith("cuda:")


def _betas_ok(v: Any) -> bool:
    return len(v) == 2 and all(is_number(b) and 0 <= b < 1 for b in v)


@dataclass(frozen=True)
class TrainerConfig(Section):
    """`trainer.*`, checked (conf/trainer/default.yaml says what each key does)."""

    SECTION: ClassVar[str] = "trainer"
    DEFAULTS: ClassVar[str] = "trainer/default.yaml"
    # eval_every scheduled the validation loss, not the eval= suite (a run's id hashes it under
    # the old name: hashed_as)
    RENAMED: ClassVar[Mapping[str, str]] = {"eval_every": "val_every"}

    max_steps: int = option(number(1, integer=True))
    batch_size: int = option(number(1, integer=True))
    micro_batch_size: int = option(number(1, integer=True))
    lr: float = option(number(0, lo_open=True))
    weight_decay: float = option(number(0))
    betas: tuple[float, float] = option(satisfies(_betas_ok, "two numbers in [0, 1)"))
    warmup_steps: int = option(number(0, integer=True))
    min_lr_ratio: float = option(number(0, 1))
    grad_clip: float = option(number(0))
    precision: str = option(one_of("fp32", "bf16"))
    device: str = option(satisfies(_device_ok, "auto, cpu, cuda or cuda:N"), semantic=False)
    log_every: int = option(number(1, integer=True), semantic=False)
    val_every: int = option(number(0, integer=True), hashed_as="eval_every")
    val_batches: int | None = option(optional(number(1, integer=True)), semantic=False)
    deterministic: bool = option(BOOL)
    checkpoint_every: int = option(number(0, integer=True), semantic=False)
    keep_checkpoints: int = option(number(1, integer=True), semantic=False)
    save_model: bool = option(BOOL, semantic=False)
    nproc: int = option(number(1, integer=True), semantic=False)
    fsdp: bool = option(BOOL, semantic=False)
    packing: bool = option(BOOL, semantic=False)  # the same rows without padding
    max_tokens_per_micro_batch: int | None = option(  # another split of the same global batch
        optional(number(1, integer=True)), semantic=False
    )
    compile: str | bool = option(one_of("auto", True, False), semantic=False)  # compiled

    def check(self, where: str) -> None:
        accumulation_steps(self, 1)  # the global batch splits into whole micro-batches

    def accumulation(self, world_size: int) -> int:
        return accumulation_steps(self, world_size)


def accumulation_steps(trainer: TrainerConfig, world_size: int) -> int:
    """Micro-batches per step on each of `world_size` ranks (ConfigError when they do not
    divide the global batch)."""
    per_step = trainer.micro_batch_size * world_size
    if trainer.batch_size % per_step:
        raise ConfigError(
            f"trainer.batch_size={trainer.batch_size} must be a multiple of "
            f"trainer.micro_batch_size x ranks = {per_step}"
        )
    return trainer.batch_size // per_step
