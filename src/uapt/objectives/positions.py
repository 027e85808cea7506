"""Where the objective is taken: the valid label positions, the rows that predict them, and the precision it is computed in."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # a label position without a target (transformers' convention)


def valid_mask(labels: torch.Tensor) -> torch.Tensor:
    """Bool [B, T]: label positions with a target (not -100) and a predicting logit (t >= 1)."""
    valid = labels != IGNORE_INDEX
    valid[:, 0] = False
    return valid


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The objective's arithmetic: float32, or float64 for float64 inputs (tests pin values in
    float64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def upcast(x: torch.Tensor) -> torch.Tensor:
    """x in the compute dtype (unchanged when it already is float64)."""
    return x if x.dtype == torch.float64 else x.float()


def attached_zero(x: torch.Tensor) -> torch.Tensor:
    """A zero attached to x's graph (no full reduction, no NaN from x's values)."""
    return upcast(x[..., :0].sum())


@dataclass(frozen=True)
class Positions:
    """The N valid positions of labels [B, T], in the flat (b-major) order of every per-token
    tensor [N] of the objective: the mask [B, T], their indices b, t [N] and targets [N]."""

    valid: torch.Tensor
    b: torch.Tensor
    t: torch.Tensor
    targets: torch.Tensor

    @property
    def count(self) -> int:
        return self.targets.shape[0]

    def predicting(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of x [B, T, ...] predicting the valid labels, x[b, t - 1] (all, or those at
        index)."""
        if index is None:
            return x[self.b, self.t - 1]
        return x[self.b[index], self.t[index] - 1]

    def grid(self, flat: torch.Tensor) -> torch.Tensor:
        """A per-token [N] tensor as detached float32 [B, T], 0 at invalid positions."""
        out = torch.zeros(self.valid.shape, dtype=torch.float32, device=self.valid.device)
        out[self.b, self.t] = flat.detach().float()
        return out


def label_positions(labels: torch.Tensor, vocab: int) -> Positions:
    """The valid positions of labels [B, T] whose targets lie in [0, vocab) (ValueError
    otherwise)."""
    valid = valid_mask(labels)
    b, t = valid.nonzero(as_tuple=True)
    targets = labels[b, t]
    if labels.dim() != 2:
        raise ValueError(f"labels must be [B, T], got shape {tuple(labels.shape)}")
    if targets.numel() and bool(((targets < 0) | (targets >= vocab)).any()):
        bad = targets[(targets < 0) | (targets >= vocab)][0].item()
        raise ValueError(f"labels hold {bad}, outside [0, {vocab}) and not {IGNORE_INDEX}")
    return Positions(valid, b, t, targets)
