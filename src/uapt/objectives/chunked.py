"""The chunked path: `token_loss(head.logits(hidden), ...)` from hidden states and the output layer, without ever holding [B, T, V] logits (vocabularies reach 256k)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from uapt.objectives.divergences import TeacherTopK
from uapt.objectives.fused import _Fused, _fused_pass, _FusedHeadLoss, _nll_pass, _score_pass
from uapt.objectives.head import OutputHead, _compute_dtype
from uapt.objectives.loss import (
    TokenLoss,
    _check_cached,
    _check_labels,
    _count,
    _require_teacher,
    _teacher_needed,
    _zero,
)
from uapt.objectives.selection import (
    Counts,
    _check_kept,
    _denominators,
    _distill_mask,
    _scores_from,
    select_kept,
    valid_mask,
)
from uapt.objectives.spec import ObjectiveSpec, parse_objective


def _chunked_rows(hidden: torch.Tensor, labels: torch.Tensor, head: OutputHead, chunk_size: int):
    """valid [B, T], its (b, t) indices and targets [N], after checking the inputs."""
    _check_chunked_inputs(hidden, labels, head, chunk_size)
    valid = valid_mask(labels)
    b_idx, t_idx = valid.nonzero(as_tuple=True)
    targets = labels[b_idx, t_idx]
    _check_labels(labels, targets, head.weight.shape[0])
    return valid, b_idx, t_idx, targets


def _chunked_scores(
    spec: ObjectiveSpec,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    gather,
    head: OutputHead,
    teacher_hidden: torch.Tensor | None,
    teacher_head: OutputHead,
    cached: TeacherTopK | None,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: the student nll [N] and selection scores [N] (excess from a cache's NLL)."""
    select = "nll" if spec.select == "excess" and teacher_hidden is None else spec.select
    t_all = gather(teacher_hidden.detach()) if select == "excess" else None
    nll, scores = _score_pass(
        gather(hidden.detach()), t_all, targets, head, teacher_head, select, chunk_size
    )
    if select != spec.select:  # excess from the cached teacher NLL
        _check_cached(cached, targets.shape[0])
        scores = nll - cached.nll.to(nll)
    return nll, scores


def token_scores_chunked(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    objective: Mapping[str, Any] | ObjectiveSpec,
    head: OutputHead,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: OutputHead | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    *,
    cached_teacher: TeacherTopK | None = None,
) -> torch.Tensor:
    """``token_scores(head.logits(hidden), ...)`` chunk by chunk (never [B, T, V] logits)."""
    spec = parse_objective(objective)
    valid, b_idx, t_idx, targets = _chunked_rows(hidden, labels, head, chunk_size)
    if spec.select == "random":
        return _scores_from(spec, labels, valid, None, generator)
    if spec.select == "excess":
        _require_teacher(
            spec, teacher_hidden is not None or cached_teacher is not None, "teacher_hidden"
        )

    def gather(x: torch.Tensor) -> torch.Tensor:
        return x[b_idx, t_idx - 1]

    _, flat = _chunked_scores(
        spec,
        hidden,
        targets,
        gather,
        head,
        teacher_hidden,
        teacher_head or head,
        cached_teacher,
        chunk_size,
    )
    return _scores_from(spec, labels, valid, flat, generator)


def token_loss_chunked(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    objective: Mapping[str, Any] | ObjectiveSpec,
    head: OutputHead,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: OutputHead | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = 1024,
    *,
    cached_teacher: TeacherTopK | None = None,
    kept: torch.Tensor | None = None,
    counts: Counts | None = None,
) -> TokenLoss:
    """``token_loss(head.logits(hidden), ...)`` without ever holding [B, T, V] logits.

    hidden [B, T, H]: the student's final (normed) hidden states, grad-carrying; teacher_hidden
    the teacher's (detached); teacher_head defaults to head; or, instead of both, the teacher's
    cached top-k at the valid positions (``cached_teacher``, see ``TeacherTopK``). ``kept`` and
    ``counts`` as in ``token_loss``. Valid positions are gathered to [N, H]. Pass 1 (no grad;
    skipped when rho = 0, select=random or ``kept`` is given) scores every token chunk by chunk;
    selection then sees all N scores (the same function as token_loss). Pass 2 visits only kept
    or distilled rows, ``chunk_size`` at a time: fp32 logits, loss terms and their closed-form
    gradients w.r.t. hidden and the head's weight/bias, the weight gradient accumulated in place
    into one [V, H] buffer (the head's dtype; only when the head is trained), which backward
    hands to autograd. Rows neither kept nor distilled get a no-grad NLL pass when pass 1 did
    not run, so that ``nll`` is complete for logging. Besides the weight gradient, the peak holds
    one [chunk_size, V] fp32 block of student logits (turned into its gradient in place), the
    teacher's logits for chunk_size / 8 rows and row-block temporaries: about
    1.4 x chunk_size x V x 4 bytes (1.15 x without distillation).
    Softcapping is applied in fp32 after the matmul (HF applies it in the model's dtype).

    Only ``total`` (or a multiple: DDP's world_size, AMP scaling) may be backpropagated;
    backward raises if ``mle`` and ``distill`` get other relative weights.
    """
    spec = parse_objective(objective)
    valid, b_idx, t_idx, targets = _chunked_rows(hidden, labels, head, chunk_size)
    needs = _teacher_needed(spec, kept)
    if needs:
        _require_teacher(
            spec, teacher_hidden is not None or cached_teacher is not None, "teacher_hidden"
        )
    teacher_head = teacher_head or head
    cached = cached_teacher if needs and teacher_hidden is None else None
    if cached is not None:
        _check_cached(cached, targets.shape[0])

    def gather(x: torch.Tensor, idx: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [n, H] of x predicting the valid labels (all, or those at idx)."""
        return x[b_idx, t_idx - 1] if idx is None else x[b_idx[idx], t_idx[idx] - 1]

    nll_flat = None
    if kept is not None:
        kept = _check_kept(kept, valid)
    elif spec.mask_ratio == 0:
        kept = valid.clone()
    else:
        flat_scores = None
        if spec.select != "random":
            nll_flat, flat_scores = _chunked_scores(
                spec,
                hidden,
                targets,
                gather,
                head,
                teacher_hidden,
                teacher_head,
                cached,
                chunk_size,
            )
        kept = select_kept(_scores_from(spec, labels, valid, flat_scores, generator), valid, spec)
    distilled = _distill_mask(spec, valid, kept)
    den = _denominators(counts, kept, valid, spec)
    kept_f, dist_f = kept[b_idx, t_idx], distilled[b_idx, t_idx]

    # Pass 2 rows: distilled first (their teacher rows are then a prefix), then kept-only.
    d_rows = dist_f.nonzero(as_tuple=True)[0]
    rows = torch.cat([d_rows, (kept_f & ~dist_f).nonzero(as_tuple=True)[0]])
    dtype = _compute_dtype(hidden)
    mle_den = _count(den.kept if spec.normalize == "kept" else den.valid, labels.device)
    mle_w = kept_f[rows].to(dtype) / mle_den.to(dtype)
    dist_w = 1 / _count(den.distilled, labels.device).to(dtype)
    cfg = _Fused(
        softcap=head.softcap,
        teacher_softcap=teacher_head.softcap,
        divergence=spec.divergence,
        jsd_beta=spec.jsd_beta,
        temperature=spec.temperature,
        distill_weight=spec.distill_weight,
        chunk=chunk_size,
    )
    t_rows = None
    if spec.distill_weight > 0:
        t_rows = cached.rows(d_rows) if cached else gather(teacher_hidden.detach(), d_rows)
    t_w = teacher_head.weight.detach()
    t_b = None if teacher_head.bias is None else teacher_head.bias.detach()
    args = (
        gather(hidden, rows),
        head.weight,
        head.bias,
        t_rows,
        t_w,
        t_b,
        targets[rows],
        mle_w,
        dist_w,
        cfg,
    )
    grad_on = torch.is_grad_enabled() and (
        hidden.requires_grad
        or head.weight.requires_grad
        or (head.bias is not None and head.bias.requires_grad)
    )
    if grad_on:
        sums, nll_rows = _FusedHeadLoss.apply(*args)
    else:
        sums, nll_rows, _ = _fused_pass(*args, needs=(False, False, False))
    mle, distill = sums[0] + _zero(hidden), sums[1] + _zero(hidden)

    if nll_flat is None:
        nll_flat = torch.zeros(targets.shape, dtype=dtype, device=labels.device)
        nll_flat[rows] = nll_rows
        rest = (~(kept_f | dist_f)).nonzero(as_tuple=True)[0]
        if rest.numel():
            h_rest = gather(hidden.detach(), rest)
            nll_flat[rest] = _nll_pass(h_rest, targets[rest], head, chunk_size)
    nll = torch.zeros(labels.shape, dtype=torch.float32, device=labels.device)
    nll[b_idx, t_idx] = nll_flat.detach().float()
    return TokenLoss(
        mle + spec.distill_weight * distill, mle, distill, kept, valid, distilled, nll, den
    )


def _check_chunked_inputs(
    hidden: torch.Tensor, labels: torch.Tensor, head: OutputHead, chunk_size: int
) -> None:
    if hidden.dim() != 3 or hidden.shape[:2] != labels.shape:
        raise ValueError(
            f"hidden must be [B, T, H] matching labels [B, T]: got {tuple(hidden.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if head.weight.dim() != 2 or head.weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"head.weight must be [V, {hidden.shape[-1]}], got {tuple(head.weight.shape)}"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be an int >= 1 for the chunked path")
