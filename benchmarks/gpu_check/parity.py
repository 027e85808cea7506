"""Section parity: uapt's chunked loss against its naive one (token_loss_chunked vs token_loss:
values, kept sets, gradients) in fp32 and bf16 for the named objectives of conf/objective/, at
Gemma-2-2b's head."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from loss_memory import free

from gpu_check.check import CONF, GEMMA2_SOFTCAP, Check, Sizes, guarded, missing, not_measured

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
    """One objective on the inputs cast to dtype, on full logits (chunk None) or chunk by chunk
    from hidden states; returns the value, kept set and the gradients of hidden and weight."""
    from uapt.objectives import Hidden, Objective, OutputHead

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
        out = Objective(objective).loss(head.logits(hidden), labels, teacher_logits)
    else:
        student, teacher = Hidden(hidden, head), Hidden(teacher_hidden, teacher_head)
        out = Objective(objective, chunk).loss(student, labels, teacher)
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
