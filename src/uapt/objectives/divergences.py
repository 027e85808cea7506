"""Divergences between teacher and student distributions, exact or over a cached teacher's top-k buckets (docs/objective.md, "Self-distillation")."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from uapt.objectives.positions import upcast


def log_softmax_at(x: torch.Tensor, tau: float) -> torch.Tensor:
    """log softmax(x / tau) over the last dimension (no division at tau = 1)."""
    return torch.log_softmax(x / tau if tau != 1 else x, dim=-1)


def _kl_rows(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(A || B) per row from log-probabilities; terms with A = 0 count 0."""
    a = log_a.exp()
    return torch.where(a > 0, a * (log_a - log_b), 0.0).sum(-1)


def divergence_rows(
    log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, jsd_beta: float
) -> torch.Tensor:
    """div(P, Q) per row; P the teacher, Q the student (log-probabilities at temperature tau)."""
    if divergence == "forward_kl":
        return _kl_rows(log_p, log_q)
    if divergence == "reverse_kl":
        return _kl_rows(log_q, log_p)
    log_m = torch.logsumexp(
        torch.stack([log_p + math.log(jsd_beta), log_q + math.log1p(-jsd_beta)]), dim=0
    )
    return jsd_beta * _kl_rows(log_p, log_m) + (1 - jsd_beta) * _kl_rows(log_q, log_m)


@dataclass(frozen=True)
class TeacherTopK:
    """The frozen teacher at N valid positions (token_loss's flat order), as a cache stores it.

    ids / logp [N, k]: its k most likely tokens and their log-probabilities at temperature tau;
    rest [N]: log of the probability mass outside them; nll [N]: -log p(label) at tau = 1 (exact,
    for select=excess). The distillation term then compares teacher and student on k + 1 buckets
    (the k tokens, everything else): a coarsening, so every divergence here is a lower bound of
    the full-vocabulary one (data processing inequality), exact when k covers the vocabulary.
    """

    ids: torch.Tensor
    logp: torch.Tensor
    rest: torch.Tensor
    nll: torch.Tensor

    def rows(self, index: torch.Tensor | slice) -> TeacherTopK:
        return TeacherTopK(self.ids[index], self.logp[index], self.rest[index], self.nll[index])

    def to(self, device: torch.device | str) -> TeacherTopK:
        return TeacherTopK(*(x.to(device) for x in (self.ids, self.logp, self.rest, self.nll)))


def teacher_topk(
    logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float = 1.0
) -> TeacherTopK:
    """What a cache keeps of teacher logits [N, V] predicting targets [N] (computed in fp32)."""
    z = upcast(logits)
    log_p = log_softmax_at(z, temperature)
    k = min(k, z.shape[-1])
    logp, ids = log_p.topk(k, dim=-1)
    rest = rest_logmass(log_p, ids)
    nll = -torch.log_softmax(z, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return TeacherTopK(ids, logp, rest, nll)


def rest_logmass(log_p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside ``ids`` [N, k], per row of log_p [N, V].

    A log-sum-exp over the other tokens, not log(1 - sum of the top k): where the top k hold all
    but ~1e-7 of the mass, 1 - sum rounds to 0 in fp32, and the divergence's gradient through it
    (d/d log Q~rest) divided by that rounded mass overflowed the step's gradient norm.
    """
    return log_p.scatter(1, ids, float("-inf")).logsumexp(-1)


def cached_buckets(log_q: torch.Tensor, cached: TeacherTopK) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities [N, k + 1] over the buckets of ``cached``.

    log_q [N, V]: the student's log-probabilities at the cache's temperature. The buckets are the
    teacher's k tokens, then everything else; with k = V there is no rest bucket. The student's
    rest is floored at the dtype's tiny: a student with no mass outside the k tokens gets a large
    finite divergence, not inf.
    """
    top = log_q.gather(1, cached.ids)
    log_p = cached.logp.to(log_q)
    if cached.ids.shape[1] >= log_q.shape[1]:
        return log_p, top
    rest = rest_logmass(log_q, cached.ids).clamp(min=math.log(torch.finfo(log_q.dtype).tiny))
    log_p = torch.cat([log_p, cached.rest.to(log_q).unsqueeze(1)], dim=1)
    return log_p, torch.cat([top, rest.unsqueeze(1)], dim=1)
