"""One command that checks uapt's CUDA paths and measures them (issue 16).

Sections, in this order, each timed and written to the JSON record as soon as it ends:
  parity      token_loss_chunked vs token_loss (values, kept sets, gradients) in fp32 and bf16
              for the named objectives of conf/objective/, at Gemma-2-2b's head (vocab 256,000,
              hidden 2,304, final-logit softcap 30)
  loss_memory extra peak memory and time of one loss forward + backward at Gemma-2-2b's head
              (bf16 weights), 2,048 and 8,192 tokens: naive full logits vs uapt's chunked path,
              CE and CE+KL, with Liger-Kernel's fused linear cross-entropy and fused linear JSD
              (beta 0: forward KL) measured beside them where liger_kernel imports (CUDA only)
  train_step  `uapt-train` runs of Llama-3.2-1B's architecture with random weights (no
              download), bf16, sequence 2,048: tokens/s and peak memory of mle, masked_mle and
              masked_mle_distill with a live and with a cached teacher, step-time ratios to mle,
              and uapt's mle against transformers.Trainer on the same rows and batch shapes
  e2e         one `uapt-train` run end to end (tiny model, eval=embedded with a small limit, W&B
              offline)
  ddp         a two-rank run where the machine has two GPUs
What could not be measured (a package missing, one GPU, the time budget) is named as such in
the tables and the JSON, never left out. CUDA memory is torch.cuda.max_memory_allocated; on a
CPU the same sections run with CPU fallbacks (peak RSS, a wall clock) at --quick sizes.

Only public entry points of uapt are used (token_loss, token_loss_chunked, OutputHead,
models.load_tokenizer / load_model, and `python -m uapt.train`), so the check follows the
package and not its internals.

    python benchmarks/gpu_check.py --json runs/benchmarks/gpu_check.json  # CUDA (make gpu-check)
    python benchmarks/gpu_check.py --device cpu --quick --json /tmp/g.json # smoke sizes (tests)
    python benchmarks/gpu_check.py --render <record.json>   # the record as Markdown
    python benchmarks/gpu_check.py --doc <record.json>      # into docs/performance.md ("GPU")

Why this size: it is carried as one file to a borrowed GPU machine with a few minutes of time
and no package index, where every section shares one setup, one time budget and one record;
its Markdown rendering lives apart (benchmarks/gpu_report.py).

The full run is sized for about 5 minutes on one H200 (an estimate from the work it does: it has
not run on a GPU yet). It starts no item after --deadline-s (300 s by default) nor one with less
than 30 s left, and kills a run at the deadline, so it ends within seconds of it. A machine
without a package index gets the packages it lacks as wheels, fetched here by `make gpu-wheels`
(benchmarks/gpu_requirements.txt: cp312, manylinux x86-64), installed there by the one command
in docs/performance.md ("GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import importlib
import importlib.util
import itertools
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import OFFLINE_ENV, REPO, load_average, machine_info, write_json
from gpu_report import (
    DOC,
    RECORD,
    SECTIONS,
    merge_records,
    render_markdown,
    render_text,
    unmeasured,
    update_doc,
)

# This checkout's uapt, installed or not (on a device machine it is not): the subprocesses get
# the same first entry on their path (child_env).
sys.path.insert(0, str(REPO / "src"))
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
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


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


# ----------------------------------------------------------------------------- devices
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_ms(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """fn's result and its time in ms: CUDA events on a GPU (work is asynchronous), else a clock."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize(device)
    return out, start.elapsed_time(end)


class CpuPeak:
    """Extra peak memory on CPU (the fallback for torch.cuda.max_memory_allocated).

    glibc's mmap threshold is lowered to 64 KiB, so every tensor of that size or more is its own
    mapping and goes back to the OS when freed: the resident set then tracks live tensors. The
    kernel's high-water mark is reset (clear_refs 5) before the measured call, and the figure is
    VmHWM - VmRSS(before): exact to the page, no sampling. Where either is unavailable (another
    libc, no /proc) `available` is False and no memory figure is reported.
    """

    M_MMAP_THRESHOLD = -3

    def __init__(self) -> None:
        try:
            libc = ctypes.CDLL("libc.so.6")
            self.available = bool(libc.mallopt(self.M_MMAP_THRESHOLD, 65536)) and self._reset()
        except OSError:
            self.available = False

    @staticmethod
    def _kb(field_name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field_name} not in /proc/self/status")

    def _reset(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return self._kb("VmHWM") <= self._kb("VmRSS") + 1024
        except OSError:
            return False

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        out: dict[str, float] = {}
        self._reset()
        before = self._kb("VmRSS")
        yield out
        out["extra_mb"] = (self._kb("VmHWM") - before) / 1024


@contextlib.contextmanager
def cuda_peak(device: torch.device) -> Iterator[dict[str, float]]:
    """Extra peak memory of the block: max_memory_allocated - memory_allocated before."""
    out: dict[str, float] = {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield out
    torch.cuda.synchronize(device)
    out["extra_mb"] = (torch.cuda.max_memory_allocated(device) - before) / MB


# ----------------------------------------------------------------------------- 1. parity
PARITY_OBJECTIVES = ("mle", "masked_mle", "self_distill", "masked_mle_distill", "rho1")
# Relative errors (||chunked - naive|| / ||naive||) that count as parity, and why:
# - fp32: both paths compute the same fp32 arithmetic in another order (chunks, a fused
#   closed-form gradient); reordering sums of up to 256k terms moves results by ~1e-6 relative.
#   1e-4 leaves two orders of magnitude and still catches any real difference (a missed chunk,
#   a wrong mask or scale moves them by >= 1e-3).
# - bf16: the head's matmul runs in bf16 on both paths (logits rounded to 8 bits of mantissa),
#   and the two paths round different intermediates (autograd's bf16 logits gradient vs the
#   fused fp32 one): bf16 operands give 1e-3 to 1e-2. The bf16 path's own distance to fp32 on
#   the same inputs is reported beside it as the scale of bf16 error.
PARITY_TOL = {"fp32": {"loss": 1e-4, "grad": 1e-4}, "bf16": {"loss": 2e-3, "grad": 3e-2}}
# Fraction of valid tokens whose kept / not-kept decision agrees. Selection is a top-K of
# scores that the two paths compute in a different order: a near tie at the K-th place can
# flip a token in bf16, rarely in fp32. A flipped pair moves two of the n_kept per-token terms
# of the gradient, terms of similar size and unrelated directions, so the gradients may then
# differ by about sqrt(2 * flips / n_kept) on top of rounding (parity_verdict allows for it).
KEPT_TOL = {"fp32": 0.999, "bf16": 0.99}


def named_objective(name: str) -> dict[str, Any]:
    """conf/objective/<name>.yaml over base.yaml: the settings `objective=<name>` runs."""
    import yaml

    base = yaml.safe_load((CONF / "objective" / "base.yaml").read_text())
    own = yaml.safe_load((CONF / "objective" / f"{name}.yaml").read_text())
    own.pop("defaults", None)
    return {**base, **own}


def parity_inputs(sizes: Sizes, device: torch.device) -> dict[str, torch.Tensor]:
    """Random fp32 inputs (fresh every run: the check must hold on any valid input).

    Teacher = student plus a small perturbation, as in self-distillation; labels have a prompt
    (-100) at the start of every row and padding at the end of the second."""
    b, t, v, h = sizes.parity
    seed = random.SystemRandom().randrange(2**31)
    g = torch.Generator(device=device).manual_seed(seed)
    std = h**-0.5
    weight = torch.randn(v, h, generator=g, device=device) * std
    teacher_weight = weight + 0.1 * std * torch.randn(v, h, generator=g, device=device)
    hidden = 4 * torch.randn(b, t, h, generator=g, device=device)
    teacher_hidden = hidden + 0.5 * torch.randn(b, t, h, generator=g, device=device)
    labels = torch.randint(0, v, (b, t), generator=g, device=device)
    labels[:, : t // 8] = -100
    labels[1, -t // 8 :] = -100
    return {
        "seed": seed,
        "weight": weight,
        "teacher_weight": teacher_weight,
        "hidden": hidden,
        "teacher_hidden": teacher_hidden,
        "labels": labels,
    }


@dataclass
class LossRun:
    total: float
    kept: torch.Tensor
    valid: torch.Tensor
    grad_hidden: torch.Tensor
    grad_weight: torch.Tensor


def run_loss(
    inputs: Mapping[str, Any], objective: dict, dtype: torch.dtype, chunk: int | None
) -> LossRun:
    """One objective on the inputs cast to dtype: token_loss on full logits (chunk None) or
    token_loss_chunked; returns the value, kept set and the gradients of hidden and weight."""
    from uapt.objectives import OutputHead, token_loss, token_loss_chunked

    # copies: the inputs are shared by every run and must not collect gradients
    weight = inputs["weight"].to(dtype, copy=True).requires_grad_(True)
    hidden = inputs["hidden"].to(dtype, copy=True).requires_grad_(True)
    head = OutputHead(weight, None, GEMMA2_SOFTCAP)
    teacher_head = OutputHead(inputs["teacher_weight"].to(dtype), None, GEMMA2_SOFTCAP)
    teacher_hidden = inputs["teacher_hidden"].to(dtype)
    labels = inputs["labels"]
    if chunk is None:
        with torch.no_grad():
            teacher_logits = teacher_head.logits(teacher_hidden)
        out = token_loss(head.logits(hidden), labels, objective, teacher_logits)
    else:
        out = token_loss_chunked(
            hidden, labels, objective, head, teacher_hidden, teacher_head, chunk_size=chunk
        )
    out.total.backward()
    return LossRun(
        float(out.total.detach()),
        out.kept.detach(),
        out.valid.detach(),
        hidden.grad.float(),
        weight.grad.float(),
    )


def rel(a: torch.Tensor | float, b: torch.Tensor | float) -> float:
    """||a - b|| / ||b|| (inf when b is 0 and a is not; NaN stays NaN: it never passes)."""
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)
    num = float(torch.linalg.vector_norm(a - b))
    den = float(torch.linalg.vector_norm(b))
    return num / den if den else (0.0 if num == 0 else math.inf)


def compare(test: LossRun, ref: LossRun) -> dict[str, float]:
    valid = ref.valid
    same = test.kept[valid] == ref.kept[valid]
    return {
        "loss_rel": rel(test.total, ref.total),
        "grad_hidden_rel": rel(test.grad_hidden, ref.grad_hidden),
        "grad_weight_rel": rel(test.grad_weight, ref.grad_weight),
        "kept_agree": float(same.float().mean()),
        "flips": int((~same).sum()),
        "n_kept": int(ref.kept[valid].sum()),
    }


def parity_verdict(errors: Mapping[str, float], dtype_name: str) -> bool:
    """Within tolerance (NaN and inf never are); a gradient may differ further by what the
    tokens that changed sides account for (see KEPT_TOL)."""
    tol = PARITY_TOL[dtype_name]
    values = [errors["loss_rel"], errors["grad_hidden_rel"], errors["grad_weight_rel"]]
    if not all(math.isfinite(v) for v in values):
        return False
    flip_allowance = 2 * math.sqrt(2 * errors["flips"] / max(errors["n_kept"], 1))
    return (
        errors["loss_rel"] <= tol["loss"]
        and max(errors["grad_hidden_rel"], errors["grad_weight_rel"])
        <= tol["grad"] + flip_allowance
        and errors["kept_agree"] >= KEPT_TOL[dtype_name]
    )


def parity_case(
    inputs: Mapping[str, Any], name: str, dtype_name: str, chunk: int
) -> dict[str, Any]:
    """chunked vs naive for one objective and dtype; for bf16 also naive bf16 vs naive fp32 on
    the same (bf16-rounded) inputs: the size of bf16's own error."""
    objective = named_objective(name)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    naive = run_loss(inputs, objective, dtype, None)
    chunked = run_loss(inputs, objective, dtype, chunk)
    errors = compare(chunked, naive)
    row = {
        "item": f"{name} {dtype_name}",
        "measured": True,
        "objective": name,
        "dtype": dtype_name,
        "loss_naive": naive.total,
        "loss_chunked": chunked.total,
        **errors,
        "tolerance": {**PARITY_TOL[dtype_name], "kept_agree": KEPT_TOL[dtype_name]},
        "ok": parity_verdict(errors, dtype_name),
    }
    del chunked
    if dtype_name == "bf16":
        rounded = {
            k: (v.to(dtype).float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
            for k, v in inputs.items()
        }
        row["bf16_vs_fp32"] = compare(naive, run_loss(rounded, objective, torch.float32, None))
    return row


def section_parity(check: Check, packages: Mapping[str, Any]) -> dict[str, Any]:
    lacking = missing(packages, "parity")
    if lacking:
        return {"status": "not measured", "why": f"missing: {', '.join(lacking)}", "items": []}
    b, t, v, h = check.sizes.parity
    inputs = parity_inputs(check.sizes, check.device)
    items = []
    for dtype_name in ("fp32", "bf16"):
        for name in PARITY_OBJECTIVES:
            note = check.budget_note()
            if note:
                items.append(not_measured(f"{name} {dtype_name}", note))
                continue
            case = f"{name} {dtype_name}"
            chunk = check.sizes.parity_chunk
            items.append(guarded(case, parity_case, inputs, name, dtype_name, chunk))
            free(check.device)
    measured = [i for i in items if i["measured"]]
    return {
        "tolerance": {**PARITY_TOL, "kept_agree": KEPT_TOL},
        "config": {
            "batch": b,
            "time": t,
            "vocab": v,
            "hidden": h,
            "softcap": GEMMA2_SOFTCAP,
            "chunk_size": check.sizes.parity_chunk,
            "seed": inputs["seed"],
        },
        "items": items,
        "all_ok": bool(measured) and all(i["ok"] for i in measured),
    }


# ----------------------------------------------------------------------------- 2. loss memory
LOSS_METHODS = ("naive_ce", "chunked_ce", "liger_ce", "naive_ce_kl", "chunked_ce_kl", "liger_ce_kl")


def liger_loss(inputs: Mapping[str, Any], with_kl: bool) -> torch.Tensor:
    """Liger-Kernel's fused linear CE (+ fused linear JSD at beta 0, i.e. forward KL(P||Q),
    token mean): the same loss as naive_ce(_kl), one Triton pass over the vocabulary each."""
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss, LigerFusedLinearJSD

    h, targets = inputs["hidden"][0, :-1], inputs["labels"][0, 1:]
    loss = LigerFusedLinearCrossEntropyLoss()(inputs["weight"], h, targets)
    if with_kl:
        t_h = inputs["teacher_hidden"][0, :-1]
        kl = LigerFusedLinearJSD(jsd_beta=0.0)(
            h, inputs["weight"], t_h, inputs["teacher_weight"], targets
        )
        loss = loss + kl
    loss.backward()
    return loss.detach()


def loss_runner(name: str, inputs: dict[str, Any], chunk: int) -> Callable[[], float]:
    """One forward + backward of the method; the weight's .grad buffer stays allocated (as
    after the first step of training), the hidden states' gradient is dropped."""
    import loss_memory

    def run() -> float:
        if name.startswith("naive"):
            loss = loss_memory.naive(inputs, with_kl=name == "naive_ce_kl")
        elif name.startswith("liger"):
            loss = liger_loss(inputs, with_kl=name == "liger_ce_kl")
        else:
            objective = loss_memory.OBJECTIVES[name]
            loss = loss_memory.chunked(inputs, objective, chunk)
        inputs["hidden"].grad = None
        return float(loss)

    return run


def liger_unavailable(check: Check, packages: Mapping[str, Any]) -> str | None:
    if check.device.type != "cuda":
        return "Liger-Kernel's kernels are Triton: CUDA only"
    lacking = missing(packages, "liger")
    if lacking:
        return f"missing: {', '.join(lacking)} (carry the liger-kernel wheel)"
    try:
        importlib.import_module("liger_kernel.transformers")
    except Exception as e:  # a version mismatch shows up here, not in find_spec
        return f"liger_kernel does not import: {type(e).__name__}: {e}"
    return None


def measure_method(run: Callable[[], float], check: Check, peak: CpuPeak | None) -> dict:
    """Warm-up (kernels, Triton compilation, allocator), then the measured call and more
    repetitions for the time; memory from the measured call."""
    run()
    free(check.device)
    if check.device.type == "cuda":
        with cuda_peak(check.device) as mem:
            loss, first = timed_ms(run, check.device)
        how = "cuda_max_memory_allocated"
    elif peak is not None and peak.available:
        with peak.measure() as mem:
            loss, first = timed_ms(run, check.device)
        how = "cpu_rss_high_water_mark"
    else:
        mem, how = {}, "not measured: no /proc clear_refs or glibc mallopt here"
        loss, first = timed_ms(run, check.device)
    times = [first] + [timed_ms(run, check.device)[1] for _ in range(check.sizes.loss_reps - 1)]
    return {
        "measured": True,
        "loss": loss,
        "extra_mb": mem.get("extra_mb"),
        "memory": how,
        "ms": spread(times),
    }


def loss_size(check: Check, tokens: int, liger_why: str | None, peak: CpuPeak | None) -> list:
    import loss_memory

    s = check.sizes
    ns = argparse.Namespace(
        vocab=s.loss_vocab,
        hidden=s.loss_hidden,
        tokens=tokens,
        dtype="bf16",
        device=str(check.device),
        frozen_head=False,
    )
    inputs = loss_memory.make_inputs(ns)
    rows = []
    for name in LOSS_METHODS:
        item = f"{name} {tokens} tokens"
        why = check.budget_note() or (liger_why if name.startswith("liger") else None)
        if why:
            rows.append(not_measured(item, why, method=name, tokens=tokens))
            continue
        run = loss_runner(name, inputs, s.loss_chunk)
        row = guarded(item, measure_method, run, check, peak)
        inputs["hidden"].grad = None  # also after a failed call
        rows.append({**row, "method": name, "tokens": tokens})
        free(check.device)
    del inputs
    free(check.device)
    return rows


def loss_ratios(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Per token count: chunked / naive and chunked / liger, memory and median time."""
    by = {(r["method"], r["tokens"]): r for r in rows if r.get("measured")}
    out = {}
    for tokens in sorted({t for _, t in by}):
        for a, b in (
            ("chunked_ce", "naive_ce"),
            ("chunked_ce_kl", "naive_ce_kl"),
            ("chunked_ce", "liger_ce"),
            ("chunked_ce_kl", "liger_ce_kl"),
        ):
            ra, rb = by.get((a, tokens)), by.get((b, tokens))
            if not (ra and rb):
                continue
            if ra["extra_mb"] is not None and rb["extra_mb"]:
                out[f"mem {a}/{b} {tokens}"] = ra["extra_mb"] / rb["extra_mb"]
            out[f"time {a}/{b} {tokens}"] = ra["ms"]["median"] / rb["ms"]["median"]
    return out


def section_loss_memory(check: Check, packages: Mapping[str, Any]) -> dict[str, Any]:
    liger_why = liger_unavailable(check, packages)
    peak = CpuPeak() if check.device.type != "cuda" else None
    rows = []
    for tokens in check.sizes.loss_tokens:
        rows += loss_size(check, tokens, liger_why, peak)
    s = check.sizes
    return {
        "config": {
            "vocab": s.loss_vocab,
            "hidden": s.loss_hidden,
            "dtype": "bf16",
            "chunk_size": s.loss_chunk,
            "tokens": list(s.loss_tokens),
            "timed_runs": s.loss_reps,
            "head": "trained (its [V, H] gradient temporary counts, as in training)",
        },
        "grad_tmp_mb": s.loss_vocab * s.loss_hidden * 2 / MB,
        "items": rows,
        "ratios": loss_ratios(rows),
    }


# ----------------------------------------------------------------------------- 3. train step
VARIANTS = {
    "mle": ("objective=mle",),
    "masked_mle": ("objective=masked_mle",),
    "masked_mle_distill_live": ("objective=masked_mle_distill",),
    "masked_mle_distill_cached": ("objective=masked_mle_distill", "objective.teacher=cached"),
}
# Step time of the variant / mle (targets as on CPU, issue 8): a live teacher adds one forward
# to a ~3-forward step (ideal ~4/3); a cached one only reads the teacher's top-k.
TARGETS = {"masked_mle_distill_live": 1.40, "masked_mle_distill_cached": 1.10}
CLOCKS = (
    "uapt: its own per-step tokens/s (metrics.jsonl), whose clock stops once the optimizer step "
    "is queued (on CUDA its kernels, a few ms for 1.2B parameters, finish after it); "
    "transformers.Trainer: the time between consecutive step ends, synchronised"
)
WORDS = (  # the answers' vocabulary (the text is irrelevant: only its length counts)
    "apples boxes marbles garden river number answer morning market teacher student paper "
    "window bridge yellow silver quickly slowly because between after before during under "
    "seven eleven twenty hundred thousand basket orange purple winter summer"
)


def hydra_value(value: Any) -> str:
    """A Python value in Hydra's override grammar ({k:v,...} dicts, true/false)."""
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, float) else str(value)


def write_rows(path: Path, n: int, seq: int) -> Path:
    """n conversations with the same prompt and answers far longer than seq tokens (2 words
    per token of room), so that every row is cut to exactly seq tokens with the same number
    of trained tokens: every batch has the same shape and work on both sides of a ratio."""
    rng, words = random.Random(0), WORDS.split()
    with path.open("w") as f:
        for _ in range(n):
            answer = " ".join(rng.choice(words) for _ in range(2 * seq))
            f.write(json.dumps({"question": "Write a long story.", "answer": answer}) + "\n")
    return path


def train_overrides(check: Check, rows: Path, runs_dir: Path) -> list[str]:
    s = check.sizes
    return [
        "model=llama3_2_1b",
        f"model.name={'llama_smoke' if check.quick else 'llama3_2_1b_random'}",
        "model.path=null",  # random init of model.config: no download
        "model.tokenizer=tiny",
        f"model.config={hydra_value(s.llama)}",
        "dataset=gsm8k",
        "dataset.name=long_rows",
        f"dataset.source={rows}",
        "dataset.subset=null",
        f"dataset.max_length={s.seq}",
        f"dataset.val_size={s.batch}",
        f"trainer.batch_size={s.batch}",
        f"trainer.micro_batch_size={s.batch}",
        f"trainer.max_steps={s.steps}",
        "trainer.precision=bf16",
        f"trainer.device={check.device.type}",
        "trainer.log_every=1",
        "trainer.val_batches=1",
        "trainer.save_model=false",
        "eval=none",
        "logger=none",
        f"runs_dir={runs_dir}",
        "force=true",
        "seed=0",
    ]


def child_env(check: Check) -> dict[str, str]:
    """Offline, unbuffered, this checkout's src/ first on the path (uapt need not be installed:
    on a device machine it is not), one thread per process on CPU as the benchmarks do."""
    path = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ":".join(path)}
    env.setdefault("UAPT_CACHE", str(REPO / ".cache" / "uapt"))
    if check.device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_child(cmd: Sequence[str], check: Check, timeout: float) -> tuple[int | None, str, float]:
    """A subprocess from the repository root: exit status (None: killed at the timeout), the
    tail of its output, and its seconds."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=child_env(check), capture_output=True, text=True, timeout=timeout
        )
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        code, tail = None, f"timed out after {timeout:.0f} s\n" + _text(e.stderr)[-2000:]
    return code, tail, round(time.monotonic() - t0, 2)


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def uapt_train(check: Check, args: Sequence[str], timeout: float) -> dict[str, Any]:
    """`python -m uapt.train <args>` as a user runs it; exit status, seconds, output tail."""
    code, tail, seconds = run_child([sys.executable, "-m", "uapt.train", *args], check, timeout)
    return {
        "command": "python -m uapt.train " + " ".join(args),
        "exit_code": code,
        "seconds": seconds,
        "output_tail": tail if code != 0 else None,
    }


def run_folder(runs_dir: Path) -> Path | None:
    found = sorted(runs_dir.glob("*/run.json"))
    return found[0].parent if found else None


def step_figures(folder: Path, check: Check) -> dict[str, Any]:
    """tokens/s and peak memory from the run's metrics.jsonl (uapt's own per-step figures)."""
    record = json.loads((folder / "run.json").read_text())
    rows = [json.loads(r) for r in (folder / "metrics.jsonl").read_text().splitlines()]
    steady = rows[check.sizes.warmup_steps :]
    data = record.get("data", {})
    n_rows = data.get("train", 0) + data.get("val", 0)
    timings = record.get("timings", {})
    loop_s = timings.get("train_s", 0) - timings.get("setup_s", 0)
    tokens_per_step = check.sizes.batch * check.sizes.seq
    return {
        "status": record.get("status"),
        "steps": len(rows),
        "steady_steps": len(steady),
        "tokens_per_step": tokens_per_step,
        "tokens_per_s": spread([r["tokens_per_s"] for r in steady]),
        "peak_mem_mb": rows[-1]["peak_mem_mb"],
        "peak_memory": "cuda_max_memory_allocated" if check.device.type == "cuda" else "ru_maxrss",
        "loop_tokens_per_s": len(rows) * tokens_per_step / loop_s if loop_s > 0 else None,
        "rows_cut_to_seq": data.get("truncated") == n_rows and n_rows > 0,
        "teacher_cache": record.get("teacher_cache"),
        "model_config": record["config"]["model"],
        "trainer_config": record["config"]["trainer"],
    }


def run_variant(check: Check, name: str, rows: Path) -> dict[str, Any]:
    note = check.budget_note()
    if note:
        return not_measured(name, note)
    runs_dir = check.work / f"runs-{name}"
    args = [*train_overrides(check, rows, runs_dir), *VARIANTS[name]]
    outcome = uapt_train(check, args, min(check.left(), 900))
    folder = run_folder(runs_dir)
    if outcome["exit_code"] != 0 or folder is None:
        why = f"uapt-train exited {outcome['exit_code']}"
        return {"item": name, "measured": False, "error": True, "why": why, **outcome}
    return {"item": name, "measured": True, **outcome, **step_figures(folder, check)}


def variant_ratios(items: Mapping[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Step time of each variant / mle (= mle tokens/s / variant tokens/s, medians)."""
    base = items.get("mle", {})
    out = {}
    for name, item in items.items():
        if name == "mle" or not (item.get("measured") and base.get("measured")):
            continue
        ratio = base["tokens_per_s"]["median"] / item["tokens_per_s"]["median"]
        target = TARGETS.get(name)
        out[name] = {
            "ratio": ratio,
            "target": target,
            "met": None if target is None else ratio <= target,
        }
    return out


def section_train_step(check: Check, packages: Mapping[str, Any]) -> dict[str, Any]:
    lacking = missing(packages, "train_step")
    if lacking:
        why = f"missing: {', '.join(lacking)} (uapt-train needs them)"
        return {"status": "not measured", "why": why, "items": []}
    s = check.sizes
    rows = write_rows(check.work / "long_rows.jsonl", s.batch * (s.steps + 2), s.seq)
    variants = {name: run_variant(check, name, rows) for name in VARIANTS}
    hf = hf_comparison(check, packages, variants.get("mle", {}), rows)
    return {
        "config": {
            "architecture": "Llama-3.2-1B's config, random weights"
            + (", at smoke size (--quick)" if check.quick else ""),
            "model_config": dict(s.llama),
            "seq": s.seq,
            "batch": s.batch,
            "steps": s.steps,
            "steady_state_from_step": s.warmup_steps + 1,
            "precision": "bf16 (autocast; model.dtype=auto)",
            "clocks": CLOCKS,
        },
        "items": [*variants.values(), hf],
        "ratios_vs_mle": variant_ratios(variants),
    }


# ----------------------------------------------------------------------------- 3b. vs HF
def hf_comparison(
    check: Check, packages: Mapping[str, Any], mle: Mapping[str, Any], rows: Path
) -> dict[str, Any]:
    """transformers.Trainer on the same rows, model config and batch shape as uapt's mle run,
    in its own process (its own peak memory); the ratio is uapt's mle tokens/s over it."""
    item = "transformers.Trainer mle"
    lacking = missing(packages, "hf_trainer")
    why = check.budget_note() or (f"missing: {', '.join(lacking)}" if lacking else None)
    if not why and not mle.get("measured"):
        why = "uapt's mle run did not complete: nothing to compare with"
    if why:
        return not_measured(item, why)
    spec = {
        "device": check.device.type,
        "rows": str(rows),
        "seq": check.sizes.seq,
        "steps": check.sizes.steps,
        "warmup_steps": check.sizes.warmup_steps,
        "model": mle["model_config"],
        "trainer": mle["trainer_config"],
        "cache_dir": child_env(check)["UAPT_CACHE"],
    }
    result = run_worker(check, "hf_trainer", spec)
    if not result.get("measured"):
        return {"item": item, **result}
    ratio = mle["tokens_per_s"]["median"] / result["tokens_per_s"]["median"]
    return {
        "item": item,
        **result,
        "ratio_uapt_over_hf": {"ratio": ratio, "target": 1.0, "met": ratio >= 1.0},
    }


def run_worker(check: Check, worker: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """This script's --worker <worker> in its own process; its JSON result."""
    spec_path = check.work / f"{worker}.spec.json"
    out_path = check.work / f"{worker}.out.json"
    spec_path.write_text(json.dumps(spec))
    cmd = [sys.executable, __file__, "--worker", worker, str(spec_path), str(out_path)]
    code, tail, seconds = run_child(cmd, check, min(check.left(), 900))
    if code != 0 or not out_path.exists():
        why = f"worker exited {code}"
        return {"measured": False, "error": True, "why": why, "output_tail": tail}
    return {"measured": True, "seconds": seconds, **json.loads(out_path.read_text())}


def hf_rows(tokenizer: Any, path: Path, seq: int) -> list[dict[str, list[int]]]:
    """The rows as uapt trains them: chat template, labels on the answer only, cut at seq."""
    out = []
    for line in path.read_text().splitlines():
        row = json.loads(line)
        user = [{"role": "user", "content": row["question"]}]
        chat = [*user, {"role": "assistant", "content": row["answer"]}]
        ids = _ids(tokenizer.apply_chat_template(chat, tokenize=True))
        prompt = len(
            _ids(tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True))
        )
        if len(ids) < seq:
            raise ValueError(f"a row has {len(ids)} tokens, fewer than seq={seq}")
        labels = [-100] * prompt + ids[prompt:]
        out.append({"input_ids": ids[:seq], "labels": labels[:seq], "attention_mask": [1] * seq})
    return out


def _ids(encoded: Any) -> list[int]:
    return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)


def worker_hf_trainer(spec: Mapping[str, Any]) -> dict[str, Any]:
    """transformers.Trainer, uapt's optimisation settings (AdamW torch, lr, betas, decay,
    clipping, warm-up, cosine), bf16 autocast, no eval, no saving, no logging; the time of a
    step is between consecutive synchronised step ends."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from uapt.models import load_model, load_tokenizer

    device = torch.device(spec["device"])
    t = spec["trainer"]
    torch.manual_seed(0)
    if t["deterministic"]:  # as uapt's run did (seed_everything)
        torch.use_deterministic_algorithms(True, warn_only=True)
    tokenizer = load_tokenizer(spec["model"], spec["cache_dir"])
    model = load_model(spec["model"], tokenizer, spec["cache_dir"], device)
    rows = hf_rows(tokenizer, Path(spec["rows"]), spec["seq"])
    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sync(device)
            ends.append(time.perf_counter())

    args = TrainingArguments(
        output_dir=str(Path(spec["rows"]).parent / "hf-out"),
        per_device_train_batch_size=t["micro_batch_size"],
        max_steps=spec["steps"],
        learning_rate=t["lr"],
        weight_decay=t["weight_decay"],
        adam_beta1=t["betas"][0],
        adam_beta2=t["betas"][1],
        max_grad_norm=t["grad_clip"],
        warmup_steps=t["warmup_steps"],
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        bf16=t["precision"] == "bf16",
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=stack_rows)
    trainer.add_callback(Clock())
    trainer.train()  # peak memory since the process started, as uapt's peak_mem_mb
    tokens = t["micro_batch_size"] * spec["seq"]
    steps = [b - a for a, b in itertools.pairwise(ends)][spec["warmup_steps"] - 1 :]
    peak = (
        torch.cuda.max_memory_allocated(device) / MB if device.type == "cuda" else _ru_maxrss_mb()
    )
    return {
        "steps": len(ends),
        "steady_steps": len(steps),
        "tokens_per_step": tokens,
        "tokens_per_s": spread([tokens / s for s in steps]),
        "peak_mem_mb": peak,
        "peak_memory": "cuda_max_memory_allocated" if device.type == "cuda" else "ru_maxrss",
    }


def stack_rows(batch: Sequence[Mapping[str, list[int]]]) -> dict[str, torch.Tensor]:
    """Every row has seq tokens: a batch is a plain stack, no padding."""
    return {key: torch.tensor([row[key] for row in batch]) for key in batch[0]}


def _ru_maxrss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------- 4. end to end
def tiny_run(check: Check, runs_dir: Path, *extra: str) -> list[str]:
    """A tiny masked_mle_distill run in bf16 on the device (seconds of training)."""
    return [
        "model=tiny",
        "dataset=arith",
        "dataset.num_train=64",
        "dataset.val_size=16",
        "objective=masked_mle_distill",
        "trainer.max_steps=4",
        "trainer.batch_size=8",
        "trainer.micro_batch_size=4",
        "trainer.lr=1e-3",
        "trainer.precision=bf16",
        f"trainer.device={check.device.type}",
        f"runs_dir={runs_dir}",
        "force=true",
        *extra,
    ]


def section_e2e(check: Check, packages: Mapping[str, Any]) -> dict[str, Any]:
    """A whole run as a user starts it: bf16 training on the device, the embedded eval suite
    (base model and trained model), W&B offline; a missing package leaves out its part, named."""
    why = check.budget_note() or _lacking(packages, "e2e")
    if why:
        return {"status": "not measured", "why": why, "items": []}
    runs_dir, items, extra = check.work / "runs-e2e", [], []
    no_eval, no_wandb = _lacking(packages, "eval"), _lacking(packages, "wandb")
    if no_eval:
        extra.append("eval=none")
        items.append(not_measured("eval=embedded", no_eval))
    else:
        extra += check.sizes.e2e_eval
    if no_wandb:
        extra.append("logger=none")
        items.append(not_measured("W&B offline", no_wandb))
    else:
        extra += ["logger=wandb", "logger.mode=offline"]
    outcome = uapt_train(check, tiny_run(check, runs_dir, *extra), min(check.left(), 900))
    checks = run_checks(runs_dir, outcome)
    record = checks.pop("_record")
    if not no_eval:
        checks["eval_scores"] = bool(record.get("eval")) and bool(record.get("eval_base"))
    if not no_wandb:
        checks["wandb_offline_run"] = any((runs_dir / "wandb").glob("offline-run-*"))
    item = {
        "item": "uapt-train end to end",
        "measured": True,
        **outcome,
        "checks": checks,
        "ok": all(checks.values()),
        "timings": record.get("timings"),
        "eval": record.get("eval"),
    }
    return {"items": [item, *items]}


def _lacking(packages: Mapping[str, Any], need: str) -> str | None:
    names = missing(packages, need)
    return f"missing: {', '.join(names)}" if names else None


def run_checks(runs_dir: Path, outcome: Mapping[str, Any]) -> dict[str, Any]:
    """What a completed run leaves behind (its record is returned under _record)."""
    folder = run_folder(runs_dir)
    record = json.loads((folder / "run.json").read_text()) if folder else {}
    return {
        "exit_code_0": outcome["exit_code"] == 0,
        "status_completed": record.get("status") == "completed",
        "metrics_rows": folder is not None and _nonempty(folder / "metrics.jsonl"),
        "model_saved": folder is not None and (folder / "model" / "config.json").exists(),
        "_record": record,
    }


def _nonempty(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def section_ddp(check: Check, packages: Mapping[str, Any]) -> dict[str, Any]:
    """Two ranks (uapt-train starts torchrun) when there are two GPUs; else said so."""
    if check.device.type != "cuda":
        why = "--device cpu (DDP over gloo on CPU is tested by tests/test_distributed.py)"
        return {"status": "not measured", "why": why, "gpus": 0, "items": []}
    gpus = torch.cuda.device_count()
    if gpus < 2:
        why = f"{gpus} GPU on this machine; a two-rank DDP run needs 2"
        return {"status": "not measured", "why": why, "gpus": gpus, "items": []}
    why = check.budget_note() or _lacking(packages, "e2e")
    if why:
        return {"status": "not measured", "why": why, "gpus": gpus, "items": []}
    runs_dir = check.work / "runs-ddp"
    args = tiny_run(check, runs_dir, "trainer.nproc=2", "logger=none")
    outcome = uapt_train(check, args, min(check.left(), 600))
    checks = run_checks(runs_dir, outcome)
    checks["world_size_2"] = checks.pop("_record").get("world_size") == 2
    item = {"item": "uapt-train trainer.nproc=2", "measured": True, **outcome, "checks": checks}
    return {"gpus": gpus, "items": [{**item, "ok": all(checks.values())}]}


# ----------------------------------------------------------------------------- driver
RUNNERS = {
    "parity": section_parity,
    "loss_memory": section_loss_memory,
    "train_step": section_train_step,
    "e2e": section_e2e,
    "ddp": section_ddp,
}


def run_section(name: str, check: Check, packages: Mapping[str, Any]) -> dict[str, Any]:
    """A section's result; an exception fails that section only, with its message."""
    t0 = time.monotonic()
    try:
        result = RUNNERS[name](check, packages)
        result.setdefault("status", section_status(result.get("items", [])))
    except Exception as e:  # report and go on: the next section may still measure
        import traceback

        result = {
            "status": "failed",
            "why": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()[-3000:],
            "items": [],
        }
    free(check.device)
    result["seconds"] = round(time.monotonic() - t0, 2)
    return result


def section_status(items: Sequence[Mapping[str, Any]]) -> str:
    """failed: an item broke or failed its check; else how much of it was measured."""
    if any(i.get("error") or i.get("ok") is False for i in items):
        return "failed"
    measured = [i for i in items if i.get("measured")]
    if not measured:
        return "not measured"
    return "measured" if len(measured) == len(items) else "partly measured"


def gpu_info(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"gpu": None, "cuda_available": torch.cuda.is_available()}
    props = torch.cuda.get_device_properties(device)
    info = {
        "gpu": props.name,
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gb": round(props.total_memory / 1e9, 1),
        "capability": f"{props.major}.{props.minor}",
        "torch_cuda": torch.version.cuda,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        info["driver"] = subprocess.run(
            query, capture_output=True, text=True, timeout=20
        ).stdout.strip()
    return info


def new_payload(check: Check, argv: Sequence[str], packages: Mapping[str, Any]) -> dict:
    now = datetime.datetime.now(datetime.UTC)
    return {
        "benchmark": "gpu_check",
        "quick": check.quick,
        "device": check.device.type,
        "started_at": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/gpu_check.py " + " ".join(argv),
        "machine": {**machine_info(str(check.device)), **gpu_info(check.device)},
        "packages": packages,
        "sections": {},
    }


def run_all(check: Check, sections: Sequence[str], argv: Sequence[str], out: Path | None) -> dict:
    """Run the sections in turn, writing the record after each one."""
    packages = package_table()
    payload = new_payload(check, argv, packages)
    for name in sections:
        print(f"== gpu_check: {name} ({time.monotonic() - check.started:.0f} s)", flush=True)
        payload["sections"][name] = run_section(name, check, packages)
        payload["not_measured"] = unmeasured(payload["sections"])
        payload["seconds"] = round(time.monotonic() - check.started, 1)
        write_json(out, payload)  # after every section: a killed run keeps what it measured
    payload["load_average_after"] = load_average()  # how busy the machine's CPUs were
    write_json(out, payload)
    return payload


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to measure (default cuda when PyTorch sees a GPU)",
    )
    p.add_argument("--quick", action="store_true", help="smoke sizes: the same paths in seconds")
    p.add_argument("--json", type=Path, default=None, help="write the record here")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="start no item after this many seconds (default: 300 at full size, none with "
        "--quick); what is skipped is named in the output",
    )
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp)")
    p.add_argument(
        "--render",
        type=Path,
        nargs="+",
        help="print records as Markdown and exit (later records' sections replace earlier ones)",
    )
    p.add_argument(
        "--doc",
        type=Path,
        nargs="+",
        help="put records (a run, then reruns) into docs/performance.md and the committed record",
    )
    p.add_argument("--note", default=None, help="with --doc/--render: a line kept in the record")
    p.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no GPU here (use --device cpu for the CPU paths)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        name, spec, out = args.worker
        result = {"hf_trainer": worker_hf_trainer}[name](json.loads(Path(spec).read_text()))
        Path(out).write_text(json.dumps(result))
        return 0
    if args.render or args.doc:
        payload = merge_records([json.loads(path.read_text()) for path in args.render or args.doc])
        if args.note:
            payload["note"] = args.note
        if args.render:
            print(render_markdown(payload))
            return 0
        update_doc(payload)
        print(f"wrote the GPU section of {DOC} and the record {RECORD}")
        return 0
    return check_and_report(args, argv)


def check_and_report(args: argparse.Namespace, argv: Sequence[str]) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if args.device == "cpu":  # as the other benchmarks: OpenMP threads spin on a busy CPU
        torch.set_num_threads(1)
    deadline_s = args.deadline_s if args.deadline_s is not None else (None if args.quick else 300)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="uapt-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(
        device=torch.device(args.device),
        quick=args.quick,
        sizes=QUICK if args.quick else FULL,
        work=work,
        deadline=None if deadline_s is None else time.monotonic() + deadline_s,
    )
    try:
        payload = run_all(check, args.sections.split(","), argv, args.json)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(render_text(payload))
    failed = [n for n, s in payload["sections"].items() if s["status"] == "failed"]
    if failed:  # a rerun writes its own record; --doc <first> <rerun> merges them
        print(f"failed: {', '.join(failed)}; rerun them with --sections {','.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
