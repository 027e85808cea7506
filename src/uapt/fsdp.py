"""Fully sharded data parallelism (torch FSDP2, `fully_shard`) behind `trainer.fsdp=true`.

Under torchrun, DDP keeps a whole copy of weights, gradients and AdamW state on every rank; FSDP
shards all three across ranks and all-gathers one decoder layer's weights at a time for forward
and backward. The loop stays the same: ranks split each global micro-batch in order, gradients
are averaged like DDP's, and the numbers match a single process (tests/test_fsdp.py).

    model = fsdp.shard(model, mixed_precision=bf16)     # after make_teacher(), before the optimizer
    with fsdp.no_sync(model): loss.backward()          # micro-batches before the last one
    model_sd, optim_sd = fsdp.full_state_dicts(model, optimizer)  # every rank; full on rank 0
    fsdp.load_full_state_dicts(model, optimizer, model_sd, optim_sd)  # every rank; rank 0's data

Checkpoints keep uapt's single-process format (trainable weights by parameter name, optimizer
state by parameter index), so a run can resume with or without FSDP, and on any number of ranks.
FSDP2 works on CPU with gloo as well as on GPUs with NCCL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from uapt.models import causal_lm, decoder_layers

GATHER = StateDictOptions(full_state_dict=True, cpu_offload=True)  # full tensors, rank 0 only


# ----------------------------------------------------------------------------- sharding
def shard(model: torch.nn.Module, mixed_precision: bool = False) -> torch.nn.Module:
    """Shard `model` in place across the default process group: one FSDP unit per decoder layer,
    then the causal LM as the root unit (embeddings, final norm, output layer). Returns `model`.

    The root is the transformers model itself, not a peft wrapper around it, so `is_peft` and
    `causal_lm` still recognise the model. `mixed_precision`: weights are all-gathered and used
    in bf16 and gradients reduced in fp32, while the sharded weights and the optimizer keep the
    model's dtype (load the model in float32 for fp32 master weights).

    The root keeps its gathered weights from forward to backward (torch's default for a root),
    which the chunked loss relies on: it applies the output layer itself, after the forward, so
    `output_head(model)` must then see the gathered weight. A frozen teacher, which has no
    backward, keeps its root gathered for good (embeddings and output layer: a few GB at most).
    Call after `make_teacher` (an FSDP module cannot be deep-copied) and before building the
    optimizer (sharding replaces the parameters).
    """
    if not dist.is_initialized():
        raise RuntimeError("fsdp.shard: no process group; run under torchrun (trainer.nproc > 1)")
    policy = MixedPrecisionPolicy()
    if mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    lm = causal_lm(model)
    for layer in reversed(decoder_layers(lm)):  # bottom-up, should one block nest in another
        fully_shard(layer, mp_policy=policy)
    fully_shard(lm, mp_policy=policy)
    return model


def fsdp_modules(model: torch.nn.Module) -> list[FSDPModule]:
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(m, FSDPModule) for m in model.modules())


def reshard(model: torch.nn.Module) -> None:
    """Register the sharded parameters again (the root keeps gathered weights after a forward
    without backward, e.g. evaluation); state dicts and the optimizer see the sharded ones."""
    for module in fsdp_modules(model):
        module.reshard()


@contextmanager
def no_sync(model: torch.nn.Module) -> Iterator[None]:
    """Accumulate gradients locally, without reduce-scatter, for the micro-batches before the last
    (FSDP's counterpart of DDP's `no_sync`; a DDP model gets its own). Costs memory: each layer's
    unsharded gradient is kept until the synchronising backward."""
    if not is_sharded(model):
        with model.no_sync() if hasattr(model, "no_sync") else nullcontext():
            yield
        return
    modules = fsdp_modules(model)
    for module in modules:
        module.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for module in modules:
            module.set_requires_gradient_sync(True, recurse=False)


def clip_grad_norm_(parameters: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` (it handles sharded DTensor gradients: the norm is
    reduced over ranks); returns the global norm as a plain tensor."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


# ----------------------------------------------------------------------------- state dicts
def trainable_names(model: torch.nn.Module) -> list[str]:
    """Names of the trainable parameters, as in checkpoint.trainable_state (same with and
    without sharding: FSDP2 swaps parameters in place and adds no wrapper to the names)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter, in `optimizer.state_dict()`'s index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    order = [p for group in optimizer.param_groups for p in group["params"]]
    missing = [i for i, p in enumerate(order) if id(p) not in names]
    if missing:
        raise ValueError(
            f"fsdp: optimizer parameter #{missing[0]} is not a parameter of the model "
            "(build the optimizer after fsdp.shard)"
        )
    return [names[id(p)] for p in order]


def _by_index(state: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """DCP's name-keyed optimizer state ► `Optimizer.state_dict()`'s index-keyed format."""
    index = {n: i for i, n in enumerate(names)}
    return {
        "state": {index[n]: v for n, v in state["state"].items()},
        "param_groups": [
            {**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]
        ],
    }


def _by_name(state: Mapping[str, Any], names: list[str]) -> dict[str, Any]:
    """`Optimizer.state_dict()`'s index-keyed format ► DCP's name-keyed one."""
    groups = state["param_groups"]
    size = sum(len(g["params"]) for g in groups)
    if size != len(names):
        raise ValueError(
            f"fsdp: the optimizer state holds {size} parameters, the optimizer {len(names)}: "
            "it belongs to a different model or LoRA setting"
        )
    return {
        "state": {names[int(i)]: v for i, v in state["state"].items()},
        "param_groups": [{**g, "params": [names[int(i)] for i in g["params"]]} for g in groups],
    }


def full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Call on every rank (collective). Rank 0 gets the trainable weights (the keys of
    checkpoint.trainable_state on the unsharded model) and `optimizer.state_dict()` as one
    process would have it, full CPU tensors; the other ranks get two empty dicts. Gathers one
    tensor at a time, so no rank holds more than one full tensor on its device."""
    reshard(model)
    names = _param_names(model, optimizer)
    only_trainable = StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True
    )
    weights = get_model_state_dict(model, options=only_trainable)
    # in named_parameters order, without tied duplicates (lm_head.weight) and buffers
    weights = {k: weights[k] for k in trainable_names(model) if k in weights}
    optim = get_optimizer_state_dict(model, optimizer, options=GATHER)
    if not is_main():
        return {}, {}
    return weights, _by_index(optim, names)


def load_full_state_dicts(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    model_sd: Mapping[str, torch.Tensor] | None,
    optim_sd: Mapping[str, Any] | None,
) -> None:
    """Call on every rank (collective): rank 0's full dicts (a checkpoint's trainable weights and
    index-keyed optimizer state) are broadcast tensor by tensor and each rank keeps its shard.
    The other ranks may pass None (no need to read the files there)."""
    reshard(model)
    names = _param_names(model, optimizer)
    load = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    if is_main():
        if model_sd is None or optim_sd is None:
            raise ValueError("fsdp.load_full_state_dicts: rank 0 must pass both state dicts")
        missing = set(trainable_names(model)) - set(model_sd)
        if missing:
            raise RuntimeError(
                f"the checkpoint lacks {len(missing)} trainable tensors, e.g. "
                f"{sorted(missing)[0]}: it belongs to a different model"
            )
        model_sd, optim_sd = dict(model_sd), _by_name(optim_sd, names)
    else:
        model_sd, optim_sd = {}, {}
    set_model_state_dict(model, model_sd, options=load)
    set_optimizer_state_dict(model, optimizer, optim_sd, options=load)


def full_model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Call on every rank (collective): the whole `model.state_dict()` (frozen weights too) as
    full CPU tensors on rank 0, {} elsewhere."""
    reshard(model)
    state = get_model_state_dict(model, options=GATHER)  # every rank takes part in the gathers
    return state if is_main() else {}


def unsharded_copy(
    model: torch.nn.Module, build: Callable[[], torch.nn.Module]
) -> torch.nn.Module | None:
    """Call on every rank (collective): on rank 0, `build()` a fresh unsharded twin of the model
    (e.g. uapt.models.load_model with the run's model config) and load the trained weights into
    it, for `save_pretrained` and evaluation, which run on rank 0 alone; None on other ranks."""
    state = full_model_state_dict(model)
    if not is_main():
        return None
    twin = build()
    twin.load_state_dict(state, strict=True)
    return twin


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
