"""The optimizer step's global batch: which rows it holds, which rank runs which, and what its
token means divide by.

`trainer.batch_size` rows make one optimizer step, whatever runs them: one process with one
micro-batch, gradient accumulation over several, or several ranks. The data order is a pure
function of the seed, so step s's global batch is rows [s * batch_size, (s + 1) * batch_size) of
one seeded stream; rank r's micro-batch m holds rows [(m * W + r) * mb, ... + mb) of it (W ranks,
mb = `trainer.micro_batch_size`). Before the forward pass, `plan` computes what the objective
needs from the whole global batch (see uapt.objectives):

- the token counts (kept, valid, distilled) every token mean divides by: they follow from the
  labels and rho alone, so each micro-batch's loss is its share of the step's token means;
- the kept set, when the selection spans more rows than one micro-batch (`scope=batch` over the
  global batch or groups of `scope_size` rows that a micro-batch does not hold whole): a no-grad
  scoring pass over this rank's micro-batches, scores summed over ranks, top-K per group. Within
  a micro-batch the objective selects in the forward pass itself, at no extra cost;
- for `select=random`, noise drawn per row from (seed, step, row), on the CPU: the same on every
  device type and for every split of the batch.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from uapt import distributed
from uapt.data import collate
from uapt.objectives import Counts, select_kept, step_counts, valid_mask
from uapt.sections.objective import ObjectiveSpec

Batch = dict[str, torch.Tensor]
ScoreFn = Callable[[Batch], torch.Tensor]  # a micro-batch on its device -> scores [B, T]


@dataclass
class StepPlan:
    """This rank's micro-batches of one global batch, with what the objective needs of the whole."""

    batches: list[Batch]
    kept: list[torch.Tensor | None]  # per micro-batch: the kept mask, or None (selected in forward)
    counts: Counts  # the global batch's denominators


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def noise_seed(*parts: Any) -> int:
    """A 63-bit generator seed from any key (seed, step, row): no overflow for any seed."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def row_noise(key: tuple, length: int) -> torch.Tensor:
    """Uniform selection noise [length] for one row, a pure function of its key (on the CPU)."""
    return torch.rand(length, generator=torch.Generator().manual_seed(noise_seed(*key)))


def selection_spans(spec: ObjectiveSpec, layout: Sequence[Sequence[Sequence[int]]]) -> bool:
    """Whether a selection group reaches beyond one micro-batch (then the loop selects first).

    layout[rank][micro]: the global row indices of every micro-batch of the step."""
    if spec.mask_ratio == 0 or spec.scope == "sequence":
        return False
    where = {
        j: (r, m) for r, micros in enumerate(layout) for m, rows in enumerate(micros) for j in rows
    }
    size = spec.scope_size or len(where)
    return any(
        len({where[j] for j in range(start, start + size)}) > 1
        for start in range(0, len(where), size)
    )


def first_fit(costs: Sequence[int], budget: int, cost: Callable[[Sequence[int]], int]) -> int:
    """How many consecutive groups the rows need so that each costs at most `budget` (a row
    over the budget alone makes a group of its own)."""
    groups, current = 0, []
    for c in costs:
        if current and cost([*current, c]) > budget:
            groups, current = groups + 1, []
        current.append(c)
    return groups + bool(current)


def partition(costs: Sequence[int], parts: int, cost: Callable[[Sequence[int]], int]) -> list[int]:
    """Split rows into exactly `parts` consecutive non-empty groups with the smallest largest
    group cost (dynamic programming); returns the group sizes."""
    n = len(costs)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], cost(costs[j:i]))
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    sizes, i = [], n
    for k in range(parts, 0, -1):
        sizes.append(i - cut[k][i])
        i = cut[k][i]
    return sizes[::-1]


def select_global(
    rows: Sequence[dict[str, Any]],
    own: Sequence[Sequence[int]],
    batches: Sequence[Batch],
    spec: ObjectiveSpec,
    score: ScoreFn,
    noise_key: Callable[[int], tuple],
    world: distributed.World,
    device: torch.device,
) -> torch.Tensor:
    """The kept mask [rows, T] of a global batch, selected over all its `rows`.

    own[m]: the global row indices of this rank's micro-batch m (`batches[m]`, on `device`).
    Scores: noise per row (select=random) or `score` on each micro-batch, placed at the rows'
    global positions and summed over ranks (every row belongs to exactly one rank).
    """
    labels = collate(rows, 0)["labels"].to(device)
    valid = valid_mask(labels)
    scores = torch.zeros(labels.shape, device=device)
    if spec.select == "random":
        for j, row in enumerate(rows):
            scores[j, : len(row["input_ids"])] = row_noise(noise_key(j), len(row["input_ids"]))
    else:
        for idx, batch in zip(own, batches, strict=True):
            got = score(batch)
            scores = scores.to(got.dtype)
            scores[list(idx), : got.shape[1]] = got
        scores = distributed.all_sum(scores, world)
    return select_kept(scores, valid, spec)


@dataclass
class BatchStream:
    """Deterministic data order: a seeded permutation per epoch, read as one endless stream.

    Row p of the stream is a pure function of (seed, p), so resuming at a step needs nothing but
    the step number, and a global batch holds the same rows however it is split: into
    `micro_batch_size` rows per micro-batch (rank r's micro-batch m holds rows
    (m * W + r) * mb ...), or, with `max_tokens`, into micro-batches of at most that many
    computed tokens (each rank a contiguous block of the global batch, every rank the same
    number of micro-batches, since FSDP's collectives need as many forwards on every rank).
    """

    dataset: Any
    micro_batch_size: int
    seed: int
    pad_id: int
    rank: int = 0
    world_size: int = 1
    accumulation: int = 1
    max_tokens: int | None = (
        None  # token budget of a micro-batch (trainer.max_tokens_per_micro_batch)
    )
    packed: bool = False  # what a micro-batch costs: its real tokens (packed) or rows x longest
    _perms: dict[int, list[int]] = field(default_factory=dict)

    @property
    def global_rows(self) -> int:
        return self.micro_batch_size * self.world_size * self.accumulation

    def row(self, position: int) -> dict[str, Any]:
        epoch, offset = divmod(position, len(self.dataset))
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.dataset), generator=gen).tolist()}
        return self.dataset[self._perms[epoch][offset]]

    def step_rows(self, step: int) -> list[dict[str, Any]]:
        base = step * self.global_rows
        return [self.row(base + j) for j in range(self.global_rows)]

    def _cost(self, lengths: Sequence[int]) -> int:
        return sum(lengths) if self.packed else len(lengths) * max(lengths)

    def layout(self, rows: Sequence[dict[str, Any]]) -> list[list[list[int]]]:
        """layout[rank][micro]: the global row indices of every micro-batch of a global batch."""
        ranks = range(self.world_size)
        if self.max_tokens is None:
            mb, w = self.micro_batch_size, self.world_size
            return [
                [
                    list(range((m * w + r) * mb, (m * w + r + 1) * mb))
                    for m in range(self.accumulation)
                ]
                for r in ranks
            ]
        per_rank = len(rows) // self.world_size
        blocks = [list(range(r * per_rank, (r + 1) * per_rank)) for r in ranks]
        lengths = [[len(rows[j]["input_ids"]) for j in block] for block in blocks]
        parts = max(first_fit(ls, self.max_tokens, self._cost) for ls in lengths)
        out = []
        for block, ls in zip(blocks, lengths, strict=True):
            sizes, start, micros = partition(ls, parts, self._cost), 0, []
            for size in sizes:
                micros.append(block[start : start + size])
                start += size
            out.append(micros)
        return out

    def rank_rows(self, step: int) -> list[dict[str, Any]]:
        """The rows this rank reads in step `step` (for filling a teacher cache)."""
        rows = self.step_rows(step)
        return [rows[j] for micro in self.layout(rows)[self.rank] for j in micro]

    def micro_batch(self, k: int) -> Batch:
        """Micro-batch k of this rank, counted over the whole run (fixed micro-batch size)."""
        step, micro = divmod(k, self.accumulation)
        rows = self.step_rows(step)
        return collate([rows[j] for j in self.layout(rows)[self.rank][micro]], self.pad_id)

    def plan(
        self, step: int, spec: ObjectiveSpec, score: ScoreFn, world: distributed.World, device
    ) -> StepPlan:
        """This rank's micro-batches of step `step`, the global counts and spanning selections."""
        rows = self.step_rows(step)
        layout = self.layout(rows)
        own = layout[self.rank]
        batches = [to_device(collate([rows[j] for j in idx], self.pad_id), device) for idx in own]
        counts = step_counts(valid_mask(collate(rows, self.pad_id)["labels"]), spec)
        kept: list[torch.Tensor | None] = [None] * len(own)
        if spec.mask_ratio > 0 and (spec.select == "random" or selection_spans(spec, layout)):
            noise_key = lambda j: (self.seed, step, j)  # noqa: E731
            chosen = select_global(rows, own, batches, spec, score, noise_key, world, device)
            kept = [
                chosen[idx, : b["labels"].shape[1]] for idx, b in zip(own, batches, strict=True)
            ]
        return StepPlan(batches, kept, counts)
