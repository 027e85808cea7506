"""The token-level objective on tensors. The semantics: docs/objective.md.

Read top-down:

- `objective.*`, validated into an ObjectiveSpec, is a config section: uapt.sections.objective;
- `positions`: the valid label positions, the rows predicting them, the compute precision;
- `selection`: the kept set (scores ranked per sequence or group, K = ceil((1 - rho) n)) and a
  global batch's token counts;
- `divergences`: teacher vs student, exact or over a cached teacher's top-k buckets;
- `head`: the output layer as the chunked path applies it, and `Hidden` states with it;
- `loss`: the reference path, on full logits: simple and exact;
- `fused`, `chunked`: the same from hidden states and the output layer, chunk by chunk, never
  holding [batch, time, vocab] logits;
- `objective`: `Objective`, the objective parsed once, whose `loss` and `scores` take either
  path's inputs; `token_loss` and its siblings, the same as functions on tensors.

Conventions (transformers causal LMs): `logits[:, t]` predicts `labels[:, t + 1]`; label -100
is ignored. Per-token tensors are aligned with `labels`; a position is valid when its label is
not -100 and t >= 1. Nothing here communicates across processes: a global batch split into
micro-batches or ranks passes its counts (`step_counts`) and, for a selection across parts, its
kept mask to every part (uapt.batches).
"""

from uapt.objectives.divergences import TeacherTopK, cached_buckets, divergence_rows, teacher_topk
from uapt.objectives.head import Hidden, OutputHead, output_head
from uapt.objectives.objective import (
    Objective,
    TokenLoss,
    token_loss,
    token_loss_chunked,
    token_scores,
    token_scores_chunked,
)
from uapt.objectives.positions import IGNORE_INDEX, valid_mask
from uapt.objectives.selection import (
    Counts,
    keep_count,
    kept_overlap,
    select_kept,
    step_counts,
)

__all__ = [
    "IGNORE_INDEX",
    "Counts",
    "Hidden",
    "Objective",
    "OutputHead",
    "TeacherTopK",
    "TokenLoss",
    "cached_buckets",
    "divergence_rows",
    "keep_count",
    "kept_overlap",
    "output_head",
    "select_kept",
    "step_counts",
    "teacher_topk",
    "token_loss",
    "token_loss_chunked",
    "token_scores",
    "token_scores_chunked",
    "valid_mask",
]
