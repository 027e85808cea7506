"""Paired bootstrap intervals for the difference between two table cells.

Pure: numbers and numpy arrays in, intervals out; no files, no records. `uapt.table` pairs the
runs of two cells by seed and the eval samples of each pair by doc id, then asks this module for
a percentile interval of "cell minus baseline":

- `paired_samples`: per-sample outcomes are known. With two or more paired seeds, two levels:
  every draw resamples the seeds with replacement, then, for every drawn seed (a fresh resample
  for each slot, so a seed drawn twice gets two different resamples), that seed's eval samples
  with replacement; the same sample indices serve both cells (paired). One paired seed: the
  samples only. Each task of the metric resamples its own samples, independently of the others.
- `paired_seeds`: only one number per run (validation loss, records made before outcomes were
  kept): the paired per-seed differences are resampled; no interval under two seeds.

The interval is the percentile interval of the draws (`percentile_interval`), with ends chosen
so that swapping the two cells negates it exactly. The same draws give the two-sided p-value of
"no difference" (`p_value`), which multiple-comparison adjustments (uapt.table) start from.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SAMPLES_AND_SEEDS = "samples+seeds"
SAMPLES = "samples"
SEEDS = "seeds"
# Memory grows as draws x seeds floats; at 10^6 draws the Monte Carlo error of an interval's end
# is already about 0.1 % of its half-width (10^4: about 1.5 %).
MAX_DRAWS = 1_000_000
# A multinomial draw costs one binomial per kind of sample, about as much as this many uniform
# sample indices (measured): the cheaper of the two exact ways is used.
KIND_COST = 8
# Sample indices drawn per block: bounds memory (this many indices and gathered floats) whatever
# the eval set's size, while keeping each numpy call large enough to stay vectorised.
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Settings:
    """Level, number of draws and random seed of every interval in a table."""

    level: float = 0.95
    draws: int = 10_000
    seed: int = 0

    def __post_init__(self) -> None:
        if not (isinstance(self.level, float) and 0 < self.level < 1):
            raise ValueError(f"level: expected a number in (0, 1), got {self.level!r}")
        if not (isinstance(self.draws, int) and 1 <= self.draws <= MAX_DRAWS):
            raise ValueError(f"draws: expected an integer in [1, {MAX_DRAWS}], got {self.draws!r}")
        if not (isinstance(self.seed, int) and self.seed >= 0):
            raise ValueError(f"seed: expected a non-negative integer, got {self.seed!r}")


@dataclass(frozen=True)
class Interval:
    """A percentile interval of cell minus baseline, in the metric's display units."""

    lo: float
    hi: float
    estimate: float  # the difference on the paired data itself (paired seeds, shared samples)
    method: str  # SAMPLES_AND_SEEDS, SAMPLES or SEEDS
    seeds: int  # paired seeds
    p_value: float  # two-sided, from the same draws (p_value)

    @property
    def significant(self) -> bool:
        """The interval excludes 0."""
        return self.lo > 0 or self.hi < 0


@dataclass(frozen=True)
class TaskSamples:
    """One task's per-sample outcomes for one paired seed, aligned by sample.

    `num[side, path, sample]` and `den[side, path, sample]`: side 0 is the cell, side 1 the
    baseline; path is the metric's path within this task. A sample's outcome is `num / den`: a
    number has den 1, a list (e.g. IFEval's instructions of one prompt) the sum of its items over
    their count, so that resampled sums give the pooled mean lm-eval reports.
    """

    num: np.ndarray
    den: np.ndarray

    @property
    def size(self) -> int:
        return int(self.num.shape[-1])

    @property
    def paths(self) -> int:
        return int(self.num.shape[1])


Outcome = float | Sequence[float]


def align(
    cell: Sequence[Mapping[Hashable, Outcome]], base: Sequence[Mapping[Hashable, Outcome]]
) -> tuple[TaskSamples, list[Hashable]]:
    """TaskSamples from {doc_id: outcome} per path of one task, for the cell's and the baseline's
    run, over the doc ids present in all of them (sorted, so that the order and thus the draws do
    not depend on file order). A sample with no items (an empty list) on either side weighs
    nothing in a pooled mean and is left out. Returns (TaskSamples, the doc ids used)."""
    if len(cell) != len(base) or not cell:
        raise ValueError("align: the same non-empty list of paths is needed on both sides")
    shared = set(cell[0])
    for outcomes in (*cell, *base):
        shared &= outcomes.keys()
    docs = sorted(
        (d for d in shared if all(_count(o[d]) for o in (*cell, *base))),
        key=lambda d: (type(d).__name__, d),
    )
    num = np.empty((2, len(cell), len(docs)))
    den = np.empty_like(num)
    for side, per_path in enumerate((cell, base)):
        for p, outcomes in enumerate(per_path):
            num[side, p] = [_total(outcomes[d]) for d in docs]
            den[side, p] = [_count(outcomes[d]) for d in docs]
    return TaskSamples(num, den), docs


def _total(value: Outcome) -> float:
    return float(sum(value)) if isinstance(value, Sequence) else float(value)


def _count(value: Outcome) -> int:
    return len(value) if isinstance(value, Sequence) else 1


def rng_for(seed: int, *key: str) -> np.random.Generator:
    """A generator for one comparison: from the table's seed and a stable key (not Python's
    per-process hash), so a cell's draws do not depend on the rest of the table."""
    digest = hashlib.sha256("\x1f".join(key).encode()).digest()
    words = np.frombuffer(digest[:16], dtype=np.uint32)
    return np.random.default_rng(np.random.SeedSequence([seed, *map(int, words)]))


# --------------------------------------------------------------------------- the draws


def sample_replicates(
    seeds: Sequence[Sequence[TaskSamples]], scale: float, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """`draws` bootstrap replicates of cell minus baseline; `seeds[s]` holds the tasks of paired
    seed s. A run's metric is the mean over all its paths of the pooled per-path mean, times
    `scale`; a cell's value is the mean over its (drawn) seeds."""
    _check_seeds(seeds)
    n = len(seeds)
    if n == 1:
        return scale * _resampled_diff(seeds[0], draws, rng)
    picks = rng.integers(0, n, size=(draws, n))  # the seeds of each draw's n slots
    slots = np.empty((draws, n))
    for s in range(n):  # every slot that drew seed s gets its own resample of its samples
        chosen = picks == s
        slots[chosen] = _resampled_diff(seeds[s], int(chosen.sum()), rng)
    return scale * slots.mean(axis=1)


def _check_seeds(seeds: Sequence[Sequence[TaskSamples]]) -> None:
    if not seeds:
        raise ValueError("no paired seed to resample")
    for tasks in seeds:
        if not tasks or any(t.size == 0 for t in tasks):
            raise ValueError("a bootstrap over zero samples")
        if sum(t.paths for t in tasks) != sum(t.paths for t in seeds[0]):
            raise ValueError("every paired seed needs the same metric paths")


def _resampled_diff(tasks: Sequence[TaskSamples], count: int, rng: np.random.Generator):
    """(count,): cell minus baseline (unscaled) on `count` independent resamples of one seed's
    samples; each task draws its own samples, shared by both sides and by the task's paths."""
    total = np.zeros(count)
    for task in tasks:
        sums = _resampled_sums(task, count, rng)  # (2, 2, paths, count): side, num/den
        ratios = sums[:, 0] / sums[:, 1]  # (2, paths, count)
        total += (ratios[0] - ratios[1]).sum(axis=0)
    return total / sum(t.paths for t in tasks)


def _resampled_sums(task: TaskSamples, count: int, rng: np.random.Generator) -> np.ndarray:
    """(2, 2, paths, count): per side, the numerators' and denominators' sums over `count`
    resamples (with replacement, of the task's size) of its samples.

    Samples with the same outcomes on every path and side are interchangeable, so a resample only
    needs how many of each kind it drew: Multinomial(size, their frequencies), exactly the law of
    `size` uniform indices. Accuracy-like metrics have a handful of kinds, which makes this
    independent of the eval set's size; with many kinds, indices are drawn. Kinds are numbered by
    first sample (doc id order), so swapping the sides changes no draw."""
    values = np.stack([task.num, task.den], axis=1)  # (2 sides, num/den, paths, size)
    flat = values.reshape(-1, task.size).T  # one row per sample
    _, first, counts = np.unique(flat, axis=0, return_index=True, return_counts=True)
    order = np.argsort(first)
    if len(order) * KIND_COST <= task.size:
        drawn = rng.multinomial(task.size, counts[order] / task.size, size=count)
        per_kind = flat[first[order]]  # (kinds, 2*2*paths)
        sums = np.stack([drawn @ per_kind[:, c] for c in range(flat.shape[1])])
        return sums.reshape(*values.shape[:3], count)
    out = np.empty((flat.shape[1], count))
    varying = [c for c in range(flat.shape[1]) if np.any(flat[:, c] != flat[0, c])]
    for c in range(flat.shape[1]):
        if c not in varying:  # e.g. the denominators of numbers: nothing to draw
            out[c] = flat[0, c] * task.size
    rows = max(1, _BLOCK // task.size)
    for start in range(0, count, rows):
        idx = rng.integers(0, task.size, size=(min(rows, count - start), task.size))
        for c in varying:  # 1-d gathers: much faster than one multi-axis gather
            out[c, start : start + idx.shape[0]] = flat[:, c][idx].sum(axis=-1)
    return out.reshape(*values.shape[:3], count)


def _observed_diff(tasks: Sequence[TaskSamples]) -> float:
    """Cell minus baseline (unscaled) on all the samples (no resampling)."""
    total = 0.0
    for task in tasks:
        ratios = task.num.sum(axis=-1) / task.den.sum(axis=-1)  # (2, paths)
        total += float((ratios[0] - ratios[1]).sum())
    return total / sum(t.paths for t in tasks)


def seed_replicates(diffs: Sequence[float], draws: int, rng: np.random.Generator) -> np.ndarray:
    """`draws` means of len(diffs) per-seed differences resampled with replacement."""
    d = np.asarray(diffs, dtype=float)
    if d.size == 0:
        raise ValueError("no paired seed to resample")
    return d[rng.integers(0, d.size, size=(draws, d.size))].mean(axis=1)


def percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    """The central `level` interval of the replicates: numpy's default ("linear") percentiles,
    written out so that the upper end uses the mirror image of the lower end's order statistics
    and weights; negated replicates then give exactly the negated interval."""
    s = np.sort(np.asarray(replicates, dtype=float))
    last = s.size - 1
    pos = (1 - level) / 2 * last
    i = min(math.floor(pos), last)
    g = pos - i
    j = min(i + 1, last)
    lo = s[i] if s[i] == s[j] else (1 - g) * s[i] + g * s[j]  # equal ends: exact, no rounding
    hi = s[last - i] if s[last - i] == s[last - j] else g * s[last - j] + (1 - g) * s[last - i]
    return float(lo) + 0.0, float(hi) + 0.0  # + 0.0: no "-0" for an interval at zero


SIGN_FLIP_EXACT = 16  # seeds up to which the sign-flip test enumerates all 2^k patterns


def p_value(replicates: np.ndarray) -> float:
    """The two-sided bootstrap p-value of "no difference" from the draws r_1..r_B that make the
    interval: p = min(1, 2 min(1 + #{r <= 0}, 1 + #{r >= 0}) / (B + 1)).

    The +1 (the observed data counted as one more draw) keeps p >= 2 / (B + 1): a finite number
    of draws cannot show a smaller one, and an adjustment must not treat 0 as exact. Draws at 0
    count on both sides (conservative for metrics on a lattice). p <= alpha implies that the
    1 - alpha percentile interval excludes 0: then at most floor(alpha (B - 1) / 2) draws lie on
    0's side, so both order statistics interpolated at that end lie beyond 0."""
    r = np.asarray(replicates, dtype=float)
    below, above = int(np.count_nonzero(r <= 0)), int(np.count_nonzero(r >= 0))
    return min(1.0, 2 * min(1 + below, 1 + above) / (r.size + 1))


# --------------------------------------------------------------------------- intervals


def paired_samples(
    seeds: Sequence[Sequence[TaskSamples]],
    scale: float,
    settings: Settings,
    rng: np.random.Generator,
) -> Interval:
    """The interval from per-sample outcomes (two levels with two or more paired seeds)."""
    reps = sample_replicates(seeds, scale, settings.draws, rng)
    lo, hi = percentile_interval(reps, settings.level)
    observed = scale * float(np.mean([_observed_diff(tasks) for tasks in seeds]))
    method = SAMPLES_AND_SEEDS if len(seeds) > 1 else SAMPLES
    return Interval(lo, hi, observed, method, len(seeds), p_value(reps))


def sign_flip_p_value(diffs: Sequence[float], rng: np.random.Generator, draws: int) -> float:
    """The two-sided p-value of "no difference" from k paired per-seed differences alone: the
    share of the 2^k sign patterns whose mean is at least as far from 0 as the observed one (an
    exact permutation test; drawn `draws` times, counting the data, when k > SIGN_FLIP_EXACT).

    Why not the bootstrap's tail here: over two or three seeds that agree in sign no bootstrap
    draw reaches 0, so its p-value would sit at its floor 2 / (B + 1) and survive any adjustment.
    The sign-flip test says what k seeds can say: at best 2 / 2^k (0.5 for two seeds)."""
    d = np.asarray(diffs, dtype=float)
    k, observed = d.size, abs(float(d.mean()))
    if k <= SIGN_FLIP_EXACT:
        signs = 1 - 2 * ((np.arange(2**k)[:, None] >> np.arange(k)) & 1)
        means = np.abs((signs * d).mean(axis=1))
        return float(np.mean(means >= observed * (1 - 1e-12)))  # ties within rounding count
    signs = rng.choice([-1.0, 1.0], size=(draws, k))
    hits = int(np.count_nonzero(np.abs((signs * d).mean(axis=1)) >= observed * (1 - 1e-12)))
    return (1 + hits) / (draws + 1)


def paired_seeds(
    diffs: Sequence[float], settings: Settings, rng: np.random.Generator
) -> Interval | None:
    """The interval from per-seed differences alone (its p-value: the sign-flip test); None
    under two seeds (nothing to vary)."""
    if len(diffs) < 2:
        return None
    reps = seed_replicates(diffs, settings.draws, rng)
    lo, hi = percentile_interval(reps, settings.level)
    p = sign_flip_p_value(diffs, rng, settings.draws)
    return Interval(lo, hi, float(np.mean(diffs)), SEEDS, len(diffs), p)
