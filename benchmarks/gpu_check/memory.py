"""Section loss_memory: extra peak memory and time of one loss forward + backward at Gemma-2-2b's
head (bf16 weights), naive full logits vs uapt's chunked path, CE and CE+KL: the methods and the
measurement of benchmarks/loss_memory.py, with Liger-Kernel's fused linear cross-entropy and
fused linear JSD (beta 0: forward KL) beside them where liger_kernel imports (CUDA only)."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import loss_memory
import torch

from gpu_check.check import MB, Check, guarded, missing, not_measured, spread

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


def loss_runner(name: str, inputs: dict[str, Any], args: argparse.Namespace) -> Callable[[], float]:
    """One forward + backward of the method (loss_memory's, or Liger's); the weight's .grad
    buffer stays allocated (as after the first step of training), the hidden states' gradient is
    dropped."""

    def run() -> float:
        if not name.startswith("liger"):
            return loss_memory.run_method(name, inputs, args)
        loss = liger_loss(inputs, with_kl=name == "liger_ce_kl")
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


def measure_method(
    run: Callable[[], float], check: Check, peak: loss_memory.CpuPeak | None
) -> dict:
    """loss_memory.measure: a warm-up call (kernels, Triton compilation, allocator), then the
    measured call and more repetitions for the time; memory from the measured call."""
    m = loss_memory.measure(run, check.device, check.sizes.loss_reps, peak)
    return {"measured": True, **m, "ms": spread(m["ms"])}


def loss_size(
    check: Check, tokens: int, liger_why: str | None, peak: loss_memory.CpuPeak | None
) -> list:
    s = check.sizes
    ns = argparse.Namespace(
        vocab=s.loss_vocab,
        hidden=s.loss_hidden,
        tokens=tokens,
        dtype="bf16",
        device=str(check.device),
        frozen_head=False,
        chunk_size=s.loss_chunk,
    )
    inputs = loss_memory.make_inputs(ns)
    rows = []
    for name in LOSS_METHODS:
        item = f"{name} {tokens} tokens"
        why = check.budget_note() or (liger_why if name.startswith("liger") else None)
        if why:
            rows.append(not_measured(item, why, method=name, tokens=tokens))
            continue
        run = loss_runner(name, inputs, ns)
        row = guarded(item, measure_method, run, check, peak)
        inputs["hidden"].grad = None  # also after a failed call
        rows.append({**row, "method": name, "tokens": tokens})
        loss_memory.free(check.device)
    del inputs
    loss_memory.free(check.device)
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
    peak = loss_memory.CpuPeak() if check.device.type != "cuda" else None
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
