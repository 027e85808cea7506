"""objective.teacher=cached: the teacher's top-k from disk instead of a live frozen model.

Golden values come from a hand-written bucket KL in float64 (below), and from the live teacher
itself where the cache is exact (k covers the vocabulary).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import TINY, records, train

from uapt.data import collate
from uapt.objectives import (
    OutputHead,
    TeacherTopK,
    teacher_topk,
    token_loss,
    token_loss_chunked,
    valid_mask,
)
from uapt.teacher_cache import TeacherCache, weights_fingerprint

B, T, H, V = 3, 8, 5, 11


def _problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher_hidden = torch.randn(B, T, H, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :3] = -100
    labels[2, 6:] = -100
    return hidden, weight, teacher_hidden, labels


def _cache_of(teacher_logits: torch.Tensor, labels: torch.Tensor, k: int, tau: float):
    b, t = valid_mask(labels).nonzero(as_tuple=True)
    return teacher_topk(teacher_logits[b, t - 1], labels[b, t], k, tau)


def test_bucket_kl_matches_a_hand_computation():
    # one position, vocab 4, k = 2: buckets {2}, {0}, {1, 3}
    teacher = torch.tensor([[1.0, -0.5, 2.0, 0.1]], dtype=torch.float64)
    student = torch.tensor([[0.3, 0.2, -1.0, 0.9]], dtype=torch.float64)
    labels = torch.tensor([[-100, 3]])
    p = [math.exp(x) for x in teacher[0].tolist()]
    q = [math.exp(x) for x in student[0].tolist()]
    p = [x / sum(p) for x in p]
    q = [x / sum(q) for x in q]
    pb, qb = [p[2], p[0], p[1] + p[3]], [q[2], q[0], q[1] + q[3]]
    expected = sum(a * math.log(a / c) for a, c in zip(pb, qb, strict=True))
    # logits at position 0 predict the label at position 1 (position 1's logits are unused)
    teacher, student = (torch.stack([x, torch.zeros_like(x)], 1) for x in (teacher, student))
    cache = _cache_of(teacher, labels, k=2, tau=1.0)
    assert cache.ids.tolist() == [[2, 0]]
    obj = {"distill_weight": 1.0, "distill_on": "all"}
    out = token_loss(student, labels, obj, cached_teacher=cache)
    assert float(out.distill) == pytest.approx(expected, rel=1e-12)  # float64, a 3-term sum
    exact = token_loss(student, labels, obj, teacher_logits=teacher)
    assert float(out.distill) < float(exact.distill)  # a coarsening never adds divergence


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_full_vocabulary_cache_equals_the_live_teacher(divergence, tau):
    hidden, weight, teacher_hidden, labels = _problem()
    t_logits = teacher_hidden @ weight.detach().T
    obj = dict(mask_ratio=0.5, distill_weight=0.8, divergence=divergence, temperature=tau)
    for select in ("nll", "excess"):
        obj["select"] = select
        live = token_loss(hidden @ weight.T, labels, obj, teacher_logits=t_logits)
        cached = token_loss(
            hidden @ weight.T, labels, obj, cached_teacher=_cache_of(t_logits, labels, V, tau)
        )
        assert torch.equal(live.kept, cached.kept)
        # float64, the same distributions (k = V): equal to ~1e-15; 1e-12 / 1e-10 are slack
        assert float(cached.total.detach()) == pytest.approx(float(live.total.detach()), rel=1e-12)
        g_live = torch.autograd.grad(live.total, [hidden, weight])
        g_cached = torch.autograd.grad(cached.total, [hidden, weight])
        for a, b in zip(g_live, g_cached, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


_GRID = list(
    itertools.product(
        ["nll", "excess"],
        ["forward_kl", "reverse_kl", "jsd"],
        ["unselected", "all"],
        [(1.0, 3), (2.0, 4), (0.7, V)],  # (temperature, k)
    )
)


@pytest.mark.parametrize(("select", "divergence", "distill_on", "tau_k"), _GRID)
def test_chunked_path_equals_naive_path_with_a_cached_teacher(
    select, divergence, distill_on, tau_k
):
    tau, k = tau_k
    hidden, weight, teacher_hidden, labels = _problem(1)
    hidden32, weight32 = (x.detach().float().requires_grad_() for x in (hidden, weight))
    cache = _cache_of((teacher_hidden @ weight.detach().T).float(), labels, k, tau)
    obj = dict(
        mask_ratio=0.4,
        distill_weight=0.7,
        select=select,
        divergence=divergence,
        distill_on=distill_on,
        temperature=tau,
    )
    naive = token_loss(hidden32 @ weight32.T, labels, obj, cached_teacher=cache)
    g_naive = torch.autograd.grad(naive.total, [hidden32, weight32])
    chunked = token_loss_chunked(
        hidden32, labels, obj, OutputHead(weight32), cached_teacher=cache, chunk_size=4
    )
    g_chunked = torch.autograd.grad(chunked.total, [hidden32, weight32])
    assert torch.equal(naive.kept, chunked.kept)
    # fp32, sums over chunks in another order: ~1e-7 relative (see test_objectives_chunked)
    for a, b in [(naive.mle, chunked.mle), (naive.distill, chunked.distill)]:
        assert float(b.detach()) == pytest.approx(float(a.detach()), rel=1e-5, abs=1e-7)
    for a, b in zip(g_naive, g_chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def _bucket_loss_float64(logits: torch.Tensor, labels: torch.Tensor, cache: TeacherTopK):
    """mean NLL + mean bucket KL over the valid positions, in float64, each bucket's mass a plain
    sum of softmax probabilities (no log-sum-exp): the independent reference."""
    b, t = valid_mask(labels).nonzero(as_tuple=True)
    q = torch.softmax(logits[b, t - 1].double(), dim=-1)
    nll = -q.gather(1, labels[b, t].unsqueeze(1)).log().mean()
    q_top = q.gather(1, cache.ids)
    q_rest = q.scatter(1, cache.ids, 0.0).sum(-1)
    p_top, p_rest = cache.logp.double().exp(), cache.rest.double().exp()
    kl = (p_top * (p_top / q_top).log()).sum(-1) + p_rest * (p_rest / q_rest).log()
    return nll + kl.mean()


def test_a_confident_student_gets_the_exact_finite_gradient():
    """Where the teacher's top k hold all but ~1e-13 of the student's mass, 1 - sum(top k)
    rounds to 0 in fp32; the rest bucket must come from the other tokens' own probabilities.
    (Before: a nan gradient on the logits path, and an overflowing norm on the fused path: the
    SmolLM2 study's distillation steps were clipped to nothing.)"""
    k = 3
    labels = torch.tensor([[-100, 0, 1, 2]])
    teacher = torch.zeros(1, 4, V)
    teacher[..., :k] = torch.tensor([14.0, 13.0, 12.0])  # teacher's rest mass ~1e-5
    student = torch.zeros(1, 4, V)
    student[..., :k] = torch.tensor([31.0, 30.0, 29.5])  # student's rest mass ~1e-13
    student += 0.1 * torch.randn(1, 4, V, generator=torch.Generator().manual_seed(0))
    cache = _cache_of(teacher, labels, k, 1.0)
    assert 1 - float(torch.softmax(student[0, 0], -1)[:k].sum()) == 0.0  # the rounding above
    leaf = student.double().requires_grad_()
    expected = _bucket_loss_float64(leaf, labels, cache)
    (g_expected,) = torch.autograd.grad(expected, leaf)
    obj = {"distill_weight": 1.0, "distill_on": "all"}
    logits = student.clone().requires_grad_()
    naive = token_loss(logits, labels, obj, cached_teacher=cache)
    (g_naive,) = torch.autograd.grad(naive.total, logits)
    hidden = student.clone().requires_grad_()  # an identity head: logits = hidden
    chunked = token_loss_chunked(
        hidden, labels, obj, OutputHead(torch.eye(V)), cached_teacher=cache, chunk_size=2
    )
    (g_chunked,) = torch.autograd.grad(chunked.total, hidden)
    for out, grad in [(naive, g_naive), (chunked, g_chunked)]:
        # fp32 against float64: the loss to fp32's ~1e-7 relative; gradient entries run from
        # ~1e-13 (rest tokens) to ~1, so an absolute 1e-6 on top of 1e-5 relative
        assert float(out.total.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
        torch.testing.assert_close(grad.double(), g_expected, rtol=1e-5, atol=1e-6)


def test_cached_teacher_is_required_and_must_cover_the_valid_positions():
    hidden, weight, _, labels = _problem()
    obj = {"distill_weight": 1.0}
    with pytest.raises(ValueError, match="teacher_logits or cached_teacher"):
        token_loss(hidden @ weight.T, labels, obj)
    short = TeacherTopK(*(torch.zeros(2, *s) for s in [(1,), (1,), (), ()]))
    with pytest.raises(ValueError, match="cover the"):
        token_loss(hidden @ weight.T, labels, obj, cached_teacher=short)


# ----------------------------------------------------------------------------- the cache on disk
@pytest.fixture()
def tiny(tiny_model, tiny_tokenizer):
    return tiny_model.eval(), tiny_tokenizer


def _rows(tokenizer, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        ids = tokenizer(f"question {i} answer {i * 7} done")["input_ids"]
        labels = [-100] * 3 + ids[3:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def test_fill_then_lookup_returns_the_teacher_topk(tiny, tmp_path):
    model, tokenizer = tiny
    rows = _rows(tokenizer, 5)
    cache = TeacherCache(tmp_path, weights_fingerprint(model), k=7, temperature=2.0)
    cache.fill(model, rows, batch_size=2, pad_id=tokenizer.pad_token_id)
    assert (cache.computed, cache.reused) == (5, 0)
    batch = collate(rows[1:4], tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = _cache_of(logits, batch["labels"], 7, 2.0)
    got = cache.lookup(batch)
    assert torch.equal(got.ids, expected.ids)
    # the cache was filled in batches of 2, the reference in one: fp32 logits of the same rows
    # differ by matmul blocking (~1e-6), log-probs of size ~5 by as much
    for name in ("logp", "rest", "nll"):
        torch.testing.assert_close(
            getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-5
        )
    again = TeacherCache(tmp_path, weights_fingerprint(model), k=7, temperature=2.0)
    again.fill(model, rows, batch_size=2, pad_id=tokenizer.pad_token_id)
    assert (again.computed, again.reused) == (0, 5)
    assert not list(cache.folder.glob("*.tmp"))


def test_other_weights_get_another_cache_and_a_missing_row_is_named(tiny, tmp_path):
    model, tokenizer = tiny
    before = weights_fingerprint(model)
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-3
    try:
        assert weights_fingerprint(model) != before
    finally:
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] -= 1e-3
    cache = TeacherCache(tmp_path, before, k=4, temperature=1.0)
    with pytest.raises(KeyError, match="has no row"):
        cache.lookup(collate(_rows(tokenizer, 1), tokenizer.pad_token_id))


# ----------------------------------------------------------------------------- in the loop
@pytest.mark.slow
def test_a_grid_computes_the_teacher_once_and_matches_the_live_teacher(tmp_path):
    common = [*TINY, "trainer.max_steps=3", f"runs_dir={tmp_path / 'runs'}"]
    common += [f"cache_dir={tmp_path / 'cache'}", "objective=masked_mle_distill"]
    vocab_wide = "objective.teacher_topk=100000"  # more than the vocabulary: exact
    train(*common, "objective.teacher=live", check=True)
    train(*common, "objective.teacher=cached", vocab_wide, check=True)
    train(*common, "objective.teacher=cached", vocab_wide, "objective.mask_ratio=0.3", check=True)
    by_key = {
        (r["config"]["objective"]["teacher"], r["summary"]["mask_ratio"]): r
        for r in records(tmp_path / "runs")
    }
    live, first, second = by_key["live", 0.5], by_key["cached", 0.5], by_key["cached", 0.3]
    assert live["teacher_cache"] is None
    assert first["teacher_cache"]["rows_computed"] == 3 * 4 + 4  # 3 steps x 4 rows + the probe
    assert second["teacher_cache"]["rows_computed"] == 0  # same rows, same weights: all reused
    assert second["teacher_cache"]["rows_reused"] == 16
    # fp32 teacher log-probs computed in other batches: equal up to float noise (the distill
    # term is ~1e-3 here, a difference of nearly equal distributions, so compared absolutely)
    for key in ("train/loss", "val/loss"):
        assert first["metrics"][key] == pytest.approx(live["metrics"][key], rel=1e-5)
    # the full-logits path of the loop reads the same cache and computes the same loss
    naive_dir = tmp_path / "naive"
    naive = [a for a in common if not a.startswith("runs_dir=")]
    naive += [f"runs_dir={naive_dir}", "objective.teacher=cached", vocab_wide]
    train(*naive, "objective.chunk_size=0", check=True)
    (naive_record,) = records(naive_dir)
    assert naive_record["teacher_cache"]["rows_computed"] == 0
    assert naive_record["metrics"]["train/loss"] == pytest.approx(
        first["metrics"]["train/loss"], rel=1e-5
    )
    distill = first["metrics"]["train/loss/distill"]
    assert distill > 0
    assert distill == pytest.approx(live["metrics"]["train/loss/distill"], abs=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("objective.teacher=frozen", "objective.teacher='frozen' is not one of: live, cached"),
        ("objective.teacher_topk=0", "objective.teacher_topk=0 is not an integer >= 1"),
    ],
)
@pytest.mark.slow
def test_bad_teacher_options_are_named(tmp_path, override, message):
    proc = train(*TINY, override, f"runs_dir={tmp_path}")
    assert proc.returncode != 0
    assert message in " ".join((proc.stderr + proc.stdout).split())  # rich wraps long lines
    assert not list(tmp_path.glob("*/run.json"))
