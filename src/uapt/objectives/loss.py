"""The reference path: the objective on full logits [B, T, V], simple and exact (docs/objective.md)."""

from __future__ import annotations

import torch

from uapt.objectives.divergences import TeacherTopK, cached_buckets, divergence_rows
from uapt.objectives.positions import attached_zero, label_positions, upcast
from uapt.sections.objective import ObjectiveSpec


class LogitsPath:
    """One call's student logits [B, T, V] (any float dtype; computed in fp32) and teacher.

    The teacher is its logits [B, T, V] (detached, exact) or its cached top-k at the valid
    positions (`TeacherTopK`), or None when the call does not read it. The student's
    log-probabilities at the valid positions are computed once, for the scores and the terms.
    """

    def __init__(
        self,
        spec: ObjectiveSpec,
        logits: torch.Tensor,
        labels: torch.Tensor,
        teacher: torch.Tensor | TeacherTopK | None,
    ) -> None:
        _check_logits(logits, labels)
        if teacher is not None and not isinstance(teacher, torch.Tensor | TeacherTopK):
            raise ValueError(
                "the teacher of a student given as logits is its logits [B, T, V] or a "
                f"TeacherTopK, got {type(teacher).__name__}"
            )
        self.spec, self.logits = spec, logits
        self.positions = pos = label_positions(labels, logits.shape[-1])
        self.z = upcast(logits[pos.b, pos.t - 1])  # [N, V]: the logits predicting each label
        self.log_q = torch.log_softmax(self.z, dim=-1)
        self.nll = -self.log_q.gather(1, pos.targets.unsqueeze(1)).squeeze(1)
        live = isinstance(teacher, torch.Tensor)
        self.teacher_z = upcast(pos.predicting(teacher.detach())) if live else None
        self.cached = None if live else teacher

    def flat_scores(self) -> torch.Tensor:
        """Selection scores [N] at the valid positions (select=random draws noise instead)."""
        spec, nll = self.spec, self.nll
        if spec.select == "nll":
            return nll
        if spec.select == "entropy":
            return -(self.log_q.exp() * self.log_q).sum(-1)
        if self.teacher_z is None:  # excess, from the cached teacher's NLL
            return nll - self.cached.nll.to(nll)
        t_log = torch.log_softmax(self.teacher_z, dim=-1)
        return nll + t_log.gather(1, self.positions.targets.unsqueeze(1)).squeeze(1)

    def terms(
        self,
        kept: torch.Tensor,
        distilled: torch.Tensor,
        mle_den: torch.Tensor,
        distill_den: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mle, distill, nll [N]): the kept tokens' NLL sum and the distilled tokens'
        divergence sum over their denominators; kept, distilled: bool [N]."""
        spec = self.spec
        mle = (self.nll * kept).sum() / mle_den + attached_zero(self.logits)
        distill = attached_zero(self.logits)
        if spec.distill_weight > 0:
            tau = spec.temperature
            rows = distilled.nonzero(as_tuple=True)[0]
            log_q = torch.log_softmax(self.z[rows] / tau, dim=-1)
            if self.teacher_z is None:  # cached: the k + 1 buckets of TeacherTopK
                log_p, log_q = cached_buckets(log_q, self.cached.rows(rows))
            else:
                log_p = torch.log_softmax(self.teacher_z[rows] / tau, dim=-1)
            d = tau * tau * divergence_rows(log_p, log_q, spec.divergence, spec.jsd_beta)
            distill = distill + d.sum() / distill_den
        return mle, distill, self.nll


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [B, T, V] matching labels [B, T]: got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
