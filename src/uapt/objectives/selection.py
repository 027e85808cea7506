"""Which tokens the MLE term keeps: scores ranked per sequence or per group, K = ceil((1 - rho) n), and the token counts of a global batch (docs/objective.md, "Selection" and "The global batch")."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from uapt.sections.objective import ObjectiveSpec, parse_objective

# rho is read as the nearest fraction with a denominator up to this, so that K is exact integer
# math: (1 - 0.7) * 10 is 3, not ceil(3.0000000000000004) = 4.
_RHO_MAX_DENOMINATOR = 1_000_000


def keep_count(n: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """K = ceil((1 - rho) n) in exact integer math (rho read as a fraction, denominator <= 1e6)."""
    rho = Fraction(mask_ratio).limit_denominator(_RHO_MAX_DENOMINATOR)
    num, den = rho.denominator - rho.numerator, rho.denominator
    n = n.to(torch.int64)
    return (n * num + den - 1) // den


def _topk_rows(
    scores: torch.Tensor, valid: torch.Tensor, k: torch.Tensor, invert: bool
) -> torch.Tensor:
    """Per row, mark the k highest (invert: lowest) scores among valid entries.

    Order: valid entries first, then by score, then by position (two stable sorts).
    NaN scores rank last in both directions.
    """
    if scores.shape[1] == 0:
        return valid.clone()
    key = scores if invert else -scores
    order = torch.sort(key, dim=1, stable=True).indices
    invalid_sorted = (~valid).gather(1, order).to(torch.uint8)
    order = order.gather(1, torch.sort(invalid_sorted, dim=1, stable=True).indices)
    rank = torch.empty_like(order)
    positions = torch.arange(order.shape[1], device=order.device).expand_as(order)
    rank.scatter_(1, order, positions)
    return (rank < k.unsqueeze(1)) & valid


def _group_rows(spec: ObjectiveSpec, rows: int) -> int:
    """Rows per selection group: 1 (scope=sequence), scope_size, or all rows given."""
    if spec.scope == "sequence":
        return 1
    size = spec.scope_size or rows
    if rows % size:
        raise ValueError(
            f"objective.scope_size={size} does not divide the {rows} sequences selected over"
        )
    return size


def select_kept(
    scores: torch.Tensor, valid: torch.Tensor, objective: Mapping[str, Any] | ObjectiveSpec
) -> torch.Tensor:
    """The kept mask M (bool [B, T]) from detached scores [B, T] and the valid mask [B, T].

    scope=sequence: top-K per row, K = ceil((1 - rho) * valid count of the row).
    scope=batch: top-K over the b-major flatten of each group of ``scope_size`` consecutive rows
    (all B rows when it is null), K from the group's valid count.
    """
    spec = parse_objective(objective)
    if spec.mask_ratio == 0:
        return valid.clone()
    b, t = scores.shape
    size = _group_rows(spec, b)
    flat_s = scores.detach().reshape(b // size, size * t)
    flat_v = valid.reshape(b // size, size * t)
    k = keep_count(flat_v.sum(1), spec.mask_ratio)
    return _topk_rows(flat_s, flat_v, k, spec.invert).reshape(b, t)


@dataclass(frozen=True)
class Counts:
    """Token counts of a global batch: the denominators of its token means."""

    kept: int
    valid: int
    distilled: int


def step_counts(valid: torch.Tensor, objective: Mapping[str, Any] | ObjectiveSpec) -> Counts:
    """The kept, valid and distilled counts of a global batch from its valid mask [B, T] alone.

    K depends only on each selection group's valid count and rho, and the distilled set is the
    valid minus the kept (distill_on=unselected) or all valid tokens, so no score is needed.
    """
    spec = parse_objective(objective)
    n_valid = int(valid.sum())
    n_kept = n_valid
    if spec.mask_ratio > 0:
        size = _group_rows(spec, valid.shape[0])
        per_group = valid.reshape(valid.shape[0] // size, -1).sum(1)
        n_kept = int(keep_count(per_group, spec.mask_ratio).sum())
    n_distilled = 0
    if spec.distill_weight > 0:
        n_distilled = n_valid if spec.distill_on == "all" else n_valid - n_kept
    return Counts(kept=n_kept, valid=n_valid, distilled=n_distilled)


def _random_scores(labels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform noise [B, T] drawn from ``generator`` (on its device), identical on both paths."""
    device = generator.device if generator is not None else labels.device
    noise = torch.rand(labels.shape, generator=generator, device=device)
    return noise.to(labels.device)


def selection_scores(
    spec: ObjectiveSpec,
    labels: torch.Tensor,
    valid: torch.Tensor,
    flat_scores: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Selection scores [B, T] from the scores at the valid positions [N] (0 elsewhere), or
    uniform noise for select=random."""
    if spec.select == "random":
        return _random_scores(labels, generator)
    dtype = flat_scores.dtype if flat_scores is not None else torch.float32
    scores = torch.zeros(labels.shape, dtype=dtype, device=labels.device)
    if flat_scores is not None:
        scores[valid] = flat_scores.detach()
    return scores


def distill_mask(spec: ObjectiveSpec, valid: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """The distilled tokens [B, T]: none (lambda = 0), the valid ones not kept, or all valid."""
    if spec.distill_weight == 0:
        return torch.zeros_like(valid)
    return valid & ~kept if spec.distill_on == "unselected" else valid.clone()


def denominators(
    counts: Counts | None, kept: torch.Tensor, valid: torch.Tensor, spec: ObjectiveSpec
) -> Counts:
    """The global batch's counts, or this call's own when it is the whole global batch."""
    if counts is not None:
        return counts
    distilled = distill_mask(spec, valid, kept)
    return Counts(int(kept.sum()), int(valid.sum()), int(distilled.sum()))


def checked_kept(kept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """A kept mask selected elsewhere, checked against this call's valid mask, on its device."""
    if kept.shape != valid.shape or kept.dtype != torch.bool:
        raise ValueError(
            f"kept must be a bool mask {tuple(valid.shape)}, got {kept.dtype} {tuple(kept.shape)}"
        )
    kept = kept.to(valid.device)
    if bool((kept & ~valid).any()):
        raise ValueError("kept marks positions that are not valid label positions")
    return kept


def kept_overlap(prev_kept: torch.Tensor, kept: torch.Tensor) -> float | None:
    """Jaccard overlap |prev & kept| / |prev | kept| of two kept masks over the SAME positions.

    Both masks must come from the same token positions (e.g. the loop re-scores one fixed probe
    batch every step): 1.0 means the same tokens were kept, 0.0 disjoint; None when both are empty.
    """
    if prev_kept.shape != kept.shape:
        raise ValueError(
            f"kept_overlap: shapes differ: {tuple(prev_kept.shape)} vs {tuple(kept.shape)}"
        )
    prev, cur = prev_kept.bool(), kept.bool().to(prev_kept.device)
    union = int((prev | cur).sum())
    return int((prev & cur).sum()) / union if union else None
