"""The output layer as the chunked path applies it: logits = softcap * tanh((h @ W.T + b) / softcap)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from uapt.objectives.positions import compute_dtype


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
        return head_logits(hidden, self.weight, self.bias, self.softcap, inplace=False)


@dataclass(frozen=True)
class Hidden:
    """A model's final (normed) hidden states [B, T, H] with the output layer that turns them
    into logits: what the chunked path takes instead of logits."""

    states: torch.Tensor
    head: OutputHead


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


def head_logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    softcap: float | None,
    *,
    inplace: bool = True,
) -> torch.Tensor:
    """Logits in the compute dtype: the matmul runs in the weight's dtype (as the model's would)."""
    z = F.linear(h.to(weight.dtype), weight, bias)
    z = z.to(compute_dtype(h))
    if softcap:
        z = z.div_(softcap).tanh_().mul_(softcap) if inplace else torch.tanh(z / softcap) * softcap
    return z
