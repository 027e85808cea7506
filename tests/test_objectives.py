"""The objective's exact semantics, pinned against a naive reference written from docs/objective.md.

The reference loops over sequences and positions with explicit softmax sums in float64; it
shares no code with uapt.objectives.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
import torch.nn.functional as F

from uapt.distributed import World
from uapt.loop import loss_metrics
from uapt.objectives import (
    Counts,
    OutputHead,
    keep_count,
    kept_overlap,
    select_kept,
    step_counts,
    token_loss,
    token_loss_chunked,
    token_scores,
    token_scores_chunked,
    valid_mask,
)
from uapt.sections.objective import needs_teacher, validate_objective

B, T, V = 3, 7, 6


# ------------------------------------------------------------------------------------------
# Naive reference (docs/objective.md, formula by formula)
# ------------------------------------------------------------------------------------------


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max())
    return e / e.sum()


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum(a[i] * torch.log(a[i] / b[i]) for i in range(len(a)))


def _div(p: torch.Tensor, q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * _kl(p, m) + (1 - beta) * _kl(q, m)


def _k(n: int, rho: float) -> int:
    return math.ceil(round((1 - rho) * n, 9))


def reference(logits, labels, obj, teacher=None, noise=None):
    """Returns (total, mle, distill, kept set of (b, t)). scope=batch ranks over groups of
    scope_size consecutive sequences (all of them when it is unset)."""
    rho, lam = obj.get("mask_ratio", 0.0), obj.get("distill_weight", 0.0)
    tau = obj.get("temperature", 1.0)
    cells = [
        (b, t)
        for b in range(labels.shape[0])
        for t in range(1, labels.shape[1])
        if labels[b, t] != -100
    ]
    nll, score = {}, {}
    for b, t in cells:
        p = _softmax(logits[b, t - 1])
        y = int(labels[b, t])
        nll[b, t] = -torch.log(p[y])
        select = obj.get("select", "nll")
        if select == "nll":
            score[b, t] = nll[b, t].item()
        elif select == "excess":
            score[b, t] = (nll[b, t] + torch.log(_softmax(teacher[b, t - 1])[y])).item()
        elif select == "entropy":
            score[b, t] = (-(p * torch.log(p)).sum()).item()
        else:
            score[b, t] = float(noise[b, t])
    sign = 1 if obj.get("invert", False) else -1
    size = 1 if obj.get("scope", "sequence") == "sequence" else obj.get("scope_size") or B
    groups = [[c for c in cells if c[0] // size == g] for g in range(labels.shape[0] // size)]
    kept = set()
    for group in groups:  # cells are in b-major position order; sorted() is stable
        ranked = sorted(group, key=lambda c: sign * score[c])
        kept |= set(ranked[: _k(len(group), rho)])
    zero = logits.sum() * 0
    den = len(kept) if obj.get("normalize", "kept") == "kept" else len(cells)
    mle = sum((nll[c] for c in kept), zero) / den if den else zero
    on = [c for c in cells if obj.get("distill_on", "unselected") == "all" or c not in kept]
    distill = zero
    if lam > 0 and on:
        terms = [
            tau**2
            * _div(
                _softmax(teacher[b, t - 1] / tau),
                _softmax(logits[b, t - 1] / tau),
                obj.get("divergence", "forward_kl"),
                obj.get("jsd_beta", 0.5),
            )
            for b, t in on
        ]
        distill = sum(terms, zero) / len(on)
    return mle + lam * distill, mle, distill, kept


def _data(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, T, V, generator=g, dtype=dtype) * 2
    teacher = logits.detach() + torch.randn(B, T, V, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100  # a prompt
    labels[1, 4] = -100  # a hole
    labels[2, 5:] = -100  # padding
    return logits, teacher, labels


def _kept_set(mask: torch.Tensor) -> set:
    return {tuple(map(int, c)) for c in mask.nonzero()}


# Variants of the other knobs, cycled over the full select x scope x divergence x distill_on grid.
_VARIANTS = [
    dict(mask_ratio=0.5, distill_weight=1.0, temperature=1.0, invert=False, normalize="kept"),
    dict(mask_ratio=0.3, distill_weight=0.7, temperature=2.0, invert=True, normalize="valid"),
    dict(
        mask_ratio=0.0,
        distill_weight=0.5,
        temperature=0.5,
        invert=False,
        normalize="kept",
        jsd_beta=0.3,
    ),
    dict(
        mask_ratio=0.8,
        distill_weight=2.0,
        temperature=1.5,
        invert=False,
        normalize="valid",
        jsd_beta=0.7,
    ),
]
_GRID = list(
    itertools.product(
        ["nll", "excess", "entropy", "random"],
        ["sequence", "batch", "batch-1"],
        ["forward_kl", "reverse_kl", "jsd"],
        ["unselected", "all"],
    )
)


@pytest.mark.parametrize(("select", "scope", "divergence", "distill_on"), _GRID)
def test_matches_reference(select, scope, divergence, distill_on):
    for i, variant in enumerate(_VARIANTS):
        obj = dict(
            variant, select=select, scope=scope, divergence=divergence, distill_on=distill_on
        )
        if scope == "batch-1":  # groups of one sequence: the same kept set as scope=sequence
            obj.update(scope="batch", scope_size=1)
        logits, teacher, labels = _data(seed=i)
        noise = torch.rand(
            labels.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float32
        )
        got_logits = logits.clone().requires_grad_(True)
        got = token_loss(
            got_logits, labels, obj, teacher, generator=torch.Generator().manual_seed(7)
        )
        ref_logits = logits.clone().requires_grad_(True)
        total, mle, distill, kept = reference(ref_logits, labels, obj, teacher, noise)
        assert _kept_set(got.kept) == kept, obj
        # float64 on both sides, but different formulas (log-softmax vs explicit sums of
        # exponentials): agreement to ~1e-14; 1e-6 keeps the check about semantics, not ulps.
        torch.testing.assert_close(got.mle.double(), mle, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got.distill.double(), distill, rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(got.total.double(), total, rtol=1e-6, atol=1e-9)
        got.total.backward()
        total.backward()
        torch.testing.assert_close(got_logits.grad, ref_logits.grad, rtol=1e-6, atol=1e-9)


def test_kept_count_is_ceil_of_one_minus_rho():
    labels = torch.randint(0, V, (1, 11))  # 10 valid positions (t >= 1)
    logits = torch.randn(1, 11, V)
    for rho, k in [(0.7, 3), (0.1, 9), (0.3, 7), (0.5, 5), (0.95, 1), (0.0, 10)]:
        got = token_loss(logits, labels, dict(mask_ratio=rho))
        assert int(got.kept.sum()) == k, rho


@pytest.mark.parametrize(
    ("n", "rho", "k"),
    [
        (10, 0.7, 3),
        (10, 0.1, 9),
        (10, 0.3, 7),
        (10, 0.9, 1),
        (3, 1 / 3, 2),
        (6, 2 / 3, 2),
        (1, 0.99, 1),
        (0, 0.5, 0),
        (7, 0.0, 7),
        (100, 0.29, 71),
        (1000, 0.001, 999),
    ],
)
def test_keep_count_rounding(n, rho, k):
    assert int(keep_count(torch.tensor([n]), rho)[0]) == k


def test_plain_mle_equals_cross_entropy():
    logits, _, labels = _data(3, torch.float32)
    got = token_loss(logits, labels, dict(mask_ratio=0.0, distill_weight=0.0))
    want = F.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(got.total, want)
    torch.testing.assert_close(got.mle, want)
    assert bool((got.kept == got.valid).all())


def test_masked_tokens_get_no_gradient():
    logits, _, labels = _data(4, torch.float32)
    logits.requires_grad_(True)
    got = token_loss(logits, labels, dict(mask_ratio=0.5, distill_weight=0.0))
    got.total.backward()
    masked = got.valid & ~got.kept
    assert bool(masked.any()) and bool(got.kept.any())
    b, t = masked.nonzero(as_tuple=True)
    assert bool((logits.grad[b, t - 1] == 0).all())
    b, t = got.kept.nonzero(as_tuple=True)
    assert bool((logits.grad[b, t - 1].abs().sum(-1) > 0).all())


def test_unselected_distill_with_rho_zero_is_zero():
    logits, teacher, labels = _data(5, torch.float32)
    got = token_loss(logits, labels, dict(mask_ratio=0.0, distill_weight=1.0), teacher)
    assert float(got.distill) == 0.0
    assert got.denominators.distilled == 0


def test_no_valid_labels():
    logits, teacher, labels = _data(6, torch.float32)
    logits.requires_grad_(True)
    labels[1] = -100
    obj = dict(mask_ratio=0.5, distill_weight=1.0, distill_on="all", scope="batch")
    got = token_loss(logits, labels, obj, teacher)
    assert not bool(got.kept[1].any()) and torch.isfinite(got.total)
    labels[:] = -100
    for normalize in ("kept", "valid"):
        got = token_loss(logits, labels, dict(obj, normalize=normalize), teacher)
        assert got.total.item() == 0.0 and got.mle.item() == 0.0 and got.distill.item() == 0.0
        got.total.backward()
        assert bool((logits.grad == 0).all())
        stats = loss_metrics([got], World())
        assert stats["kept_frac"] == 0 and math.isnan(stats["nll/kept"])


def test_ties_break_by_position():
    logits = torch.zeros(2, 5, V)  # uniform: every score ties
    labels = torch.zeros(2, 5, dtype=torch.long)
    seq = token_loss(logits, labels, dict(mask_ratio=0.5, scope="sequence"))
    assert seq.kept.tolist() == [[False, True, True, False, False]] * 2
    inv = token_loss(logits, labels, dict(mask_ratio=0.5, scope="sequence", invert=True))
    assert inv.kept.tolist() == seq.kept.tolist()
    bat = token_loss(logits, labels, dict(mask_ratio=0.5, scope="batch"))
    assert bat.kept.tolist() == [[False, True, True, True, True], [False] * 5]


def test_diagnostics_and_overlap():
    """The loop's step metrics: loss terms and token means over all of a step's parts."""
    logits, _, labels = _data(8, torch.float32)
    got = token_loss(logits, labels, dict(mask_ratio=0.5))
    stats = loss_metrics([got], World())
    n_valid = int(got.valid.sum())
    assert stats["loss"] == pytest.approx(float(got.total)) and stats["loss/distill"] == 0
    assert stats["kept_frac"] == pytest.approx(int(got.kept.sum()) / n_valid)
    kept_nll = [float(got.nll[b, t]) for b, t in got.kept.nonzero()]
    unkept = got.valid & ~got.kept
    unkept_nll = [float(got.nll[b, t]) for b, t in unkept.nonzero()]
    assert stats["nll/kept"] == pytest.approx(sum(kept_nll) / len(kept_nll))
    assert stats["nll/unkept"] == pytest.approx(sum(unkept_nll) / len(unkept_nll))
    assert stats["nll/kept"] > stats["nll/unkept"]  # select=nll keeps the hardest tokens
    a = torch.tensor([[True, True, False, False]])
    b = torch.tensor([[True, False, True, False]])
    assert kept_overlap(a, b) == pytest.approx(1 / 3)
    assert kept_overlap(a, a) == 1.0
    assert kept_overlap(a, ~a) == 0.0
    assert kept_overlap(a & False, a & False) is None
    with pytest.raises(ValueError, match="shapes differ"):
        kept_overlap(a, b[:, :2])


def test_teacher_required_only_when_needed():
    logits, _, labels = _data(9, torch.float32)
    assert not needs_teacher(dict(select="entropy", mask_ratio=0.5))
    assert needs_teacher(dict(select="excess"))
    assert needs_teacher(dict(distill_weight=0.1))
    token_loss(logits, labels, dict(select="entropy", mask_ratio=0.5))  # no teacher needed
    with pytest.raises(ValueError, match="teacher_logits or cached_teacher are required"):
        token_loss(logits, labels, dict(select="excess", mask_ratio=0.5))
    with pytest.raises(ValueError, match="teacher_logits or cached_teacher are required"):
        token_loss(logits, labels, dict(distill_weight=1.0))


def test_bad_labels_are_named():
    logits, _, labels = _data(10, torch.float32)
    labels[0, 3] = V
    with pytest.raises(ValueError, match=rf"labels hold {V}, outside \[0, {V}\)"):
        token_loss(logits, labels, {})


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("scope", "batchy", "objective.scope='batchy' is not one of: sequence, batch"),
        ("select", "loss", "objective.select='loss' is not one of: nll, excess, entropy, random"),
        ("normalize", "all", "objective.normalize='all' is not one of: kept, valid"),
        (
            "divergence",
            "kl",
            "objective.divergence='kl' is not one of: forward_kl, reverse_kl, jsd",
        ),
        ("distill_on", "kept", "objective.distill_on='kept' is not one of: unselected, all"),
        ("mask_ratio", 1.0, "objective.mask_ratio=1.0 is not a finite number in [0, 1)"),
        ("mask_ratio", -0.1, "objective.mask_ratio=-0.1 is not a finite number in [0, 1)"),
        ("mask_ratio", "0.5", "objective.mask_ratio='0.5' is not a finite number in [0, 1)"),
        ("distill_weight", -1, "objective.distill_weight=-1 is not a finite number >= 0"),
        ("temperature", 0, "objective.temperature=0 is not a finite number > 0"),
        ("jsd_beta", 1.0, "objective.jsd_beta=1.0 is not a finite number in (0, 1)"),
        ("jsd_beta", 0, "objective.jsd_beta=0 is not a finite number in (0, 1)"),
        ("invert", "yes", "objective.invert='yes' is not true or false"),
        ("chunk_size", -1, "objective.chunk_size=-1 is not an integer >= 0 (or null)"),
        ("chunk_size", 1.5, "objective.chunk_size=1.5 is not an integer >= 0 (or null)"),
        ("scope_size", 0, "objective.scope_size=0 is not an integer >= 1 (or null)"),
        ("scope_size", 4, "objective.scope_size=4 only applies to objective.scope=batch"),
        ("mask_ratio", True, "objective.mask_ratio=True is not a finite number"),
        ("colour", 1, "objective.colour is not a known option; known: name, mask_ratio"),
    ],
)
def test_validation_errors(key, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_objective({"name": "x", key: value})


def test_validation_accepts_the_config_tree():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "objective"
    base = OmegaConf.load(conf / "base.yaml")
    for path in sorted(set(conf.glob("*.yaml")) - {conf / "base.yaml"}):
        variant = OmegaConf.load(path)
        variant.pop("defaults", None)
        validate_objective(OmegaConf.merge(base, variant))


# ------------------------------------------------------------------------------------------
# A global batch in parts: what the training loop does with micro-batches and ranks
# ------------------------------------------------------------------------------------------

_SPLIT_OBJECTIVES = [
    dict(mask_ratio=0.5, scope="batch"),
    dict(mask_ratio=0.5, scope="batch", scope_size=2),
    dict(mask_ratio=0.4, scope="batch", select="excess", distill_weight=1.0, divergence="jsd"),
    dict(
        mask_ratio=0.3,
        scope="batch",
        invert=True,
        normalize="valid",
        distill_weight=0.5,
        distill_on="all",
    ),
    dict(mask_ratio=0.5, scope="sequence", distill_weight=1.0),
    dict(mask_ratio=0.6, scope="sequence", select="entropy", normalize="valid"),
    dict(mask_ratio=0.0, distill_weight=0.0),
]


def _split_data():
    """Hidden states and an output layer, so the chunked path can run on the same data."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(4, 9, 5, generator=g, dtype=torch.float64)
    t_hidden = hidden + torch.randn(4, 9, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(V, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (4, 9), generator=g)
    labels[0, :3] = -100
    labels[2:, 7:] = -100  # the second part needs only T = 7 columns
    labels[3, 1:4] = -100
    return hidden, t_hidden, weight, labels


_PARTS = [(slice(0, 2), slice(0, 9)), (slice(2, 4), slice(0, 7))]


@pytest.mark.parametrize("obj", _SPLIT_OBJECTIVES, ids=str)
def test_parts_with_global_counts_sum_to_the_whole(obj):
    """Two parts of a batch, each given the whole batch's counts (step_counts) and its slice of
    the whole batch's kept set: their losses sum to the whole's, gradients equal, on both paths."""
    hidden, t_hidden, weight, labels = _split_data()
    head = OutputHead(weight)
    h = hidden.clone().requires_grad_(True)
    logits = h @ weight.T
    logits.retain_grad()
    whole = token_loss(logits, labels, obj, t_hidden @ weight.T)
    whole.total.backward()
    counts = step_counts(valid_mask(labels), obj)
    assert counts == whole.denominators
    scores = token_scores(logits.detach(), labels, obj, t_hidden @ weight.T)
    kept = select_kept(scores, valid_mask(labels), obj)
    assert torch.equal(kept, whole.kept)
    chunked_scores = token_scores_chunked(hidden, labels, obj, head, t_hidden, chunk_size=3)
    torch.testing.assert_close(chunked_scores, scores)
    for path in ("full", "chunked"):  # float64: parts and whole agree to ~1e-15
        total = 0
        for rows, cols in _PARTS:
            hp = hidden[rows, cols].clone().requires_grad_(True)
            th, lab, kp = t_hidden[rows, cols], labels[rows, cols], kept[rows, cols]
            if path == "full":
                lg = (hidden[rows, cols] @ weight.T).requires_grad_(True)
                part = token_loss(lg, lab, obj, th @ weight.T, kept=kp, counts=counts)
                part.total.backward()
                torch.testing.assert_close(lg.grad, logits.grad[rows, cols], rtol=1e-9, atol=1e-12)
            else:
                part = token_loss_chunked(
                    hp, lab, obj, head, th, chunk_size=3, kept=kp, counts=counts
                )
                part.total.backward()
                torch.testing.assert_close(hp.grad, h.grad[rows, cols], rtol=1e-9, atol=1e-12)
            assert torch.equal(part.kept, kp) and part.denominators == counts
            total = total + part.total.detach()
        torch.testing.assert_close(total, whole.total.detach(), rtol=1e-9, atol=1e-12)


def test_step_counts_follow_from_labels_alone():
    """For every selection rule, the counts a selection produces equal step_counts' (which sees
    no score): ceil per sequence or per group, distilled = valid - kept or valid."""
    logits, teacher, labels = _data(12)
    for select, scope, size, rho, lam, on in itertools.product(
        ["nll", "entropy", "random"],
        ["sequence", "batch"],
        [None, 1, 3],
        [0.0, 0.3, 0.7],
        [0.0, 1.0],
        ["unselected", "all"],
    ):
        if size and scope == "sequence":
            continue
        obj = dict(select=select, scope=scope, scope_size=size, mask_ratio=rho)
        obj.update(distill_weight=lam, distill_on=on)
        got = token_loss(logits, labels, obj, teacher)
        want = Counts(int(got.kept.sum()), int(got.valid.sum()), int(got.distilled.sum()))
        assert step_counts(valid_mask(labels), obj) == want == got.denominators, obj


def test_a_kept_mask_handed_in_must_be_valid_positions():
    logits, _, labels = _data(13)
    valid = valid_mask(labels)
    with pytest.raises(ValueError, match="not valid label positions"):
        token_loss(logits, labels, dict(mask_ratio=0.5), kept=torch.ones_like(valid))
    with pytest.raises(ValueError, match="kept must be a bool mask"):
        token_loss(logits, labels, dict(mask_ratio=0.5), kept=valid[:, :2])
    # excess selection made elsewhere needs no teacher here
    got = token_loss(logits, labels, dict(mask_ratio=0.5, select="excess"), kept=valid)
    assert torch.equal(got.kept, valid)


def test_scope_size_must_divide_the_rows():
    logits, _, labels = _data(14)
    with pytest.raises(ValueError, match="scope_size=2 does not divide the 3 sequences"):
        token_loss(logits, labels, dict(mask_ratio=0.5, scope="batch", scope_size=2))
