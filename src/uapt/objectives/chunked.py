"""The chunked path: the objective of `head.logits(hidden)` from hidden states and the output layer, without ever holding [B, T, V] logits (vocabularies reach 256k)."""

from __future__ import annotations

import torch

from uapt.objectives.divergences import TeacherTopK
from uapt.objectives.fused import FusedConstants, FusedHeadLoss, fused_pass, nll_pass, score_pass
from uapt.objectives.head import Hidden, OutputHead
from uapt.objectives.positions import attached_zero, compute_dtype, label_positions
from uapt.sections.objective import ObjectiveSpec


class HiddenPath:
    """One call's student hidden states with their output layer, and teacher.

    The student's hidden states [B, T, H] are its final (normed) ones, grad-carrying; the
    teacher is the same for the teacher (detached; its head may be another), or its cached top-k
    at the valid positions (`TeacherTopK`), or None when the call does not read it. Valid
    positions are gathered to [N, H]. Pass 1 (`flat_scores`, no grad; only when the call selects
    by a score) scores every token chunk by chunk; selection then sees all N scores (the same
    function as the logits path). Pass 2 (`terms`) visits only kept or distilled rows,
    `chunk_size` at a time: fp32 logits, loss terms and their closed-form gradients w.r.t. hidden
    and the head's weight/bias, the weight gradient accumulated in place into one [V, H] buffer
    (the head's dtype; only when the head is trained), which backward hands to autograd. Rows
    neither kept nor distilled get a no-grad NLL pass when pass 1 did not run, so that `nll` is
    complete for logging. Besides the weight gradient, the peak holds one [chunk_size, V] fp32
    block of student logits (turned into its gradient in place), the teacher's logits for
    chunk_size / 8 rows and row-block temporaries: about 1.4 x chunk_size x V x 4 bytes (1.15 x
    without distillation). Softcapping is applied in fp32 after the matmul (HF applies it in the
    model's dtype).

    Only `total` (or a multiple: DDP's world_size, AMP scaling) may be backpropagated; backward
    raises if `mle` and `distill` get other relative weights.
    """

    def __init__(
        self,
        spec: ObjectiveSpec,
        student: Hidden,
        labels: torch.Tensor,
        teacher: Hidden | TeacherTopK | None,
        chunk_size: int,
    ) -> None:
        _check_inputs(student.states, labels, student.head, chunk_size)
        if teacher is not None and not isinstance(teacher, Hidden | TeacherTopK):
            raise ValueError(
                "the teacher of a student given as hidden states is its Hidden states and head "
                f"or a TeacherTopK, got {type(teacher).__name__}"
            )
        self.spec, self.chunk_size = spec, chunk_size
        self.hidden, self.head = student.states, student.head
        self.positions = label_positions(labels, self.head.weight.shape[0])
        live = isinstance(teacher, Hidden)
        self.teacher_hidden = teacher.states if live else None
        self.teacher_head = teacher.head if live else self.head
        self.cached = None if live else teacher
        self.nll: torch.Tensor | None = None  # the student's NLL [N], once pass 1 ran

    def flat_scores(self) -> torch.Tensor:
        """Pass 1: selection scores [N] (excess from a cache's NLL); keeps the student's NLL."""
        spec, pos = self.spec, self.positions
        select = "nll" if spec.select == "excess" and self.teacher_hidden is None else spec.select
        t_all = pos.predicting(self.teacher_hidden.detach()) if select == "excess" else None
        nll, scores = score_pass(
            pos.predicting(self.hidden.detach()),
            t_all,
            pos.targets,
            self.head,
            self.teacher_head,
            select,
            self.chunk_size,
        )
        if select != spec.select:  # excess from the cached teacher NLL
            scores = nll - self.cached.nll.to(nll)
        self.nll = nll
        return scores

    def terms(
        self,
        kept: torch.Tensor,
        distilled: torch.Tensor,
        mle_den: torch.Tensor,
        distill_den: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Pass 2: (mle, distill, nll [N]) as the logits path gives them; kept, distilled: bool
        [N]."""
        spec, pos, hidden, head = self.spec, self.positions, self.hidden, self.head
        # Pass 2 rows: distilled first (their teacher rows are then a prefix), then kept-only.
        d_rows = distilled.nonzero(as_tuple=True)[0]
        rows = torch.cat([d_rows, (kept & ~distilled).nonzero(as_tuple=True)[0]])
        dtype = compute_dtype(hidden)
        mle_w = kept[rows].to(dtype) / mle_den.to(dtype)
        dist_w = 1 / distill_den.to(dtype)
        cfg = FusedConstants(
            softcap=head.softcap,
            teacher_softcap=self.teacher_head.softcap,
            divergence=spec.divergence,
            jsd_beta=spec.jsd_beta,
            temperature=spec.temperature,
            distill_weight=spec.distill_weight,
            chunk=self.chunk_size,
        )
        t_rows = None
        if spec.distill_weight > 0 and self.cached is not None:
            t_rows = self.cached.rows(d_rows)
        elif spec.distill_weight > 0:
            t_rows = pos.predicting(self.teacher_hidden.detach(), d_rows)
        t_w = self.teacher_head.weight.detach()
        t_b = None if self.teacher_head.bias is None else self.teacher_head.bias.detach()
        args = (
            pos.predicting(hidden, rows),
            head.weight,
            head.bias,
            t_rows,
            t_w,
            t_b,
            pos.targets[rows],
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
            sums, nll_rows = FusedHeadLoss.apply(*args)
        else:
            sums, nll_rows, _ = fused_pass(*args, needs=(False, False, False))
        mle, distill = sums[0] + attached_zero(hidden), sums[1] + attached_zero(hidden)
        return mle, distill, self._complete_nll(rows, nll_rows, kept | distilled, dtype)

    def _complete_nll(
        self, rows: torch.Tensor, nll_rows: torch.Tensor, visited: torch.Tensor, dtype
    ) -> torch.Tensor:
        """The student's NLL [N]: pass 1's, or pass 2's rows and a no-grad pass over the rest."""
        if self.nll is not None:
            return self.nll
        pos = self.positions
        nll = torch.zeros(pos.targets.shape, dtype=dtype, device=pos.valid.device)
        nll[rows] = nll_rows
        rest = (~visited).nonzero(as_tuple=True)[0]
        if rest.numel():
            h_rest = pos.predicting(self.hidden.detach(), rest)
            nll[rest] = nll_pass(h_rest, pos.targets[rest], self.head, self.chunk_size)
        return nll


def _check_inputs(
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
