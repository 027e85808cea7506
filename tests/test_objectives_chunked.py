"""The chunked path (hidden states + output layer) equals the naive path on full logits.

The naive path (token_loss on head.logits(hidden)) is pinned against a hand-written reference
in test_objectives.py; here every value and gradient (hidden, head weight, head bias) of the
chunked path must match it to 1e-5 relative in fp32.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from uapt.objectives import OutputHead, output_head, token_loss, token_loss_chunked

B, T, H, V = 3, 9, 6, 13

_GRID = list(
    itertools.product(
        ["nll", "excess", "entropy", "random"],
        ["sequence", "batch"],
        ["forward_kl", "reverse_kl", "jsd"],
        ["unselected", "all"],
    )
)
# (objective knobs, head softcap, teacher softcap, bias, separate teacher head, chunk size)
_VARIANTS = [
    (dict(mask_ratio=0.4, distill_weight=0.7, temperature=1.0), None, None, True, False, 4),
    (
        dict(mask_ratio=0.6, distill_weight=1.3, temperature=2.0, invert=True),
        3.0,
        3.0,
        False,
        False,
        5,
    ),
    (
        dict(mask_ratio=0.0, distill_weight=0.5, temperature=0.7, normalize="valid"),
        5.0,
        2.0,
        True,
        True,
        64,
    ),
    (
        dict(mask_ratio=0.3, distill_weight=0.0, normalize="valid", jsd_beta=0.2),
        None,
        None,
        True,
        True,
        1,
    ),
]


def _setup(seed: int, bias: bool, separate_teacher: bool, softcap, t_softcap):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    teacher_hidden = hidden + 0.5 * torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g)
    b = torch.randn(V, generator=g) if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100
    labels[1, 5] = -100
    labels[2, 6:] = -100
    if separate_teacher:
        t_weight = weight + 0.3 * torch.randn(V, H, generator=g)
        t_bias = None if b is None else b + 0.1
    else:
        t_weight, t_bias = weight, b
    teacher_head = OutputHead(t_weight, t_bias, t_softcap)
    return hidden, teacher_hidden, weight, b, labels, teacher_head, softcap


def _close(got: torch.Tensor, want: torch.Tensor, what: str, rtol: float = 1e-5) -> None:
    """max |got - want| <= rtol * max |want| (+ a floor for all-zero tensors).

    Both paths compute in fp32 with sums over V and over chunks in different orders: the
    error is a few ulps of the largest entry (~1e-7 relative); 1e-5 leaves 100x room while a
    wrong term (a missing row, a wrong weight) moves entries by O(1) of the scale."""
    err = (got.double() - want.double()).abs().max().item() if want.numel() else 0.0
    scale = want.double().abs().max().item() if want.numel() else 0.0
    assert err <= rtol * scale + 1e-9, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def _both(obj, hidden, teacher_hidden, weight, bias, labels, teacher_head, softcap, chunk):
    params = [p for p in (weight, bias) if p is not None]
    leaves = [hidden.clone().requires_grad_(True)] + [
        p.clone().requires_grad_(True) for p in params
    ]
    head = OutputHead(leaves[1], leaves[2] if bias is not None else None, softcap)
    t_logits = teacher_head.logits(teacher_hidden)
    naive = token_loss(
        head.logits(leaves[0]), labels, obj, t_logits, torch.Generator().manual_seed(3)
    )
    naive_grads = torch.autograd.grad(naive.total, leaves)
    chunked = token_loss_chunked(
        leaves[0],
        labels,
        obj,
        head,
        teacher_hidden,
        teacher_head,
        torch.Generator().manual_seed(3),
        chunk_size=chunk,
    )
    chunked_grads = torch.autograd.grad(chunked.total, leaves)
    return naive, naive_grads, chunked, chunked_grads


# (elementwise row blocks, teacher matmuls) per chunk, for the chunk sizes 4, 5, 64, 1 above.
_SPLITS = [(2, 2), (8, 1), (16, 3), (8, 4)]


@pytest.mark.parametrize(("select", "scope", "divergence", "distill_on"), _GRID)
def test_chunked_equals_naive(select, scope, divergence, distill_on, monkeypatch):
    from uapt.objectives import fused

    for i, (knobs, softcap, t_softcap, bias, separate, chunk) in enumerate(_VARIANTS):
        monkeypatch.setattr(fused, "_BLOCKS_PER_CHUNK", _SPLITS[i][0])
        monkeypatch.setattr(fused, "_TEACHER_SPLIT", _SPLITS[i][1])
        obj = dict(knobs, select=select, scope=scope, divergence=divergence, distill_on=distill_on)
        hidden, t_hidden, weight, b, labels, t_head, cap = _setup(
            i, bias, separate, softcap, t_softcap
        )
        naive, naive_grads, chunked, chunked_grads = _both(
            obj, hidden, t_hidden, weight, b, labels, t_head, cap, chunk
        )
        assert torch.equal(chunked.kept, naive.kept), obj
        assert torch.equal(chunked.distilled, naive.distilled), obj
        for name in ("total", "mle", "distill", "nll"):
            _close(getattr(chunked, name), getattr(naive, name), f"{name} {obj}")
        names = ("hidden", "weight", "bias")[: len(naive_grads)]
        for name, got, want in zip(names, chunked_grads, naive_grads, strict=True):
            _close(got, want, f"grad {name} {obj}")
        assert chunked.denominators == naive.denominators


def _simple(seed=0):
    hidden, t_hidden, weight, b, labels, _t_head, _ = _setup(seed, True, False, None, None)
    return hidden, t_hidden, weight, b, labels


def test_frozen_head_gets_no_gradient_and_hidden_matches():
    hidden, t_hidden, weight, b, labels = _simple()
    obj = dict(mask_ratio=0.5, distill_weight=1.0)
    head = OutputHead(weight, b, 2.0)  # LoRA-style: head frozen, shared with the teacher
    h1 = hidden.clone().requires_grad_(True)
    naive = token_loss(head.logits(h1), labels, obj, head.logits(t_hidden))
    naive.total.backward()
    h2 = hidden.clone().requires_grad_(True)
    chunked = token_loss_chunked(h2, labels, obj, head, t_hidden, chunk_size=3)
    chunked.total.backward()
    _close(h2.grad, h1.grad, "grad hidden")
    assert weight.grad is None and b.grad is None


def test_scaled_total_scales_gradients_and_parts_alone_are_refused():
    hidden, t_hidden, weight, b, labels = _simple(1)
    obj = dict(mask_ratio=0.5, distill_weight=0.5)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    head = OutputHead(w, b)
    ref = torch.autograd.grad(token_loss_chunked(h, labels, obj, head, t_hidden).total, [h, w])
    scaled = token_loss_chunked(h, labels, obj, head, t_hidden)
    grads = torch.autograd.grad(scaled.total * 3.0, [h, w])
    for got, want in zip(grads, ref, strict=True):
        _close(got, 3.0 * want, "scaled grad")
    parts = token_loss_chunked(h, labels, obj, head, t_hidden)
    with pytest.raises(RuntimeError, match="only total = mle"):
        torch.autograd.grad(parts.mle, [h])
    mle_only = token_loss_chunked(h, labels, dict(mask_ratio=0.5), head)
    torch.autograd.grad(mle_only.mle, [h])  # no distill term: mle is the total


def test_no_grad_and_no_valid_labels():
    hidden, t_hidden, weight, b, labels = _simple(2)
    obj = dict(mask_ratio=0.5, distill_weight=1.0, distill_on="all")
    head = OutputHead(weight, b, 4.0)
    with torch.no_grad():
        got = token_loss_chunked(hidden, labels, obj, head, t_hidden, chunk_size=2)
    want = token_loss(head.logits(hidden), labels, obj, head.logits(t_hidden))
    _close(got.total, want.total, "no-grad total")
    labels[:] = -100
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    empty = token_loss_chunked(h, labels, obj, OutputHead(w, b), t_hidden)
    assert empty.total.item() == 0.0
    grads = torch.autograd.grad(empty.total, [h, w])
    assert all(bool((g == 0).all()) for g in grads)


def test_bf16_is_close_to_naive():
    hidden, t_hidden, weight, _b, labels = _simple(3)
    obj = dict(mask_ratio=0.5, distill_weight=1.0)
    w = weight.bfloat16().requires_grad_(True)
    h = hidden.bfloat16().requires_grad_(True)
    head = OutputHead(w, None, 3.0)
    naive = token_loss(head.logits(h), labels, obj, head.logits(t_hidden.bfloat16()))
    n_grads = torch.autograd.grad(naive.total, [h, w])
    chunked = token_loss_chunked(h, labels, obj, head, t_hidden.bfloat16(), chunk_size=4)
    c_grads = torch.autograd.grad(chunked.total, [h, w])
    assert c_grads[0].dtype == torch.bfloat16 and c_grads[1].dtype == torch.bfloat16
    # The naive path rounds the logits to bf16 (2^-8 relative) before its fp32 loss; the
    # chunked path keeps them in fp32: the loss differs by ~1e-3 relative at most. Gradients
    # are returned in bf16 (2^-8 ~ 4e-3 per rounding) after a bf16 matmul: 2e-2 of the scale.
    _close(chunked.total, naive.total, "bf16 total", rtol=1e-3)
    for got, want in zip(c_grads, n_grads, strict=True):
        _close(got, want, "bf16 grad", rtol=2e-2)


def test_errors_are_named():
    hidden, _t_hidden, weight, b, labels = _simple(4)
    head = OutputHead(weight, b)
    with pytest.raises(ValueError, match="teacher_hidden or cached_teacher are required"):
        token_loss_chunked(hidden, labels, dict(distill_weight=1.0), head)
    with pytest.raises(ValueError, match="chunk_size=0 must be an int >= 1"):
        token_loss_chunked(hidden, labels, {}, head, chunk_size=0)
    with pytest.raises(ValueError, match=r"head.weight must be \[V, 6\]"):
        token_loss_chunked(hidden, labels, {}, OutputHead(weight.t()))


def _tiny_gemma2():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        final_logit_softcapping=2.0,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    return Gemma2ForCausalLM(config).eval()


def test_output_head_of_a_softcapped_model_matches_its_logits():
    model = _tiny_gemma2()
    head = output_head(model)
    assert head.softcap == 2.0 and head.weight is model.get_output_embeddings().weight
    ids = torch.randint(0, V, (2, 8), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[0, :3] = -100
    obj = dict(mask_ratio=0.5)
    logits = model(input_ids=ids).logits
    hidden = model.get_decoder()(input_ids=ids).last_hidden_state  # final-normed states
    naive = token_loss(logits, labels, obj)
    chunked = token_loss_chunked(hidden, labels, obj, head, chunk_size=3)
    _close(chunked.total, naive.total, "model total")
    assert torch.equal(chunked.kept, naive.kept)


def test_output_head_unwraps_peft_and_refuses_lora_on_lm_head():
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_tiny_gemma2(), LoraConfig(r=2, target_modules=["q_proj"]))
    head = output_head(peft_model)
    assert head.softcap == 2.0 and head.weight.shape == (V, 16)
    on_head = get_peft_model(_tiny_gemma2(), LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="not a plain Linear"):
        output_head(on_head)
