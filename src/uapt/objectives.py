"""The token-level objective as pure functions on tensors (semantics: docs/objective.md).

Conventions (transformers causal LMs): ``logits[:, t]`` predicts ``labels[:, t + 1]``; label
-100 is ignored. Every per-token tensor returned here is aligned with ``labels``: a label
position ``t`` is *valid* when ``labels[:, t] != -100`` and ``t >= 1`` (position 0 has no
predicting logit). Per sequence, V is the set of valid positions and l_t the student NLL.

- Selection: score s_t (detached) is the student NLL (``nll``), NLL minus the teacher's
  (``excess``), the student entropy (``entropy``) or uniform noise (``random``). The
  K = ceil((1 - rho) |V|) highest scores are kept (``invert``: the lowest), per sequence or per
  group of ``scope_size`` consecutive sequences (``scope=batch``; default: all the rows given).
  Ties break by position (b-major flatten order): earlier wins.
- L_mle = sum_kept l_t / (kept count | valid count); L_sd = sum over distilled positions of
  tau^2 div(P, Q) / distilled count, P / Q the teacher / student softmax at temperature tau over
  the full vocabulary; total = L_mle + lambda L_sd.

Global batch: every count above is the optimizer step's, over all its micro-batches and ranks.
The counts follow from the labels and rho alone (``step_counts``), so the training loop computes
them before the forward pass and hands them in as ``counts``; each micro-batch then returns its
SHARE ``local_sum / global_count``, and the shares of a step sum to its loss. A selection that
spans micro-batches or ranks is made by the loop (uapt.batches) and handed in as ``kept``.
Without them, a call is its own global batch. Nothing here communicates across processes.

Two paths compute the same thing: ``token_loss`` on full logits (simple, the reference) and
``token_loss_chunked`` on final hidden states + the output layer, which never holds
[batch, time, vocab] logits (vocabularies reach 256k).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100

SELECTS = ("nll", "excess", "entropy", "random")
SCOPES = ("sequence", "batch")
NORMALIZES = ("kept", "valid")
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
DISTILL_ONS = ("unselected", "all")
TEACHERS = ("live", "cached")

# Values used for keys missing from the mapping (the same as conf/objective/base.yaml).
DEFAULTS: dict[str, Any] = {
    "mask_ratio": 0.0,
    "distill_weight": 0.0,
    "select": "nll",
    "invert": False,
    "scope": "sequence",
    "scope_size": None,
    "normalize": "kept",
    "divergence": "forward_kl",
    "jsd_beta": 0.5,
    "temperature": 1.0,
    "distill_on": "unselected",
    "chunk_size": 1024,
}
# Keys accepted but not interpreted here (the training loop reads them; uapt.config checks them).
PASSTHROUGH_KEYS = ("name", "teacher", "teacher_topk")

# rho is read as the nearest fraction with a denominator up to this, so that K is exact integer
# math: (1 - 0.7) * 10 is 3, not ceil(3.0000000000000004) = 4.
_RHO_MAX_DENOMINATOR = 1_000_000


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectiveSpec:
    """A validated objective configuration (see ``validate_objective``)."""

    mask_ratio: float
    distill_weight: float
    select: str
    invert: bool
    scope: str
    scope_size: int | None
    normalize: str
    divergence: str
    jsd_beta: float
    temperature: float
    distill_on: str
    chunk_size: int | None

    @property
    def needs_teacher(self) -> bool:
        return self.distill_weight > 0 or self.select == "excess"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_choice(key: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"objective.{key}={value!r} is not one of: {', '.join(allowed)}")


def _check_number(key: str, value: Any, ok: bool, rule: str) -> None:
    if not _is_number(value) or not math.isfinite(value) or not ok:
        raise ValueError(f"objective.{key}={value!r} must be a number {rule}")


def parse_objective(objective: Mapping[str, Any] | ObjectiveSpec) -> ObjectiveSpec:
    """Validate ``objective`` (a dict or DictConfig) and return it as an ``ObjectiveSpec``.

    Keys missing from the mapping take the values of ``DEFAULTS`` (conf/objective/base.yaml).
    """
    if isinstance(objective, ObjectiveSpec):
        return objective
    if not isinstance(objective, Mapping):
        raise ValueError(f"objective must be a mapping, got {type(objective).__name__}")
    unknown = sorted(str(k) for k in objective if k not in DEFAULTS and k not in PASSTHROUGH_KEYS)
    if unknown:
        allowed = ", ".join([*DEFAULTS, *PASSTHROUGH_KEYS])
        raise ValueError(f"objective has unknown key(s) {', '.join(unknown)}; allowed: {allowed}")
    _check_choice("teacher", objective.get("teacher", "live"), TEACHERS)
    topk = objective.get("teacher_topk", 64)
    if not isinstance(topk, int) or isinstance(topk, bool) or topk < 1:
        raise ValueError(f"objective.teacher_topk={topk!r} must be an int >= 1")
    v = {k: objective.get(k, default) for k, default in DEFAULTS.items()}
    rho, lam = v["mask_ratio"], v["distill_weight"]
    _check_number("mask_ratio", rho, _is_number(rho) and 0 <= rho < 1, "in [0, 1)")
    _check_number("distill_weight", lam, _is_number(lam) and lam >= 0, ">= 0")
    tau, beta = v["temperature"], v["jsd_beta"]
    _check_number("temperature", tau, _is_number(tau) and tau > 0, "> 0")
    _check_number("jsd_beta", beta, _is_number(beta) and 0 < beta < 1, "in (0, 1)")
    _check_choice("select", v["select"], SELECTS)
    _check_choice("scope", v["scope"], SCOPES)
    _check_choice("normalize", v["normalize"], NORMALIZES)
    _check_choice("divergence", v["divergence"], DIVERGENCES)
    _check_choice("distill_on", v["distill_on"], DISTILL_ONS)
    if not isinstance(v["invert"], bool):
        raise ValueError(f"objective.invert={v['invert']!r} must be a bool (true or false)")
    size = v["scope_size"]
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
        raise ValueError(f"objective.scope_size={size!r} must be an int >= 1 or null")
    if size is not None and v["scope"] != "batch":
        raise ValueError(
            f"objective.scope_size={size} only applies to objective.scope=batch "
            f"(scope is {v['scope']!r}); set it to null"
        )
    chunk = v["chunk_size"]
    if chunk is not None and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
        raise ValueError(f"objective.chunk_size={chunk!r} must be an int >= 0 or null")
    return ObjectiveSpec(
        mask_ratio=float(rho),
        distill_weight=float(lam),
        select=str(v["select"]),
        invert=bool(v["invert"]),
        scope=str(v["scope"]),
        scope_size=size,
        normalize=str(v["normalize"]),
        divergence=str(v["divergence"]),
        jsd_beta=float(beta),
        temperature=float(tau),
        distill_on=str(v["distill_on"]),
        chunk_size=chunk,
    )


def validate_objective(objective: Mapping[str, Any]) -> None:
    """Raise ValueError naming the key and its allowed values when ``objective`` is invalid."""
    parse_objective(objective)


def needs_teacher(objective: Mapping[str, Any] | ObjectiveSpec) -> bool:
    """True when the objective needs teacher logits: distill_weight > 0 or select == excess."""
    return parse_objective(objective).needs_teacher


# --------------------------------------------------------------------------------------------
# Selection (shared by both paths so they agree exactly)
# --------------------------------------------------------------------------------------------


def keep_count(n: torch.Tensor, mask_ratio: float) -> torch.Tensor:
    """K = ceil((1 - rho) n) in exact integer math (rho read as a fraction, denominator <= 1e6)."""
    rho = Fraction(mask_ratio).limit_denominator(_RHO_MAX_DENOMINATOR)
    num, den = rho.denominator - rho.numerator, rho.denominator
    n = n.to(torch.int64)
    return (n * num + den - 1) // den


def valid_mask(labels: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: label positions with a target (not -100) and a predicting logit (t >= 1)."""
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False
    return valid


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


def _denominators(counts: Counts | None, kept: torch.Tensor, valid: torch.Tensor, spec) -> Counts:
    """The global batch's counts, or this call's own when it is the whole global batch."""
    if counts is not None:
        return counts
    distilled = _distill_mask(spec, valid, kept)
    return Counts(int(kept.sum()), int(valid.sum()), int(distilled.sum()))


# --------------------------------------------------------------------------------------------
# Divergences on [N, V] log-probabilities
# --------------------------------------------------------------------------------------------


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


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler 2012)."""
    x = x.clamp(max=0)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def teacher_topk(
    logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float = 1.0
) -> TeacherTopK:
    """What a cache keeps of teacher logits [N, V] predicting targets [N] (computed in fp32)."""
    z = _fp32(logits)
    log_p = _log_softmax(z, temperature)
    k = min(k, z.shape[-1])
    logp, ids = log_p.topk(k, dim=-1)
    rest = log_p.scatter(1, ids, float("-inf")).logsumexp(-1)
    nll = -torch.log_softmax(z, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    return TeacherTopK(ids, logp, rest, nll)


def cached_buckets(log_q: torch.Tensor, cached: TeacherTopK) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student log-probabilities [N, k + 1] over the buckets of ``cached``.

    log_q [N, V]: the student's log-probabilities at the cache's temperature. The buckets are the
    teacher's k tokens, then everything else; with k = V there is no rest bucket. The student's
    rest is floored at the dtype's tiny: a student with all its mass on the k tokens gets a large
    finite divergence, not inf.
    """
    top = log_q.gather(1, cached.ids)
    log_p = cached.logp.to(log_q)
    if cached.ids.shape[1] >= log_q.shape[1]:
        return log_p, top
    rest = _log1mexp(top.logsumexp(-1)).clamp(min=math.log(torch.finfo(log_q.dtype).tiny))
    log_p = torch.cat([log_p, cached.rest.to(log_q).unsqueeze(1)], dim=1)
    return log_p, torch.cat([top, rest.unsqueeze(1)], dim=1)


# --------------------------------------------------------------------------------------------
# Result and diagnostics
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Naive path: full logits
# --------------------------------------------------------------------------------------------


def _check_labels(labels: torch.Tensor, targets: torch.Tensor, vocab: int) -> None:
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    if targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"labels hold {bad}, outside [0, {vocab}) and not {IGNORE_INDEX}")


def _fp32(x: torch.Tensor) -> torch.Tensor:
    """x in float32, or float64 when it already is (tests pin values in float64)."""
    return x if x.dtype == torch.float64 else x.float()


def _zero(x: torch.Tensor) -> torch.Tensor:
    """A zero attached to x's graph (no full reduction, no NaN from x's values)."""
    return _fp32(x[..., :0].sum())


def _scores_from(
    spec: ObjectiveSpec,
    labels: torch.Tensor,
    valid: torch.Tensor,
    flat_scores: torch.Tensor | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Selection scores [B, T] (fp32, 0 at invalid positions)."""
    if spec.select == "random":
        return _random_scores(labels, generator)
    dtype = flat_scores.dtype if flat_scores is not None else torch.float32
    scores = torch.zeros(labels.shape, dtype=dtype, device=labels.device)
    if flat_scores is not None:
        scores[valid] = flat_scores.detach()
    return scores


def _distill_mask(spec: ObjectiveSpec, valid: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    if spec.distill_weight == 0:
        return torch.zeros_like(valid)
    return valid & ~kept if spec.distill_on == "unselected" else valid.clone()


def _check_logits(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"logits must be [B, T, V] matching labels [B, T]: got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )


def _check_kept(kept: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    if kept.shape != valid.shape or kept.dtype != torch.bool:
        raise ValueError(
            f"kept must be a bool mask {tuple(valid.shape)}, got {kept.dtype} {tuple(kept.shape)}"
        )
    kept = kept.to(valid.device)
    if bool((kept & ~valid).any()):
        raise ValueError("kept marks positions that are not valid label positions")
    return kept


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


# --------------------------------------------------------------------------------------------
# Chunked path: hidden states + output layer, never [B, T, V] logits
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OutputHead:
    """The output layer: logits = softcap * tanh((h @ weight.T + bias) / softcap).

    softcap is Gemma-2's final-logit softcapping (None: no capping); it is applied on every path.
    """

    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None = None  # [V]
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits [..., V] in fp32 (fp64 for fp64 inputs): the naive path's input."""
        return _head_logits(hidden, self.weight, self.bias, self.softcap, inplace=False)


def output_head(model: torch.nn.Module) -> OutputHead:
    """The OutputHead of a transformers causal LM (a peft model is unwrapped to its base)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = base.get_output_embeddings()
    if type(layer) is not torch.nn.Linear:
        raise ValueError(
            f"output_head: the output layer is a {type(layer).__name__}, not a plain Linear "
            "(an adapter on lm_head cannot be folded into the chunked loss)"
        )
    config = base.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(text_config, "final_logit_softcapping", None)
    return OutputHead(layer.weight, layer.bias, float(softcap) if softcap else None)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _head_logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    *,
    inplace: bool = True,
) -> torch.Tensor:
    """Logits in the compute dtype: the matmul runs in the weight's dtype (as the model's would)."""
    z = F.linear(h.to(weight.dtype), weight, bias)
    z = z.to(_compute_dtype(h))
    if softcap:
        z = z.div_(softcap).tanh_().mul_(softcap) if inplace else torch.tanh(z / softcap) * softcap
    return z


def _n_rows(t: torch.Tensor | TeacherTopK) -> int:
    return t.nll.shape[0] if isinstance(t, TeacherTopK) else t.shape[0]


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) without an [N, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


@dataclass(frozen=True)
class _Fused:
    """Constants of one fused pass."""

    softcap: float | None
    teacher_softcap: float | None
    divergence: str
    jsd_beta: float
    temperature: float
    distill_weight: float
    chunk: int


# Elementwise work on a chunk's [rows, V] logits runs over blocks of chunk / _BLOCKS_PER_CHUNK
# rows, and the teacher's logits are made chunk / _TEACHER_SPLIT rows at a time, so that
# besides the chunk's student logits only fractions of [chunk, V] are alive (tests change them).
_BLOCKS_PER_CHUNK = 8
_TEACHER_SPLIT = 8


def _ceil_div(a: int, b: int) -> int:
    return max(1, -(-a // b))


def _spans(n_rows: int, step: int) -> list[tuple[int, int]]:
    return [(r0, min(n_rows, r0 + step)) for r0 in range(0, n_rows, step)]


def _log_softmax(x: torch.Tensor, tau: float) -> torch.Tensor:
    return torch.log_softmax(x / tau if tau != 1 else x, dim=-1)


def _divergence_and_grad(
    z: torch.Tensor, t: torch.Tensor, cfg: _Fused
) -> tuple[torch.Tensor, torch.Tensor]:
    """div(P, Q) per row and its gradient w.r.t. the student's tempered logits u = z / tau.

    z, t: student and teacher logits (read only). Closed forms (Q = softmax u): forward KL:
    Q - P; reverse KL: Q (log Q - log P - KL(Q||P)); jsd: (1 - beta) Q (log Q - log M - KL(Q||M)).
    """
    tau, low = cfg.temperature, torch.finfo(z.dtype).min
    log_p, log_q = _log_softmax(t, tau), _log_softmax(z, tau)
    if cfg.divergence == "forward_kl":
        p = log_p.exp()
        d = _rowdot(p, log_p.sub_(log_q).clamp_(min=low))  # clamp: 0 * log 0 counts 0
        return d, log_q.exp_().sub_(p)
    if cfg.divergence == "reverse_kl":
        diff = log_p.sub_(log_q).neg_()  # log Q - log P
        q = log_q.exp_()
        d = _rowdot(q, diff)
        return d, q.mul_(diff.sub_(d.unsqueeze(1)))
    beta = cfg.jsd_beta
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
    p = log_p.exp()
    kl_pm = _rowdot(p, log_p.sub_(log_m).clamp_(min=low))
    del p, log_p
    q = log_q.exp()
    diff = log_q.sub_(log_m)  # log Q - log M
    kl_qm = _rowdot(q, diff)
    d = beta * kl_pm + (1 - beta) * kl_qm
    return d, diff.sub_(kl_qm.unsqueeze(1)).mul_(q).mul_(1 - beta)


def _cached_divergence_and_grad(
    z: torch.Tensor, cached: TeacherTopK, cfg: _Fused
) -> tuple[torch.Tensor, torch.Tensor]:
    """div over the buckets of ``cached`` per row and its gradient w.r.t. u = z / tau.

    With g = d div / d log Q~ (autograd on the small [rows, k + 1] tensors) and S = sum_b g_b:
    d div / du_j = g_j - Q_j S for a top-k token j, Q_j (g_rest / Q~_rest - S) for any other.
    """
    log_q = _log_softmax(z, cfg.temperature)
    log_pb, log_qb = cached_buckets(log_q, cached)
    with torch.enable_grad():
        leaf = log_qb.detach().requires_grad_()
        d = divergence_rows(log_pb, leaf, cfg.divergence, cfg.jsd_beta)
        (g,) = torch.autograd.grad(d.sum(), leaf)
    total = g.sum(1, keepdim=True)
    q = log_q.exp_()
    q_top = q.gather(1, cached.ids)
    k = cached.ids.shape[1]
    if k < q.shape[1]:  # the rest bucket's share, then the top-k entries overwritten
        q.mul_(g[:, k:] / log_qb[:, k:].exp() - total)
    return d.detach(), q.scatter_(1, cached.ids, g[:, :k] - q_top * total)


def _chunk_terms(
    z: torch.Tensor,
    targets: torch.Tensor,
    mle_w: torch.Tensor,
    t: torch.Tensor | TeacherTopK | None,
    dist_w: torch.Tensor,
    cfg: _Fused,
    need_grad: bool,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a chunk: (nll per row, weighted MLE sum, distill sum).

    z [rows, V]: the student's (softcapped) logits; when need_grad it is overwritten in place by
    d(mle + lambda * distill)/d(pre-softcap logits). mle_w: per-row MLE weight (kept /
    denominator). The first len(t) rows are distilled against teacher logits t (or a cached
    TeacherTopK), weighted by dist_w (= 1 / distilled denominator). Elementwise work runs over
    blocks of rows.
    """
    cached = isinstance(t, TeacherTopK)
    n_d = 0 if t is None else _n_rows(t)
    tau, cap = cfg.temperature, cfg.softcap
    # Forward KL at tau = 1 (the default) shares the student's softmax Q with the MLE term: the
    # rows' gradient is Q (w + c) - c P - w onehot, and P lives in z's rows (spent by then).
    share = cfg.divergence == "forward_kl" and tau == 1 and not cached
    low = torch.finfo(z.dtype).min
    coef_d = tau * cfg.distill_weight * dist_w  # d(tau^2 div)/dz = tau d div/du
    nll = z.new_empty(z.shape[0])
    dist_sum = z.new_zeros(())
    for r0, r1 in _spans(z.shape[0], block):
        zb, y, w = z[r0:r1], targets[r0:r1].unsqueeze(1), mle_w[r0:r1].unsqueeze(1)
        log_q = torch.log_softmax(zb, dim=-1)
        nll[r0:r1] = -log_q.gather(1, y).squeeze(1)
        k = max(0, min(r1, n_d) - r0)  # distilled rows in this block
        # z = c tanh(a / c): dz/da = 1 - (z / c)^2, taken before zb is reused.
        dcap = zb.div(cap).square_().neg_().add_(1) if cap and need_grad else None
        extra = None
        if k and share:
            log_p = torch.log_softmax(t[r0 : r0 + k], dim=-1)
            p = torch.exp(log_p, out=zb[:k])  # zb's logits are spent: reuse them for P
            dist_sum += _rowdot(p, log_p.sub_(log_q[:k]).clamp_(min=low)).sum()
            del log_p
        elif k and cached:
            d, extra = _cached_divergence_and_grad(zb[:k], t.rows(slice(r0, r0 + k)), cfg)
            dist_sum += tau * tau * d.sum()
            extra.mul_(coef_d)
        elif k:
            d, extra = _divergence_and_grad(zb[:k], t[r0 : r0 + k], cfg)
            dist_sum += tau * tau * d.sum()
            extra.mul_(coef_d)
        if not need_grad:
            continue
        if k and share:  # rows [:k]: Q (w + c) - c P; rows [k:]: Q w
            zb[:k].mul_(-coef_d).add_(log_q[:k].exp_().mul_(w[:k] + coef_d))
            torch.exp(log_q[k:], out=zb[k:]).mul_(w[k:])
        else:
            torch.exp(log_q, out=zb).mul_(w)
        del log_q
        zb.scatter_add_(1, y, -w)  # - w onehot
        if extra is not None:
            zb[:k] += extra
        if dcap is not None:
            zb.mul_(dcap)
    return nll, (nll * mle_w).sum(), dist_sum * dist_w


def _fused_pass(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    t_h: torch.Tensor | TeacherTopK | None,
    t_weight: torch.Tensor | None,
    t_bias: torch.Tensor | None,
    targets: torch.Tensor,
    mle_w: torch.Tensor,
    dist_w: torch.Tensor,
    cfg: _Fused,
    needs: tuple[bool, bool, bool],
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """Chunk by chunk: loss sums, per-row nll and the gradients of mle + lambda * distill.

    Returns ([mle, distill] in the compute dtype, nll [R], (grad_h, grad_weight, grad_bias)).
    The weight gradient is accumulated in place in one [V, H] buffer of the weight's dtype.
    Live per chunk: the student logits (turned into their gradient in place), the teacher's
    logits for distilled rows, and row-block temporaries. t_h: the distilled rows' teacher hidden
    states, or their cached TeacherTopK.
    """
    dtype = _compute_dtype(h)
    need_h, need_w, need_b = needs
    n_rows, n_d = h.shape[0], 0 if t_h is None else _n_rows(t_h)
    grad_h = torch.zeros(h.shape, dtype=dtype, device=h.device) if need_h else None
    grad_w = torch.zeros_like(weight) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=dtype, device=h.device) if need_b else None
    sums = torch.zeros(2, dtype=dtype, device=h.device)
    nll = torch.empty(n_rows, dtype=dtype, device=h.device)
    block = _ceil_div(cfg.chunk, _BLOCKS_PER_CHUNK)
    split = _ceil_div(cfg.chunk, _TEACHER_SPLIT)
    for r0, r1 in _spans(n_rows, cfg.chunk):
        h_c = h[r0:r1].to(weight.dtype)
        z = _head_logits(h_c, weight, bias, cfg.softcap)
        for s0, s1 in _spans(r1 - r0, split):
            a, b = r0 + s0, r0 + s1
            t = None
            if a < n_d and isinstance(t_h, TeacherTopK):
                t = t_h.rows(slice(a, min(b, n_d)))
            elif a < n_d:
                t = _head_logits(t_h[a : min(b, n_d)], t_weight, t_bias, cfg.teacher_softcap)
            nll[a:b], mle_sum, dist_sum = _chunk_terms(
                z[s0:s1], targets[a:b], mle_w[a:b], t, dist_w, cfg, any(needs), block
            )
            del t
            sums[0] += mle_sum
            sums[1] += dist_sum
        if any(needs):
            g = z.to(weight.dtype)  # z now holds the gradient w.r.t. the pre-softcap logits
            z = None
            if need_h:
                grad_h[r0:r1] = (g @ weight).to(dtype)
            if need_w:
                grad_w.addmm_(g.t(), h_c)
            if need_b:
                grad_b += g.sum(0, dtype=dtype)
        # g may be z itself: drop both before the next chunk's logits are allocated.
        z = g = None
    return sums, nll, (grad_h, grad_w, grad_b)


class _FusedHeadLoss(torch.autograd.Function):
    """[mle, distill] of rows of hidden states, gradients computed in forward (Liger-style).

    Backward only scales the stored gradients of mle + lambda * distill; it refuses an upstream
    gradient that is not of that form (e.g. mle alone backpropagated while distill is non-zero).
    """

    @staticmethod
    def forward(ctx, h, weight, bias, t_h, t_weight, t_bias, targets, mle_w, dist_w, cfg):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2])
        sums, nll, grads = _fused_pass(
            h, weight, bias, t_h, t_weight, t_bias, targets, mle_w, dist_w, cfg, needs
        )
        ctx.save_for_backward(*grads)
        ctx.h_dtype = h.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.check = cfg.distill_weight > 0 and t_h is not None and _n_rows(t_h) > 0
        ctx.distill_weight = cfg.distill_weight
        ctx.mark_non_differentiable(nll)
        return sums, nll

    @staticmethod
    def backward(ctx, grad_sums, _grad_nll):
        g_mle, g_dist = grad_sums[0], grad_sums[1]
        if ctx.check and not torch.isclose(g_dist, g_mle * ctx.distill_weight, rtol=1e-5):
            raise RuntimeError(
                "token_loss_chunked: only total = mle + distill_weight * distill (or a multiple) "
                "can be backpropagated through the chunked path"
            )
        grad_h, grad_w, grad_b = ctx.saved_tensors
        if grad_h is not None:
            grad_h = (grad_h * g_mle).to(ctx.h_dtype)
        if grad_w is not None:
            grad_w = grad_w.mul_(g_mle)  # in place: no second [V, H] buffer
        if grad_b is not None:
            grad_b = (grad_b * g_mle).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None


def _score_pass(
    h: torch.Tensor,
    t_h: torch.Tensor | None,
    targets: torch.Tensor,
    head: OutputHead,
    teacher_head: OutputHead,
    select: str,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 (no grad): student nll [N] and selection scores [N], chunk by chunk."""
    dtype = _compute_dtype(h)
    nll = torch.empty(h.shape[0], dtype=dtype, device=h.device)
    scores = torch.empty_like(nll)
    block, split = _ceil_div(chunk, _BLOCKS_PER_CHUNK), _ceil_div(chunk, _TEACHER_SPLIT)
    if select == "excess":
        # The student's logits at the teacher's granularity: the same matmul shapes make equal
        # weights give bitwise-equal logits, so the excess is exactly 0 while the student is
        # still the initial model (ties, broken by position) instead of rounding noise.
        chunk = split
    with torch.no_grad():
        for c0, c1 in _spans(h.shape[0], chunk):
            z = _head_logits(h[c0:c1], head.weight, head.bias, head.softcap)
            for s0, s1 in _spans(c1 - c0, split):
                t = None
                if select == "excess":
                    t = _head_logits(
                        t_h[c0 + s0 : c0 + s1],
                        teacher_head.weight,
                        teacher_head.bias,
                        teacher_head.softcap,
                    )
                for r0, r1 in _spans(s1 - s0, block):
                    a, b = c0 + s0 + r0, c0 + s0 + r1
                    y = targets[a:b].unsqueeze(1)
                    log_q = torch.log_softmax(z[s0 + r0 : s0 + r1], dim=-1)
                    nll[a:b] = -log_q.gather(1, y).squeeze(1)
                    if select == "entropy":
                        scores[a:b] = -_rowdot(log_q.exp(), log_q)
                    elif select == "excess":
                        log_p = torch.log_softmax(t[r0:r1], dim=-1)
                        scores[a:b] = nll[a:b] + log_p.gather(1, y).squeeze(1)
                    else:
                        scores[a:b] = nll[a:b]
                t = None  # freed before the next teacher block is made
            z = None  # freed before the next chunk's logits are made
    return nll, scores


def _nll_pass(h: torch.Tensor, targets: torch.Tensor, head: OutputHead, chunk: int) -> torch.Tensor:
    """Student nll [N] only (no grad), for rows pass 2 does not visit."""
    nll, _ = _score_pass(h, None, targets, head, head, "nll", chunk)
    return nll


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


def _check_cached(cached: TeacherTopK | None, n_valid: int) -> None:
    if cached is None or cached.nll.shape[0] != n_valid:
        got = None if cached is None else cached.nll.shape[0]
        raise ValueError(f"cached_teacher must cover the {n_valid} valid positions, got {got}")


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
