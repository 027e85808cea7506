"""The reference path: the objective on full logits [B, T, V], simple and exact (docs/objective.md)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from uapt.objectives.divergences import TeacherTopK, _fp32, cached_buckets, divergence_rows
from uapt.objectives.selection import (
    Counts,
    _check_kept,
    _denominators,
    _distill_mask,
    _scores_from,
    select_kept,
    valid_mask,
)
from uapt.objectives.spec import IGNORE_INDEX, ObjectiveSpec, parse_objective


@dataclass
class TokenLoss:
    """The objective on one micro-batch: its share of the global batch's token means.

    total = mle + distill_weight * distill (grad-carrying scalars). kept / valid / distilled are
    bool [B, T] aligned with labels; nll is the detached fp32 student NLL at valid positions (0
    elsewhere); denominators are the global batch's counts the sums were divided by.
    """

    total: torch.Tensor
    mle: torch.Tensor
    distill: torch.Tensor
    kept: torch.Tensor
    valid: torch.Tensor
    distilled: torch.Tensor
    nll: torch.Tensor
    denominators: Counts

    def sums(self) -> torch.Tensor:
        """Summable figures (float64): total, mle, distill shares; kept and valid counts; NLL
        sums over kept and over valid-but-unkept tokens. Summed over a step's micro-batches and
        ranks they give the step's loss terms and its token means."""
        kept, unkept = self.kept & self.valid, ~self.kept & self.valid
        return torch.tensor(
            [
                float(self.total.detach()),
                float(self.mle.detach()),
                float(self.distill.detach()),
                int(kept.sum()),
                int(self.valid.sum()),
                float(self.nll[kept].sum()),
                float(self.nll[unkept].sum()),
            ],
            dtype=torch.float64,
        )


def _check_labels(labels: torch.Tensor, targets: torch.Tensor, vocab: int) -> None:
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    if targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"labels hold {bad}, outside [0, {vocab}) and not {IGNORE_INDEX}")


def _zero(x: torch.Tensor) -> torch.Tensor:
    """A zero attached to x's graph (no full reduction, no NaN from x's values)."""
    return _fp32(x[..., :0].sum())


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [B, T, V] matching labels [B, T]: got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )


def _teacher_needed(spec: ObjectiveSpec, kept: torch.Tensor | None) -> bool:
    """Teacher outputs are read for distillation, and for selection by excess loss when this
    call selects (a kept mask handed in was selected elsewhere)."""
    selects = kept is None and spec.mask_ratio > 0
    return spec.distill_weight > 0 or (selects and spec.select == "excess")


def _require_teacher(spec: ObjectiveSpec, given: bool, what: str) -> None:
    if not given:
        raise ValueError(
            f"{what} or cached_teacher are required: objective has "
            f"distill_weight={spec.distill_weight}, select={spec.select!r}"
        )


def _flat_scores(
    spec: ObjectiveSpec,
    log_q: torch.Tensor,
    nll: torch.Tensor,
    targets: torch.Tensor,
    teacher_z: torch.Tensor | None,
    cached: TeacherTopK | None,
) -> torch.Tensor | None:
    """Selection scores [N] at the valid positions (None for random: noise is drawn apart)."""
    if spec.select == "nll":
        return nll
    if spec.select == "entropy":
        return -(log_q.exp() * log_q).sum(-1)
    if spec.select == "excess" and teacher_z is None:
        return nll - cached.nll.to(nll)
    if spec.select == "excess":
        t_log = torch.log_softmax(teacher_z, dim=-1)
        return nll + t_log.gather(1, targets.unsqueeze(1)).squeeze(1)
    return None


def _full_logits_rows(logits: torch.Tensor, labels: torch.Tensor):
    """valid [B, T], its (b, t) indices, targets [N], fp32 logits [N, V] and log-probs [N, V]."""
    valid = valid_mask(labels)
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    targets = labels[b_idx, t_idx]
    _check_labels(labels, targets, logits.shape[-1])
    z = _fp32(logits[b_idx, t_idx - 1])  # [N, V]: the logits predicting each valid label
    return valid, b_idx, t_idx, targets, z, torch.log_softmax(z, dim=-1)


@torch.no_grad()
def token_scores(
    logits: torch.Tensor,
    labels: torch.Tensor,
    objective: Mapping[str, Any] | ObjectiveSpec,
    teacher_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    cached_teacher: TeacherTopK | None = None,
) -> torch.Tensor:
    """The selection scores s_t [B, T] (0 at invalid positions) that ``token_loss`` ranks: for a
    selection over more rows than one call holds (the loop's scoring pass)."""
    spec = parse_objective(objective)
    _check_logits(logits, labels)
    if spec.select == "excess":
        _require_teacher(
            spec, teacher_logits is not None or cached_teacher is not None, "teacher_logits"
        )
    valid, b_idx, t_idx, targets, _, log_q = _full_logits_rows(logits, labels)
    nll = -log_q.gather(1, targets.unsqueeze(1)).squeeze(1)
    tz = None
    if spec.select == "excess" and teacher_logits is not None:
        tz = _fp32(teacher_logits.detach()[b_idx, t_idx - 1])
    elif spec.select == "excess":
        _check_cached(cached_teacher, targets.shape[0])
    flat = _flat_scores(spec, log_q, nll, targets, tz, cached_teacher)
    return _scores_from(spec, labels, valid, flat, generator)


def token_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    objective: Mapping[str, Any] | ObjectiveSpec,
    teacher_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    cached_teacher: TeacherTopK | None = None,
    kept: torch.Tensor | None = None,
    counts: Counts | None = None,
) -> TokenLoss:
    """The objective on full logits [B, T, V] (any float dtype; computed in fp32).

    The teacher (needed when distill_weight > 0 or select=excess) is ``teacher_logits``
    [B, T, V] (detached, exact) or ``cached_teacher`` (its top-k at the valid positions, see
    ``TeacherTopK``). ``generator`` feeds select=random (B*T uniforms drawn per call).
    ``kept``: a kept mask selected over more rows than this call holds (no selection here);
    ``counts``: the global batch's denominators (default: this call's own).
    """
    spec = parse_objective(objective)
    _check_logits(logits, labels)
    needs = _teacher_needed(spec, kept)
    if needs:
        _require_teacher(
            spec, teacher_logits is not None or cached_teacher is not None, "teacher_logits"
        )
    valid, b_idx, t_idx, targets, z, log_q1 = _full_logits_rows(logits, labels)
    nll_flat = -log_q1.gather(1, targets.unsqueeze(1)).squeeze(1)
    tz = None
    if needs and teacher_logits is not None:
        tz = _fp32(teacher_logits.detach()[b_idx, t_idx - 1])
    elif needs:
        _check_cached(cached_teacher, targets.shape[0])

    if kept is not None:
        kept = _check_kept(kept, valid)
    elif spec.mask_ratio == 0:
        kept = valid.clone()
    else:
        flat_scores = _flat_scores(spec, log_q1, nll_flat, targets, tz, cached_teacher)
        kept = select_kept(_scores_from(spec, labels, valid, flat_scores, generator), valid, spec)
    distilled = _distill_mask(spec, valid, kept)
    den = _denominators(counts, kept, valid, spec)

    kept_f, dist_f = kept[b_idx, t_idx], distilled[b_idx, t_idx]
    mle_den = _count(den.kept if spec.normalize == "kept" else den.valid, labels.device)
    mle = (nll_flat * kept_f).sum() / mle_den + _zero(logits)

    distill = _zero(logits)
    if spec.distill_weight > 0:
        tau = spec.temperature
        rows = dist_f.nonzero(as_tuple=True)[0]
        log_q = torch.log_softmax(z[rows] / tau, dim=-1)
        if tz is None:  # cached: the k + 1 buckets of TeacherTopK
            log_p, log_q = cached_buckets(log_q, cached_teacher.rows(rows))
        else:
            log_p = torch.log_softmax(tz[rows] / tau, dim=-1)
        d = tau * tau * divergence_rows(log_p, log_q, spec.divergence, spec.jsd_beta)
        distill = distill + d.sum() / _count(den.distilled, labels.device)

    nll = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    nll[b_idx, t_idx] = nll_flat.detach().float()
    return TokenLoss(
        mle + spec.distill_weight * distill, mle, distill, kept, valid, distilled, nll, den
    )


def _count(n: int, device: torch.device) -> torch.Tensor:
    """A denominator as an int64 tensor, at least 1 (an empty set's sum is 0 anyway)."""
    return torch.tensor(max(n, 1), dtype=torch.int64, device=device)


def _check_cached(cached: TeacherTopK | None, n_valid: int) -> None:
    if cached is None or cached.nll.shape[0] != n_valid:
        got = None if cached is None else cached.nll.shape[0]
        raise ValueError(f"cached_teacher must cover the {n_valid} valid positions, got {got}")
