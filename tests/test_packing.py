"""Packing: a micro-batch's rows run as one sequence without padding and compute what the padded
batch computes; a model that cannot keep packed rows apart is refused; token-budget micro-batches.
(Every objective, both loss paths and DDP with packing: tests/test_invariance.py.)"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from helpers import TINY, metric_rows, train

from uapt.batches import BatchStream, first_fit, partition
from uapt.models import logits
from uapt.packing import check_packing, use_rows_attention
from uapt.schema import ConfigError


def _rows_of_very_different_lengths(vocab: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(3)
    lengths = [3, 40, 11, 27]
    ids = torch.randint(3, vocab, (len(lengths), max(lengths)), generator=gen)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_packed_rows_give_the_padded_logits(tiny_model):
    batch = _rows_of_very_different_lengths(tiny_model.config.vocab_size)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        padded = logits(tiny_model, ids, mask)
        native = logits(tiny_model, ids, mask, packed=True)  # transformers' block-diagonal mask
        use_rows_attention(tiny_model)
        assert tiny_model.config._attn_implementation == "uapt_rows"
        rows = logits(tiny_model, ids, mask, packed=True)  # causal SDPA row by row
        again = logits(tiny_model, ids, mask)  # padded batches: plain SDPA, unchanged
    keep = mask.bool()
    # the same rows through the same weights; fp32 kernels over other shapes: ~1e-7 relative
    for got in (native, rows):
        torch.testing.assert_close(got[keep], padded[keep], rtol=1e-5, atol=1e-5)
        assert bool((got[~keep] == 0).all())  # padding is never computed
    assert torch.equal(again, padded)


class _Leaky(torch.nn.Module):
    """A model that drops the position ids: packed rows see each other and are numbered on."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids, attention_mask=None, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, **kwargs)


def test_a_model_that_mixes_packed_rows_is_refused(tiny_model):
    check_packing(tiny_model, "tiny", tiny_model.config.vocab_size)  # a real model passes
    with pytest.raises(ConfigError, match=r"model leaky .* does not keep packed rows apart"):
        check_packing(_Leaky(tiny_model), "leaky", tiny_model.config.vocab_size)
    with pytest.raises(ConfigError, match=r"set trainer\.packing=false"):
        check_packing(_Leaky(tiny_model), "leaky", tiny_model.config.vocab_size)


# ----------------------------------------------------------------------------- token budgets
def _sum(lengths) -> int:
    return sum(lengths)


def test_first_fit_and_partition_respect_the_budget():
    lengths = [5, 9, 2, 7, 7, 1, 12, 3]
    assert first_fit(lengths, 12, _sum) == 6  # [5], [9, 2], [7], [7, 1], [12], [3]: greedy
    for parts in range(1, len(lengths) + 1):
        sizes = partition(lengths, parts, _sum)
        assert len(sizes) == parts and all(s > 0 for s in sizes) and sum(sizes) == len(lengths)
        # the best largest group over every split into `parts` consecutive groups (brute force)
        best = min(
            max(sum(lengths[a:b]) for a, b in itertools.pairwise([0, *cuts, len(lengths)]))
            for cuts in itertools.combinations(range(1, len(lengths)), parts - 1)
        )
        starts = [0, *itertools.accumulate(sizes)]
        got = max(sum(lengths[a:b]) for a, b in itertools.pairwise(starts))
        assert got == best, parts


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("packed", [True, False])
def test_budget_layouts_cover_the_batch_evenly(world, packed):
    gen = torch.Generator().manual_seed(0)
    dataset = [{"input_ids": [1] * int(n)} for n in torch.randint(5, 200, (64,), generator=gen)]
    budget = 400

    def layouts(rank: int) -> list[list[list[int]]]:
        stream = BatchStream(dataset, 4, 0, 0, rank, world, 16 // (4 * world), budget, packed)
        return [stream.layout(stream.step_rows(step)) for step in range(4)]

    for step_layout, again in zip(layouts(0), layouts(world - 1), strict=True):
        assert step_layout == again  # every rank derives the same layout: no communication
        counts = {len(micros) for micros in step_layout}
        assert len(counts) == 1  # as many micro-batches on every rank (FSDP's collectives)
        rows = sorted(j for micros in step_layout for micro in micros for j in micro)
        assert rows == list(range(16))  # every row of the global batch once


@pytest.mark.slow
def test_steps_log_padding_and_assistant_tokens(tmp_path):
    base = [*TINY, "trainer.max_steps=2", "trainer.batch_size=4", "trainer.micro_batch_size=2"]
    padded, packed = tmp_path / "padded", tmp_path / "packed"
    train(*base, f"runs_dir={padded}", check=True)
    train(*base, "trainer.packing=true", f"runs_dir={packed}", check=True)
    (a_dir,) = Path(padded).glob("tiny-*")
    (b_dir,) = Path(packed).glob("tiny-*")
    a, b = metric_rows(a_dir), metric_rows(b_dir)
    assert all(r["pad_frac"] == 0.0 for r in b)  # packed: no padding computed
    assert all(0 <= r["pad_frac"] < 1 for r in a)
    assert all(r["assistant_tokens_per_s"] > 0 for r in a + b)
    for ra, rb in zip(a, b, strict=True):  # the same numbers (float rounding only)
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5)
