"""The frozen teacher, computed once and reused by every run of a grid (`objective.teacher=cached`).

Self-distillation's teacher is the initial model, and every run of a grid that starts from the same
weights and reads the same tokenised rows asks it the same questions. The cache answers them from
disk: per training row, at each valid label position, the teacher's top-k log-probabilities at the
objective's temperature with their token ids, the log of the remaining mass, and the exact NLL of
the label (select=excess). The objective then distils over k + 1 buckets (see
uapt.objectives.TeacherTopK; the gap to the exact divergence is measured in docs/performance.md).

Layout: <cache_dir>/teacher/<weights fingerprint>/k<k>-t<tau>/<row hash>.safetensors. A row's hash
covers its token ids and labels (so dataset, template and tokenizer are all in it); the weights
fingerprint covers the model's parameters, so a random-init model with another seed gets its own
cache. Files are written atomically, so runs filling the same cache at once never see half a row.
A run fills the rows it will read before its first step, with the model it is about to train (at
that point it IS the initial model), so no second copy of the weights is ever held.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from uapt import files
from uapt.data import collate
from uapt.models import hidden_states
from uapt.objectives import TeacherTopK, output_head, teacher_topk, valid_mask
from uapt.paths import CACHE_MARK
from uapt.sections.objective import ObjectiveSpec

log = logging.getLogger(__name__)
FORMAT = "v1"  # bump when what a row file holds changes
ROWS_PER_CHUNK = 1024  # token positions whose logits are alive at once while filling


def weights_fingerprint(model: torch.nn.Module, sample: int = 4096) -> str:
    """A hash of the parameters (names, shapes, dtypes, a strided sample of values and their sum)."""
    digest = hashlib.sha256(FORMAT.encode())
    with torch.no_grad():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            values = flat[:: max(1, flat.numel() // sample)].float().cpu()
            digest.update(
                f"{name}:{tuple(p.shape)}:{p.dtype}:{float(flat.sum(dtype=torch.float64))!r}".encode()
            )
            digest.update(values.numpy().tobytes())
    return digest.hexdigest()[:16]


def row_key(input_ids: Sequence[int] | torch.Tensor, labels: Sequence[int] | torch.Tensor) -> str:
    """The cache key of one tokenised row: its token ids and labels."""
    digest = hashlib.sha256()
    for seq in (input_ids, labels):
        digest.update(torch.as_tensor(seq, dtype=torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:32]


class TeacherCache:
    """Rows of the frozen teacher's top-k in a folder; `fill` computes, `lookup` reads."""

    def __init__(self, cache_dir: str | Path, fingerprint: str, k: int, temperature: float):
        self.k, self.temperature = k, temperature
        self.place = Path("teacher", fingerprint, f"k{k}-t{temperature:g}")  # in the cache
        self.folder = Path(cache_dir) / self.place
        self.computed = self.reused = 0

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    @torch.no_grad()
    def fill(
        self,
        model: torch.nn.Module,
        rows: Iterable[Mapping[str, Any]],
        batch_size: int,
        pad_id: int,
    ) -> None:
        """Compute the missing rows with `model` (the initial weights), batch_size rows at a time."""
        todo: dict[str, Mapping[str, Any]] = {}
        for row in rows:
            key = row_key(row["input_ids"], row["labels"])
            if key in todo:
                continue
            if self._readable(key, row):
                self.reused += 1
                continue
            todo[key] = row
        if not todo:
            return
        log.info("teacher cache: computing %d rows in %s", len(todo), self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        training = model.training
        model.eval()
        device = next(model.parameters()).device
        items = list(todo.items())
        try:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                batch = collate([row for _, row in chunk], pad_id)
                self._compute(model, [key for key, _ in chunk], batch, device)
        finally:
            model.train(training)
        self.computed += len(todo)

    def _compute(
        self, model: torch.nn.Module, keys: list[str], batch: Mapping[str, torch.Tensor], device
    ) -> None:
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        hidden = hidden_states(model, ids, mask)
        valid = valid_mask(labels)
        b_idx, t_idx = valid.nonzero(as_tuple=True)
        head, rows, targets = output_head(model), hidden[b_idx, t_idx - 1], labels[b_idx, t_idx]
        # valid rows only, ROWS_PER_CHUNK at a time: never [B, T, V] logits
        pieces = [
            teacher_topk(
                head.logits(rows[a : a + ROWS_PER_CHUNK]),
                targets[a : a + ROWS_PER_CHUNK],
                self.k,
                self.temperature,
            )
            for a in range(0, rows.shape[0], ROWS_PER_CHUNK)
        ]
        top = TeacherTopK(*(torch.cat(x) for x in zip(*_fields(pieces), strict=True)))
        counts = valid.sum(1).tolist()
        for key, part in zip(keys, _split(top, counts), strict=True):
            self._write(key, part)

    def _write(self, key: str, part: TeacherTopK) -> None:
        tensors = {
            "ids": part.ids.to(torch.int32).cpu().contiguous(),
            "logp": part.logp.float().cpu().contiguous(),
            "rest": part.rest.float().cpu().contiguous(),
            "nll": part.nll.float().cpu().contiguous(),
        }
        files.publish_file(self.path(key), lambda tmp: save_file(tensors, str(tmp)))

    def _readable(self, key: str, row: Mapping[str, Any]) -> bool:
        """Whether the row's file exists and reads back whole: checked when filling, so that a
        damaged row is rebuilt before training (named in a warning), not found mid-run."""
        path = self.path(key)
        if not path.is_file():
            return False
        n_valid = int(valid_mask(torch.as_tensor([row["labels"]])).sum())
        try:
            t = load_file(str(path))
            ok = t["ids"].dim() == 2 and t["ids"].shape[1] <= self.k
            ok = ok and all(t[name].shape[0] == n_valid for name in ("ids", "logp", "rest", "nll"))
        except Exception as e:  # safetensors raises its own errors on a torn header or body
            ok, why = False, f"{type(e).__name__}: {e}"
        else:
            why = f"holds shapes for another row ({tuple(t['ids'].shape)}, {n_valid} valid)"
        if not ok:
            log.warning("teacher cache row %s is damaged (%s); computing it again", path, why)
        return ok

    def lookup(self, batch: Mapping[str, torch.Tensor]) -> TeacherTopK:
        """The teacher at the batch's valid positions (token_loss's order), rows read from disk."""
        parts = []
        for ids, mask, labels in zip(
            batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
        ):
            n = int(mask.sum())
            key = row_key(ids[:n].cpu(), labels[:n].cpu())
            path = self.path(key)
            if not path.is_file():
                raise KeyError(f"teacher cache {self.folder} has no row {key} (it was not filled)")
            t = load_file(str(path))
            parts.append(TeacherTopK(t["ids"].long(), t["logp"], t["rest"], t["nll"]))
        device = batch["labels"].device
        return TeacherTopK(*(torch.cat(x) for x in zip(*_fields(parts), strict=True))).to(device)


def _fields(parts: list[TeacherTopK]) -> list[tuple[torch.Tensor, ...]]:
    return [(p.ids, p.logp, p.rest, p.nll) for p in parts]


def _split(top: TeacherTopK, counts: list[int]) -> list[TeacherTopK]:
    pieces = [x.split(counts) for x in (top.ids, top.logp, top.rest, top.nll)]
    return [TeacherTopK(*fields) for fields in zip(*pieces, strict=True)]


def open_cache(
    model: torch.nn.Module, objective: ObjectiveSpec, cache_dir: str | Path
) -> TeacherCache:
    """The cache of `model`'s current weights for this objective's k and temperature."""
    fingerprint = weights_fingerprint(model)
    return TeacherCache(cache_dir, fingerprint, objective.teacher_topk, objective.temperature)


def describe(teacher: Any) -> dict[str, Any] | None:
    """The run record's `teacher_cache` entry (None for a live teacher or none)."""
    if not isinstance(teacher, TeacherCache):
        return None
    return {
        "folder": f"{CACHE_MARK}/{teacher.place.as_posix()}",  # no machine path in a record
        "k": teacher.k,
        "rows_computed": teacher.computed,
        "rows_reused": teacher.reused,
    }
