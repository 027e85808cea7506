"""Objective: `objective.*` parsed once, applied to logits or to hidden states with their output
layer; the values come from test_objectives.py's hand-written reference."""

from __future__ import annotations

import pytest
import torch
from test_objectives import B, T, V, _kept_set, reference

from uapt.objectives import Hidden, Objective, OutputHead, teacher_topk, valid_mask
from uapt.schema import ConfigError

H = 5


def _inputs(seed: int):
    """fp64 hidden states and heads of student and teacher, and labels with a prompt, a hole
    and padding (as test_objectives' data)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    teacher_hidden = hidden + 0.3 * torch.randn(B, T, H, generator=g, dtype=torch.float64)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64)
    teacher_weight = weight + 0.2 * torch.randn(V, H, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[1, 4] = -100
    labels[2, 5:] = -100
    return hidden, teacher_hidden, OutputHead(weight), OutputHead(teacher_weight), labels


@pytest.mark.parametrize(
    "knobs",
    [
        dict(select="nll", mask_ratio=0.5, distill_weight=0.7, divergence="reverse_kl"),
        dict(select="excess", mask_ratio=0.4, distill_weight=1.0, scope="batch"),
        dict(select="entropy", mask_ratio=0.3, distill_weight=0.0, normalize="valid"),
    ],
)
def test_logits_and_hidden_states_give_the_reference_objective(knobs):
    """One parsed Objective serves both forms of the same inputs (full logits and the chunked
    path, here 2 tokens a chunk) and many calls."""
    hidden, teacher_hidden, head, teacher_head, labels = _inputs(seed=1)
    objective = Objective(knobs, chunk_size=2)
    logits = head.logits(hidden)
    teacher_logits = teacher_head.logits(teacher_hidden)
    total, mle, distill, kept = reference(logits, labels, knobs, teacher_logits)
    on_logits = objective.loss(logits, labels, teacher_logits)
    on_hidden = objective.loss(Hidden(hidden, head), labels, Hidden(teacher_hidden, teacher_head))
    for got in (on_logits, on_hidden):
        assert _kept_set(got.kept) == kept
        # fp64 on both sides, different formulas and summation orders: ~1e-14 apart; 1e-9
        # checks the semantics, not rounding
        torch.testing.assert_close(got.total, total, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.mle, mle, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(got.distill, distill, rtol=1e-9, atol=1e-12)
    scores = objective.scores(Hidden(hidden, head), labels, Hidden(teacher_hidden, teacher_head))
    assert scores.shape == labels.shape and not scores.requires_grad
    assert torch.all(scores[~valid_mask(labels)] == 0)


def test_the_chunk_size_comes_from_the_call_then_the_config_then_the_default():
    full_logits = Objective({"chunk_size": 0})  # the loop hands it logits
    assert not full_logits.chunked and full_logits.chunk_size == 1024  # for hidden states given
    assert Objective({"chunk_size": 64}).chunk_size == 64 and Objective({"chunk_size": 64}).chunked
    assert Objective({"chunk_size": 64}, chunk_size=8).chunk_size == 8
    hidden, _, head, _, labels = _inputs(seed=2)
    with pytest.raises(ValueError, match="chunk_size=0 must be an int >= 1"):
        Objective({}, chunk_size=0).loss(Hidden(hidden, head), labels)


def test_a_bad_config_is_refused_once_when_parsed():
    with pytest.raises(ConfigError, match=r"objective\.mask_ratio=1\.5"):
        Objective({"mask_ratio": 1.5})
    spec = Objective({"mask_ratio": 0.5}).spec
    assert Objective(spec).spec is spec  # a checked spec is taken as it is


@pytest.mark.parametrize(
    ("knobs", "loss_selecting", "loss_given_kept", "scores"),
    [
        (dict(), False, False, False),
        (dict(mask_ratio=0.5, select="nll"), False, False, False),
        (dict(mask_ratio=0.5, select="excess"), True, False, True),
        (dict(mask_ratio=0.0, select="excess"), False, False, True),
        (dict(distill_weight=0.5), True, True, False),
        (dict(mask_ratio=0.5, select="excess", distill_weight=0.5), True, True, True),
    ],
)
def test_when_the_teacher_is_read(knobs, loss_selecting, loss_given_kept, scores):
    """The teacher runs for distillation, and for selection by excess loss only where this call
    selects (a kept mask handed in was selected elsewhere); scores read it for excess alone."""
    objective = Objective(knobs)
    assert objective.reads_teacher(selects=True) is loss_selecting
    assert objective.reads_teacher(selects=False) is loss_given_kept
    assert objective.reads_teacher(scoring=True) is scores


def test_the_teacher_must_fit_the_students_form():
    hidden, teacher_hidden, head, teacher_head, labels = _inputs(seed=3)
    objective = Objective({"distill_weight": 1.0})
    logits, teacher_logits = head.logits(hidden), teacher_head.logits(teacher_hidden)
    with pytest.raises(ValueError, match=r"given as logits .* got Hidden"):
        objective.loss(logits, labels, Hidden(teacher_hidden, teacher_head))
    with pytest.raises(ValueError, match=r"given as hidden states .* got Tensor"):
        objective.loss(Hidden(hidden, head), labels, teacher_logits)
    with pytest.raises(ValueError, match="teacher_hidden or cached_teacher are required"):
        objective.loss(Hidden(hidden, head), labels)
    valid = valid_mask(labels)
    b, t = valid.nonzero(as_tuple=True)
    short = teacher_topk(teacher_logits[b, t - 1][:-1], labels[b, t][:-1], 4)
    with pytest.raises(ValueError, match=f"cover the {len(b)} valid positions, got {len(b) - 1}"):
        objective.loss(logits, labels, short)
