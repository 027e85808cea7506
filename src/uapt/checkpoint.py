"""Checkpoints for exact resume: `<run>/checkpoints/step-<N>/`, atomic, verified on load.

A checkpoint holds everything the next step depends on: trainable weights (safetensors), optimizer
and scheduler state, every RNG state, the kept-set probe state, and the metrics so far. The data
position is the step itself (uapt's data order is a pure function of seed and step).

Writes go to a temporary folder that is renamed into place only when complete, with a manifest of
file sizes and SHA-256 digests written last; a checkpoint whose manifest does not match its files
(a truncated or corrupt file), or whose files do not load, is skipped with a warning naming it
and the one before it is used.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from uapt import files

log = logging.getLogger(__name__)


@dataclass
class TrainingState:
    """What a checkpoint restores besides model and optimizer weights."""

    step: int
    metrics: dict[str, float]
    probe_kept: torch.Tensor | None


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters only (all weights, or just the adapters under LoRA)."""
    return {
        n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad
    }


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainingState,
    keep: int,
    weights: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write step-<N>/ atomically and prune to the newest `keep` checkpoints. `weights` and
    `optimizer_state` stand in for the model's and the optimizer's (FSDP: gathered from ranks)."""
    final = folder / f"step-{state.step:08d}"
    with files.staging_dir(final) as tmp:  # the previous checkpoint stays until this one is whole
        save_file(trainable_state(model) if weights is None else weights, tmp / "model.safetensors")
        torch.save(
            optimizer.state_dict() if optimizer_state is None else optimizer_state,
            tmp / "optimizer.pt",
        )
        torch.save(
            {
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "probe_kept": state.probe_kept,
            },
            tmp / "state.pt",
        )
        (tmp / "progress.json").write_text(
            json.dumps(files.strict_json({"step": state.step, "metrics": state.metrics}))
        )
        files.write_manifest(tmp, step=state.step)  # last: marks a whole checkpoint
    prune(folder, keep)
    return final


def prune(folder: Path, keep: int) -> None:
    """Keep the newest `keep` checkpoints; remove what killed writes left (the holder only)."""
    for stale in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for partial in folder.glob(".step-*"):
        shutil.rmtree(partial, ignore_errors=True)


def problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be trusted, or None when every file matches its manifest."""
    return files.manifest_problem(checkpoint)


def verified(folder: Path) -> list[Path]:
    """Checkpoints whose files match their manifests, newest first (others: a warning)."""
    found = []
    for checkpoint in sorted(folder.glob("step-*"), reverse=True):
        reason = problem(checkpoint)
        if reason is None:
            found.append(checkpoint)
        else:
            log.warning("skipping checkpoint %s: %s", checkpoint, reason)
    return found


def latest(folder: Path) -> Path | None:
    """The newest checkpoint that verifies; broken ones are skipped with a warning."""
    found = verified(folder)
    return found[0] if found else None


@dataclass
class _Contents:
    weights: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any] | None
    extra: dict[str, Any]
    progress: dict[str, Any]


def _read(checkpoint: Path, model: torch.nn.Module) -> _Contents:
    """Every file of a checkpoint, read and checked, nothing applied yet. Under FSDP only rank 0
    reads weights and optimizer state (load_full_state_dicts broadcasts them)."""
    from uapt import fsdp  # transformers and torch.distributed: only when loading

    weights = optimizer_state = None
    if not fsdp.is_sharded(model) or fsdp.is_main():
        weights = load_file(checkpoint / "model.safetensors")
        missing = set(fsdp.trainable_names(model)) - set(weights)
        if missing:
            raise RuntimeError(
                f"checkpoint {checkpoint} lacks {len(missing)} trainable tensors, "
                f"e.g. {sorted(missing)[0]}: it belongs to a different model"
            )
        optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    extra = torch.load(checkpoint / "state.pt", weights_only=True)
    progress = files.read_json(checkpoint / "progress.json")
    return _Contents(weights, optimizer_state, extra, progress)


def restore(
    folder: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    world: Any = None,
) -> tuple[Path, TrainingState] | None:
    """Load the newest checkpoint that verifies and reads back; one that does not read (its
    files match the manifest but do not load) is skipped with a warning naming it, and the one
    before it is tried. All ranks agree on the checkpoint they load. None: start from step 0."""
    from uapt import distributed, fsdp

    for checkpoint in verified(folder):
        try:
            contents, ok = _read(checkpoint, model), 1
        except Exception as e:  # unpickling, safetensors, JSON: the files do not load
            contents, ok = None, 0
            log.warning(
                "checkpoint %s does not load (%s: %s); trying an older one",
                checkpoint,
                type(e).__name__,
                e,
            )
        if world is not None:  # every rank read its part: all must have succeeded
            ok = int(distributed.all_sum(torch.tensor([ok]), world)) == world.world_size
        if not ok:
            continue
        if fsdp.is_sharded(model):
            fsdp.load_full_state_dicts(model, optimizer, contents.weights, contents.optimizer_state)
        else:
            model.load_state_dict(contents.weights, strict=False)
            optimizer.load_state_dict(contents.optimizer_state)
        scheduler.load_state_dict(contents.extra["scheduler"])
        restore_rng(contents.extra["rng"])
        progress = contents.progress
        return checkpoint, TrainingState(
            progress["step"], progress["metrics"], contents.extra["probe_kept"]
        )
    return None
