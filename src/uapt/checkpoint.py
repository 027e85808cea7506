"""Checkpoints for exact resume: `<run>/checkpoints/step-<N>/`, atomic, verified on load.

A checkpoint holds everything the next step depends on: trainable weights (safetensors), optimizer
and scheduler state, every RNG state, the kept-set probe state, and the metrics so far. The data
position is the step itself (uapt's data order is a pure function of seed and step).

Writes go to a temporary folder that is renamed into place only when complete, with a manifest of
file sizes and SHA-256 digests written last; a checkpoint whose manifest does not match its files
(a truncated or corrupt file) is skipped with a warning and the previous one is used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


@dataclass
class TrainingState:
    """What a checkpoint restores besides model and optimizer weights."""

    step: int
    metrics: dict[str, float]
    probe_kept: torch.Tensor | None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


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
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f".step-{state.step:08d}-"))
    try:
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
            json.dumps({"step": state.step, "metrics": state.metrics})
        )
        files = sorted(p for p in tmp.iterdir())
        for path in files:
            _fsync(path)
        manifest = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}
        (tmp / MANIFEST).write_text(json.dumps({"step": state.step, "files": manifest}, indent=1))
        _fsync(tmp / MANIFEST)
        if final.exists():  # a re-run that reached the same step again
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # the previous checkpoint stays as it was
        raise
    prune(folder, keep)
    return final


def prune(folder: Path, keep: int) -> None:
    for stale in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    for partial in folder.glob(".step-*"):  # leftovers of a write that was killed
        shutil.rmtree(partial, ignore_errors=True)


def problem(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be trusted, or None when every file matches its manifest."""
    try:
        manifest = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        return f"unreadable manifest ({e})"
    for name, expected in manifest["files"].items():
        path = checkpoint / name
        if not path.exists():
            return f"{name} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{name} has {path.stat().st_size} bytes, expected {expected['bytes']}"
        if _sha256(path) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest(folder: Path) -> Path | None:
    """The newest checkpoint that verifies; broken ones are skipped with a warning."""
    for checkpoint in sorted(folder.glob("step-*"), reverse=True):
        reason = problem(checkpoint)
        if reason is None:
            return checkpoint
        log.warning("skipping checkpoint %s: %s", checkpoint, reason)
    return None


def load(
    checkpoint: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainingState:
    from uapt import fsdp  # transformers and torch.distributed: only when loading

    sharded = fsdp.is_sharded(model)
    weights = optimizer_state = None
    if not sharded or fsdp.is_main():  # FSDP: rank 0 reads, load_full_state_dicts broadcasts
        weights = load_file(checkpoint / "model.safetensors")
        missing = set(fsdp.trainable_names(model)) - set(weights)
        if missing:
            raise RuntimeError(
                f"checkpoint {checkpoint} lacks {len(missing)} trainable tensors, "
                f"e.g. {sorted(missing)[0]}: it belongs to a different model"
            )
        optimizer_state = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    if sharded:
        fsdp.load_full_state_dicts(model, optimizer, weights, optimizer_state)
    else:
        model.load_state_dict(weights, strict=False)
        optimizer.load_state_dict(optimizer_state)
    extra = torch.load(checkpoint / "state.pt", weights_only=True)
    scheduler.load_state_dict(extra["scheduler"])
    restore_rng(extra["rng"])
    progress = json.loads((checkpoint / "progress.json").read_text())
    return TrainingState(progress["step"], progress["metrics"], extra["probe_kept"])
