"""Packed batches on models that would otherwise let packed rows see each other.

`models.packed_forward` runs a micro-batch as one sequence of its real tokens. On SDPA models,
transformers would build a block-diagonal [N, N] mask for it (attention then costs as if the
packed sequence were one row); `use_rows_attention` swaps in `rows_attention`, which runs each
row alone. `check_packing` refuses, before any step, a model whose packed rows still see each
other. Measured in docs/performance.md ("Packing").
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from uapt.models import causal_lm, logits
from uapt.schema import ConfigError

ROWS_ATTENTION = "uapt_rows"


def rows_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA that runs a packed sequence row by row: causal attention within each row, none across.

    transformers' own packed format builds a block-diagonal [N, N] mask, so attention costs as
    if the whole packed sequence were one row (N^2, not sum T_i^2); without a varlen kernel (on
    CPU) that eats the padding saved. A packed batch is [1, N] with position ids restarting at
    0 at each row: each row gets torch's causal SDPA alone. Anything else (padded batches,
    generation) is plain SDPA with the mask transformers built.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    positions = kwargs.pop("position_ids", None)
    starts = None
    if query.shape[0] == 1 and positions is not None and query.shape[2] == key.shape[2] > 1:
        starts = (positions.reshape(-1) == 0).nonzero().flatten().tolist()
    if not starts or starts[0] != 0 or len(starts) < 2:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout, scaling, **kwargs
        )
    bounds = [*starts, query.shape[2]]
    outputs = [
        sdpa_attention_forward(
            module,
            query[:, :, a:b],
            key[:, :, a:b],
            value[:, :, a:b],
            None,
            dropout,
            scaling,
            is_causal=True,
            **kwargs,
        )[0]
        for a, b in itertools.pairwise(bounds)
    ]
    return torch.cat(outputs, dim=1), None  # [1, N, heads, head_dim], as sdpa returns it


def use_rows_attention(model: torch.nn.Module) -> None:
    """Packing on an SDPA model: attention row by row (rows_attention) instead of the N^2 mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    lm = causal_lm(model)
    if getattr(lm.config, "_attn_implementation", None) != "sdpa":
        return  # eager (Gemma-2), flash-attention: transformers' own packed support
    AttentionInterface.register(ROWS_ATTENTION, rows_attention)
    AttentionMaskInterface.register(ROWS_ATTENTION, sdpa_mask)
    lm.set_attn_implementation(ROWS_ATTENTION)


def check_packing(model: torch.nn.Module, name: str, vocab: int) -> None:
    """Refuse packing for a model that lets packed rows see each other: two short rows, packed
    and alone, must give the same logits (ConfigError naming the model otherwise)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (2, 6), generator=gen).to(device)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            alone = logits(model, ids, mask).float()
            together = logits(model, ids, mask, packed=True).float()
    finally:
        model.train(was_training)
    keep = mask.bool()
    err = (alone[keep] - together[keep]).abs().max().item()
    scale = alone[keep].abs().max().item()
    # the same rows through the same weights: only kernel rounding may differ (~1e-6 relative
    # in fp32, ~1e-2 in bf16); a row that sees its neighbour moves logits by O(scale)
    if not err <= 0.05 * max(scale, 1.0):
        attn = getattr(causal_lm(model).config, "_attn_implementation", "?")
        raise ConfigError(
            f"trainer.packing=true: model {name} (attention {attn}) does not keep packed rows "
            f"apart (logits move by {err:.3g}); set trainer.packing=false, or an attention "
            "implementation that honours per-row position ids (model.attn_implementation=sdpa, "
            "eager or flash_attention_2)"
        )
