"""The objective's exact semantics, pinned against a naive reference written from DESIGN.md.

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

from uapt.objectives import (
    OutputHead,
    keep_count,
    kept_overlap,
    loss_diagnostics,
    needs_teacher,
    token_loss,
    token_loss_chunked,
    validate_objective,
)

B, T, V = 3, 7, 6


# ------------------------------------------------------------------------------------------
# Naive reference (DESIGN.md "The objective", formula by formula)
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
    """Returns (total, mle, distill, kept set of (b, t))."""
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
    groups = (
        [[c for c in cells if c[0] == b] for b in range(labels.shape[0])]
        if obj.get("scope", "sequence") == "sequence"
        else [cells]
    )
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
        ["sequence", "batch"],
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
    assert int(got.n_distilled) == 0


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
        stats = loss_diagnostics(got)
        assert stats["kept_frac"] is None and stats["nll_kept"] is None


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
    logits, _, labels = _data(8, torch.float32)
    got = token_loss(logits, labels, dict(mask_ratio=0.5))
    stats = loss_diagnostics(got)
    n_valid = int(got.valid.sum())
    assert stats["kept_frac"] == pytest.approx(int(got.kept.sum()) / n_valid)
    kept_nll = [float(got.nll[b, t]) for b, t in got.kept.nonzero()]
    unkept = got.valid & ~got.kept
    unkept_nll = [float(got.nll[b, t]) for b, t in unkept.nonzero()]
    assert stats["nll_kept"] == pytest.approx(sum(kept_nll) / len(kept_nll))
    assert stats["nll_unkept"] == pytest.approx(sum(unkept_nll) / len(unkept_nll))
    assert stats["nll_kept"] > stats["nll_unkept"]  # select=nll keeps the hardest tokens
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
        ("mask_ratio", 1.0, "objective.mask_ratio=1.0 must be a number in [0, 1)"),
        ("mask_ratio", -0.1, "objective.mask_ratio=-0.1 must be a number in [0, 1)"),
        ("mask_ratio", "0.5", "objective.mask_ratio='0.5' must be a number in [0, 1)"),
        ("distill_weight", -1, "objective.distill_weight=-1 must be a number >= 0"),
        ("temperature", 0, "objective.temperature=0 must be a number > 0"),
        ("jsd_beta", 1.0, "objective.jsd_beta=1.0 must be a number in (0, 1)"),
        ("jsd_beta", 0, "objective.jsd_beta=0 must be a number in (0, 1)"),
        ("invert", "yes", "objective.invert='yes' must be a bool"),
        ("chunk_size", -1, "objective.chunk_size=-1 must be an int >= 0 or null"),
        ("chunk_size", 1.5, "objective.chunk_size=1.5 must be an int >= 0 or null"),
        ("mask_ratio", True, "objective.mask_ratio=True must be a number"),
        ("colour", 1, "objective has unknown key(s) colour"),
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
    for path in sorted(conf.glob("*.yaml")):
        variant = OmegaConf.load(path)
        variant.pop("defaults", None)
        validate_objective(OmegaConf.merge(base, variant))


# ------------------------------------------------------------------------------------------
# Data parallel: 2 gloo ranks with 2 + 2 sequences == 1 process with the 4 sequences
# ------------------------------------------------------------------------------------------

_DDP_OBJECTIVES = [
    dict(mask_ratio=0.5, scope="batch"),
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
]


def _ddp_data():
    """Hidden states and an output layer, so the chunked path can run on the same data."""
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(4, 9, 5, generator=g, dtype=torch.float64)
    t_hidden = hidden + torch.randn(4, 9, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(V, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (4, 9), generator=g)
    labels[0, :3] = -100
    labels[2:, 7:] = -100  # rank 1 holds only T = 7 columns: padding across ranks
    labels[3, 1:4] = -100
    return hidden, t_hidden, weight, labels


def _ddp_rank_slice(rank: int) -> tuple[slice, slice]:
    return (slice(0, 2), slice(0, 9)) if rank == 0 else (slice(2, 4), slice(0, 7))


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        hidden, t_hidden, weight, labels = _ddp_data()
        rows, cols = _ddp_rank_slice(rank)
        h, th, lab = hidden[rows, cols], t_hidden[rows, cols], labels[rows, cols]
        head = OutputHead(weight)
        results = []
        for obj in _DDP_OBJECTIVES:
            lg = (h @ weight.T).requires_grad_(True)
            got = token_loss(lg, lab, obj, th @ weight.T)
            got.total.backward()
            hc = h.clone().requires_grad_(True)
            chunked = token_loss_chunked(hc, lab, obj, head, th, chunk_size=3)
            chunked.total.backward()
            results.append(
                {
                    "total": got.total.detach(),
                    "kept": got.kept,
                    "grad": lg.grad,
                    "chunked_total": chunked.total.detach(),
                    "chunked_kept": chunked.kept,
                    "chunked_grad": hc.grad,
                }
            )
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_data_parallel_matches_single_process(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    hidden, t_hidden, weight, labels = _ddp_data()
    for i, obj in enumerate(_DDP_OBJECTIVES):
        h = hidden.clone().requires_grad_(True)
        lg = h @ weight.T
        lg.retain_grad()
        single = token_loss(lg, labels, obj, t_hidden @ weight.T)
        single.total.backward()
        for key in ("total", "chunked_total"):
            summed = ranks[0][i][key] + ranks[1][i][key]
            torch.testing.assert_close(summed, single.total.detach(), rtol=1e-9, atol=1e-12)
        for r in range(2):
            rows, cols = _ddp_rank_slice(r)
            assert torch.equal(ranks[r][i]["kept"], single.kept[rows, cols]), (obj, r)
            assert torch.equal(ranks[r][i]["chunked_kept"], single.kept[rows, cols]), (obj, r)
            torch.testing.assert_close(ranks[r][i]["grad"], lg.grad[rows, cols])
            torch.testing.assert_close(ranks[r][i]["chunked_grad"], h.grad[rows, cols])
