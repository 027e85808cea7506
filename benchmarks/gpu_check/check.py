"""What every section shares: the sizes (full, or --quick), the run's state and time budget, the
packages it found, and how an item that could not be measured is named."""

from __future__ import annotations

import importlib.util
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from common import REPO, Spread

CONF = REPO / "conf"
MB = 2**20


# Llama-3.2-1B's config.json (meta-llama/Llama-3.2-1B), written here so that no download is
# needed: the architecture is real, the weights are random (uapt's random-init path).
LLAMA_3_2_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": True,
    "hidden_act": "silu",
}
# The same architecture at smoke size: --quick exercises the same paths in seconds.
LLAMA_QUICK = {
    **LLAMA_3_2_1B,
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
}
GEMMA2_SOFTCAP = 30.0  # Gemma-2's final_logit_softcapping


@dataclass(frozen=True)
class Sizes:
    """Everything --quick shrinks; the full sizes are the issue's."""

    parity: tuple[int, int, int, int]  # batch, time, vocab, hidden
    parity_chunk: int
    loss_vocab: int
    loss_hidden: int
    loss_tokens: tuple[int, ...]
    loss_chunk: int
    loss_reps: int
    llama: Mapping[str, Any]
    seq: int
    batch: int
    steps: int
    warmup_steps: int  # steps left out of the steady-state figures
    e2e_eval: tuple[str, ...]
    min_item_s: float  # no item starts with less time left than this (a run needs its start-up)


FULL = Sizes(
    parity=(2, 1024, 256000, 2304),
    parity_chunk=512,  # 4 chunks of the 2,048 tokens: chunk boundaries are part of the check
    loss_vocab=256000,
    loss_hidden=2304,
    loss_tokens=(2048, 8192),
    loss_chunk=1024,
    loss_reps=5,
    llama=LLAMA_3_2_1B,
    seq=2048,
    batch=8,
    steps=12,
    warmup_steps=3,
    e2e_eval=("eval=embedded", "eval.limit=2"),
    min_item_s=30.0,
)
QUICK = Sizes(
    parity=(2, 64, 512, 32),
    parity_chunk=16,
    loss_vocab=2048,
    loss_hidden=64,
    loss_tokens=(128, 256),
    loss_chunk=64,
    loss_reps=2,
    llama=LLAMA_QUICK,
    seq=128,
    batch=2,
    steps=4,
    warmup_steps=2,
    # one sample per task and short generations: the same suite, seconds instead of a minute
    e2e_eval=(
        "eval=embedded",
        "eval.limit=1",
        "eval.tasks.0.max_gen_toks=8",
        "eval.tasks.1.max_gen_toks=8",
    ),
    min_item_s=0.0,
)


# ----------------------------------------------------------------------------- run state
@dataclass
class Check:
    """One invocation: where it runs, its sizes, its time budget and its scratch folder."""

    device: torch.device
    quick: bool
    sizes: Sizes
    work: Path
    deadline: float | None  # time.monotonic() after which no new item starts
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return math.inf if self.deadline is None else self.deadline - time.monotonic()

    def budget_note(self) -> str | None:
        """None while there is time for one more item; else why the item is not started."""
        if self.left() > self.sizes.min_item_s:
            return None
        spent = time.monotonic() - self.started
        return f"time budget: --deadline-s reached after {spent:.0f} s"


def not_measured(item: str, why: str, **extra: Any) -> dict[str, Any]:
    return {"item": item, "measured": False, "why": why, **extra}


def guarded(item: str, measure: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """measure(*args)'s row, or the item marked failed with the error: one broken case (a kernel
    that does not compile, a shape a path rejects) must not lose the section's other rows."""
    try:
        return {"item": item, **measure(*args)}
    except torch.OutOfMemoryError as e:  # a finding, not a failure: it does not fit here
        return not_measured(item, f"out of memory: {str(e).splitlines()[0]}")
    except Exception as e:
        return {"item": item, "measured": False, "error": True, "why": f"{type(e).__name__}: {e}"}


def spread(values: Sequence[float]) -> dict[str, float]:
    return Spread.of(values).as_dict()


# ----------------------------------------------------------------------------- packages
# import name -> distribution name; what each section needs is in NEEDS.
PACKAGES = {
    "torch": "torch",
    "triton": "triton",
    "transformers": "transformers",
    "accelerate": "accelerate",
    "peft": "peft",
    "yaml": "pyyaml",
    "liger_kernel": "liger-kernel",
    "hydra": "hydra-core",
    "omegaconf": "omegaconf",
    "hydra_plugins.hydra_submitit_launcher": "hydra-submitit-launcher",
    "submitit": "submitit",
    "datasets": "datasets",
    "lm_eval": "lm-eval",
    "nltk": "nltk",
    "langdetect": "langdetect",
    "wandb": "wandb",
}
UAPT_TRAIN = (
    "transformers",
    "yaml",
    "hydra",
    "omegaconf",
    "hydra_plugins.hydra_submitit_launcher",
    "submitit",
    "datasets",
)
NEEDS = {
    "parity": ("yaml",),
    "train_step": UAPT_TRAIN,
    "hf_trainer": ("transformers", "accelerate"),
    "e2e": UAPT_TRAIN,
    "eval": ("lm_eval", "nltk", "langdetect"),
    "wandb": ("wandb",),
    "liger": ("liger_kernel", "triton"),
}


def package_table() -> dict[str, dict[str, Any]]:
    """Which packages this interpreter finds, and their versions (find_spec: nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for module, dist in PACKAGES.items():
        try:
            present = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            present = False
        try:
            ver = version(dist)
        except PackageNotFoundError:
            ver = None
        found[module] = {"distribution": dist, "found": present, "version": ver}
    return found


def missing(packages: Mapping[str, Mapping[str, Any]], need: str) -> list[str]:
    return [PACKAGES[m] for m in NEEDS[need] if not packages[m]["found"]]
