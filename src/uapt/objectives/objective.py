"""The objective parsed once: `Objective(spec)`, whose `loss` and `scores` take full logits or hidden states with their output layer (the chunked path); and the functions on tensors that call it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from uapt.objectives.chunked import HiddenPath
from uapt.objectives.divergences import TeacherTopK
from uapt.objectives.head import Hidden, OutputHead
from uapt.objectives.loss import LogitsPath
from uapt.objectives.selection import (
    Counts,
    checked_kept,
    denominators,
    distill_mask,
    select_kept,
    selection_scores,
)
from uapt.sections.objective import ObjectiveSpec, parse_objective

# Tokens per chunk of the chunked path when neither the call nor objective.chunk_size sets one.
DEFAULT_CHUNK_SIZE = 1024

Student = torch.Tensor | Hidden  # logits [B, T, V], or hidden states with their output layer
Teacher = torch.Tensor | Hidden | TeacherTopK | None  # the same for the teacher, or its cache


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


class Objective:
    """`objective.*` checked once (an ObjectiveSpec), applied to a model's outputs.

    The student is its logits [B, T, V] (the reference path) or `Hidden` states with their output
    layer (the chunked path: never [B, T, V] logits, `chunk_size` tokens at a time: the call's,
    else objective.chunk_size, else DEFAULT_CHUNK_SIZE). The teacher (read for distillation and
    select=excess) is given the same way, detached, or as its cached top-k at the valid positions
    (`TeacherTopK`). Conventions: uapt.objectives.
    """

    def __init__(
        self, objective: Mapping[str, Any] | ObjectiveSpec, chunk_size: int | None = None
    ) -> None:
        self.spec = parse_objective(objective)
        self.chunk_size = (
            (self.spec.chunk_size or DEFAULT_CHUNK_SIZE) if chunk_size is None else chunk_size
        )

    def __repr__(self) -> str:
        return f"Objective({self.spec!r}, chunk_size={self.chunk_size})"

    @property
    def chunked(self) -> bool:
        """Whether a model should hand over hidden states rather than logits
        (objective.chunk_size > 0)."""
        return bool(self.spec.chunk_size)

    def reads_teacher(self, *, scoring: bool = False, selects: bool = True) -> bool:
        """Whether a call reads the teacher: `scores` for select=excess; `loss` for
        distillation, and for selection by excess loss when it selects (no kept mask given)."""
        spec = self.spec
        excess = spec.select == "excess"
        if scoring:
            return excess
        return spec.distill_weight > 0 or (selects and spec.mask_ratio > 0 and excess)

    @torch.no_grad()
    def scores(
        self,
        student: Student,
        labels: torch.Tensor,
        teacher: Teacher = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The selection scores s_t [B, T] (0 at invalid positions) that `loss` ranks: for a
        selection over more rows than one call holds (the loop's scoring pass). `generator`
        feeds select=random (B*T uniforms drawn per call)."""
        path = self._path(student, labels, teacher, self.reads_teacher(scoring=True))
        flat = None if self.spec.select == "random" else path.flat_scores()
        return selection_scores(self.spec, labels, path.positions.valid, flat, generator)

    def loss(
        self,
        student: Student,
        labels: torch.Tensor,
        teacher: Teacher = None,
        generator: torch.Generator | None = None,
        *,
        kept: torch.Tensor | None = None,
        counts: Counts | None = None,
    ) -> TokenLoss:
        """The objective on one call's rows (computed in fp32, fp64 for fp64 inputs).

        `generator` feeds select=random; `kept`: a kept mask selected over more rows than this
        call holds (no selection here); `counts`: the global batch's denominators (default: this
        call's own).
        """
        spec = self.spec
        path = self._path(student, labels, teacher, self.reads_teacher(selects=kept is None))
        pos = path.positions
        if kept is not None:
            kept = checked_kept(kept, pos.valid)
        elif spec.mask_ratio == 0:
            kept = pos.valid.clone()
        else:
            flat = None if spec.select == "random" else path.flat_scores()
            scores = selection_scores(spec, labels, pos.valid, flat, generator)
            kept = select_kept(scores, pos.valid, spec)
        distilled = distill_mask(spec, pos.valid, kept)
        den = denominators(counts, kept, pos.valid, spec)
        mle_den = _count(den.kept if spec.normalize == "kept" else den.valid, labels.device)
        distill_den = _count(den.distilled, labels.device)
        mle, distill, nll = path.terms(
            kept[pos.b, pos.t], distilled[pos.b, pos.t], mle_den, distill_den
        )
        total = mle + spec.distill_weight * distill
        return TokenLoss(total, mle, distill, kept, pos.valid, distilled, pos.grid(nll), den)

    def _path(
        self, student: Student, labels: torch.Tensor, teacher: Teacher, reads: bool
    ) -> LogitsPath | HiddenPath:
        """The call's path, with the teacher when the call reads it (checked to be there)."""
        chunked = isinstance(student, Hidden)
        teacher = teacher if reads else None
        if reads and teacher is None:
            raise ValueError(
                f"{'teacher_hidden' if chunked else 'teacher_logits'} or cached_teacher are "
                f"required: objective has distill_weight={self.spec.distill_weight}, "
                f"select={self.spec.select!r}"
            )
        if chunked:
            path = HiddenPath(self.spec, student, labels, teacher, self.chunk_size)
        else:
            path = LogitsPath(self.spec, student, labels, teacher)
        if isinstance(teacher, TeacherTopK) and teacher.nll.shape[0] != path.positions.count:
            raise ValueError(
                f"cached_teacher must cover the {path.positions.count} valid positions, "
                f"got {teacher.nll.shape[0]}"
            )
        return path


def _count(n: int, device: torch.device) -> torch.Tensor:
    """A denominator as an int64 tensor, at least 1 (an empty set's sum is 0 anyway)."""
    return torch.tensor(max(n, 1), dtype=torch.int64, device=device)


# ----------------------------------------------------------------------------- on tensors
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
    """The objective on full logits [B, T, V]: `Objective(objective).loss(logits, ...)`.

    The teacher (needed when distill_weight > 0 or select=excess) is ``teacher_logits``
    [B, T, V] (detached, exact) or ``cached_teacher`` (its top-k at the valid positions, see
    ``TeacherTopK``). ``generator``, ``kept`` and ``counts``: see ``Objective.loss``.
    """
    teacher = teacher_logits if teacher_logits is not None else cached_teacher
    return Objective(objective).loss(logits, labels, teacher, generator, kept=kept, counts=counts)


def token_scores(
    logits: torch.Tensor,
    labels: torch.Tensor,
    objective: Mapping[str, Any] | ObjectiveSpec,
    teacher_logits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    cached_teacher: TeacherTopK | None = None,
) -> torch.Tensor:
    """The selection scores [B, T] that ``token_loss`` ranks: `Objective.scores` on logits."""
    teacher = teacher_logits if teacher_logits is not None else cached_teacher
    return Objective(objective).scores(logits, labels, teacher, generator)


def token_loss_chunked(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    objective: Mapping[str, Any] | ObjectiveSpec,
    head: OutputHead,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: OutputHead | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    cached_teacher: TeacherTopK | None = None,
    kept: torch.Tensor | None = None,
    counts: Counts | None = None,
) -> TokenLoss:
    """``token_loss(head.logits(hidden), ...)`` without ever holding [B, T, V] logits
    (uapt.objectives.chunked.HiddenPath says how, and what it holds at its peak).

    hidden [B, T, H]: the student's final (normed) hidden states, grad-carrying; teacher_hidden
    the teacher's (detached); teacher_head defaults to head; or, instead of both, the teacher's
    cached top-k at the valid positions (``cached_teacher``). Only ``total`` (or a multiple) may
    be backpropagated.
    """
    teacher = _hidden_teacher(head, teacher_hidden, teacher_head, cached_teacher)
    return Objective(objective, chunk_size).loss(
        Hidden(hidden, head), labels, teacher, generator, kept=kept, counts=counts
    )


def token_scores_chunked(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    objective: Mapping[str, Any] | ObjectiveSpec,
    head: OutputHead,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: OutputHead | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    *,
    cached_teacher: TeacherTopK | None = None,
) -> torch.Tensor:
    """``token_scores(head.logits(hidden), ...)`` chunk by chunk (never [B, T, V] logits)."""
    teacher = _hidden_teacher(head, teacher_hidden, teacher_head, cached_teacher)
    return Objective(objective, chunk_size).scores(Hidden(hidden, head), labels, teacher, generator)


def _hidden_teacher(
    head: OutputHead,
    teacher_hidden: torch.Tensor | None,
    teacher_head: OutputHead | None,
    cached_teacher: TeacherTopK | None,
) -> Hidden | TeacherTopK | None:
    if teacher_hidden is None:
        return cached_teacher
    return Hidden(teacher_hidden, teacher_head or head)
