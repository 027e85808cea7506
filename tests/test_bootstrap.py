"""uapt.bootstrap against closed forms: the normal approximation of a paired difference, the
variance of the two-level design (law of total variance), the range that a seeds-only interval
over two or three seeds spans; and its exact symmetries.

Golden values are computed here from the constructed outcomes with numpy and `statistics`,
never by the module under test. Tolerances are Monte Carlo standard errors derived from the
number of draws (each test says how), at 4 standard errors: a false failure about once in
16,000 runs of a check.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import sys
import time

import numpy as np
import pytest

from uapt import bootstrap
from uapt.bootstrap import (
    Settings,
    TaskSamples,
    align,
    paired_samples,
    paired_seeds,
    percentile_interval,
    rng_for,
    sample_replicates,
    seed_replicates,
)

NORMAL = statistics.NormalDist()
ALWAYS_KINDS, ALWAYS_INDICES = 0, 10**9  # bootstrap.KIND_COST forcing either exact method


def numbers(a, b) -> TaskSamples:
    """One path of per-sample numbers: `a` for the cell, `b` for the baseline."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return TaskSamples(np.stack([a, b])[:, None, :], np.ones((2, 1, a.size)))


def paired_binary(rng, size: int, p_cell: float, agree: float) -> tuple[np.ndarray, np.ndarray]:
    """0/1 outcomes of two objectives on the same samples: the baseline repeats the cell's
    outcome on a fraction `agree` of them (what makes pairing matter), else is a coin flip."""
    a = (rng.random(size) < p_cell).astype(float)
    b = np.where(rng.random(size) < agree, a, (rng.random(size) < 0.5).astype(float))
    return a, b


def swapped(task: TaskSamples) -> TaskSamples:
    return TaskSamples(task.num[::-1].copy(), task.den[::-1].copy())


def quantile_se(sd: float, q: float, draws: int) -> float:
    """Monte Carlo standard error of the q-quantile of `draws` normal replicates of std `sd`:
    sqrt(q (1 - q) / B) over the density at the quantile (the asymptotic law of a quantile)."""
    return sd * math.sqrt(q * (1 - q) / draws) / (NORMAL.pdf(NORMAL.inv_cdf(q)) * 1.0)


def variance_rel_tol(draws: int) -> float:
    """4 standard errors of the sample variance of `draws` near-normal replicates, relative:
    Var(s^2) = 2 sigma^4 / (B - 1)."""
    return 4 * math.sqrt(2 / (draws - 1))


# --------------------------------------------------------------------------- one seed: samples


@pytest.mark.parametrize("kind_cost", [ALWAYS_KINDS, ALWAYS_INDICES])
@pytest.mark.parametrize(("level", "draws"), [(0.95, 10_000), (0.9, 20_000)])
def test_one_seed_matches_the_normal_approximation(monkeypatch, kind_cost, level, draws):
    monkeypatch.setattr(bootstrap, "KIND_COST", kind_cost)
    size = 4000
    a, b = paired_binary(np.random.default_rng(7), size, 0.62, agree=0.7)
    d = a - b
    mean, sd = d.mean(), d.std(ddof=0) / math.sqrt(size)  # the bootstrap law of mean(d)
    z = NORMAL.inv_cdf(1 - (1 - level) / 2)
    ci = paired_samples([[numbers(a, b)]], 100.0, Settings(level, draws, 0), rng_for(0, "t"))
    # Tolerance per end, in points: 4 Monte Carlo standard errors of the quantile, plus how far
    # the bootstrap law of a mean of n = 4000 resampled differences is from the normal: its
    # skewness skew(d)/sqrt(n) moves a quantile by sd * skew * (z^2 - 1) / 6 (Cornish-Fisher),
    # and it lives on a lattice of step 1/n.
    skew = float(np.mean((d - mean) ** 3) / d.std() ** 3) / math.sqrt(size)
    tail = (1 - level) / 2
    tol = 100 * (4 * quantile_se(sd, tail, draws) + sd * abs(skew) * (z * z - 1) / 6 + 1 / size)
    assert (ci.method, ci.seeds) == ("samples", 1)
    assert ci.estimate == pytest.approx(100 * mean, abs=1e-9)
    assert ci.lo == pytest.approx(100 * (mean - z * sd), abs=tol)
    assert ci.hi == pytest.approx(100 * (mean + z * sd), abs=tol)
    assert ci.significant == (ci.lo > 0)
    # the check has teeth: resampling the two columns independently would be this much wider
    unpaired = math.sqrt(a.var() + b.var()) / math.sqrt(size)
    assert 100 * z * (unpaired - sd) > 5 * tol


def test_list_outcomes_pool_their_items_like_lm_eval():
    """IFEval's instruction-level accuracy: a list per prompt, the metric pools all items.
    With three items per prompt the pooled mean is the mean of the per-prompt means, so the
    normal approximation of d_i = mean(a_i) - mean(b_i) applies."""
    rng = np.random.default_rng(5)
    size, items = 3000, 3
    a = (rng.random((size, items)) < 0.6).astype(float)
    b = np.where(rng.random((size, items)) < 0.6, a, (rng.random((size, items)) < 0.5))
    cell = {doc: list(a[doc]) for doc in range(size)}
    base = {doc: [float(x) for x in b[doc]] for doc in range(size)}
    task, docs = align([cell], [base])
    assert docs == list(range(size)) and task.den.min() == items
    d = a.mean(axis=1) - b.mean(axis=1)
    sd = d.std(ddof=0) / math.sqrt(size)
    z = NORMAL.inv_cdf(0.975)
    ci = paired_samples([[task]], 1.0, Settings(), rng_for(0, "lists"))
    skew = float(np.mean((d - d.mean()) ** 3) / d.std() ** 3) / math.sqrt(size)
    tol = 4 * quantile_se(sd, 0.025, 10_000) + sd * abs(skew) * (z * z - 1) / 6 + 1 / size
    assert ci.lo == pytest.approx(d.mean() - z * sd, abs=tol)
    assert ci.hi == pytest.approx(d.mean() + z * sd, abs=tol)


def test_unequal_lists_give_the_pooled_estimate_and_empty_ones_drop_out():
    cell = {0: [1, 1, 0], 1: [1], 2: [0, 0], 3: [], 4: [1], "x": [1, 0]}
    base = {0: [1, 0, 0], 1: [0], 2: [1, 0], 3: [1], 5: [1], "x": [0, 0]}
    task, docs = align([cell], [base])
    assert docs == [0, 1, 2, "x"]  # shared ids with items on both sides, ints before strings
    ci = paired_samples([[task]], 1.0, Settings(draws=200), rng_for(0, "u"))
    cell_pooled = (2 + 1 + 0 + 1) / (3 + 1 + 2 + 2)  # items pooled over the kept prompts
    base_pooled = (1 + 0 + 1 + 0) / (3 + 1 + 2 + 2)
    assert ci.estimate == pytest.approx(cell_pooled - base_pooled, abs=1e-12)


# --------------------------------------------------------------------------- seeds and samples


def test_two_levels_resample_seeds_then_fresh_samples_for_every_drawn_seed():
    """T = the mean over n slots X_j, iid: a seed S drawn uniformly, then the mean of its
    resampled differences. Law of total variance: Var[X] = Var_S(m_S) + E_S[v_S] with m_S the
    seed's mean difference and v_S = var(d_S) / size_S; Var[T] = Var[X] / n."""
    rng = np.random.default_rng(11)
    sizes = (300, 500, 800)
    seeds, m, v = [], [], []
    for s, size in enumerate(sizes):
        a, b = paired_binary(rng, size, 0.55 + 0.03 * s, agree=0.5)
        seeds.append([numbers(a, b)])
        m.append((a - b).mean())
        v.append((a - b).var() / size)
    n, m, v = len(sizes), np.array(m), np.array(v)
    var_x = m.var() + v.mean()
    expected_var = var_x / n
    draws = 40_000
    reps = sample_replicates(seeds, 1.0, draws, rng_for(0, "two"))
    # Monte Carlo error. Mean: sqrt(Var/B). Variance: sqrt((mu4(T) - Var^2) / B), with the
    # fourth central moment of a mean of n iid slots mu4(T) = (mu4(X) + 3 (n - 1) Var[X]^2) / n^3
    # and X given S near N(m_S, v_S) (central limit): mu4(X) = E[c^4 + 6 c^2 v_S + 3 v_S^2].
    c = m - m.mean()
    mu4_x = float(np.mean(c**4 + 6 * c**2 * v + 3 * v**2))
    se_var = math.sqrt(((mu4_x + 3 * (n - 1) * var_x**2) / n**3 - expected_var**2) / draws)
    assert reps.mean() == pytest.approx(m.mean(), abs=4 * math.sqrt(expected_var / draws))
    assert reps.var() == pytest.approx(expected_var, abs=4 * se_var)
    # Teeth: reusing one resample for all the slots that drew the same seed would give a noise
    # term (2 - 1/n) E[v] / n (E[c_s^2] = 2 - 1/n); resampling samples only, no Var_S(m) / n.
    reused = (m.var() + (2 - 1 / n) * v.mean()) / n
    samples_only = v.mean() / n
    assert abs(reused - expected_var) > 8 * se_var
    assert abs(samples_only - expected_var) > 8 * se_var
    ci = paired_samples(seeds, 1.0, Settings(), rng_for(0, "two"))
    assert (ci.method, ci.seeds) == ("samples+seeds", 3)
    assert ci.estimate == pytest.approx(m.mean(), abs=1e-12)


def test_each_task_draws_its_own_samples_and_the_paths_of_a_task_share_them():
    """A metric averaging two paths whose differences are the same d: when the paths are of one
    task (same samples), the indices are shared and Var = v; from two tasks they are drawn
    independently and Var = v / 2 (v = var(d) / n)."""
    size, draws = 2000, 20_000
    a, b = paired_binary(np.random.default_rng(3), size, 0.6, agree=0.3)
    v = (a - b).var() / size
    one = numbers(a, b)
    two_paths = TaskSamples(np.repeat(one.num, 2, axis=1), np.repeat(one.den, 2, axis=1))
    within = sample_replicates([[two_paths]], 1.0, draws, rng_for(0, "within")).var()
    across = sample_replicates([[one, one]], 1.0, draws, rng_for(0, "across")).var()
    assert within == pytest.approx(v, rel=variance_rel_tol(draws))
    assert across == pytest.approx(v / 2, rel=variance_rel_tol(draws))


@pytest.mark.parametrize("kind_cost", [ALWAYS_KINDS, ALWAYS_INDICES])
def test_identical_runs_give_a_zero_width_interval_at_zero(monkeypatch, kind_cost):
    monkeypatch.setattr(bootstrap, "KIND_COST", kind_cost)
    rng = np.random.default_rng(2)
    a = rng.random(500).round(1)  # a few kinds: both methods are exercised by kind_cost
    lists = TaskSamples(np.stack([[rng.integers(0, 3, 80)]] * 2) * 1.0, np.full((2, 1, 80), 3.0))
    for seeds in ([[numbers(a, a)]], [[numbers(a, a), lists]] * 3):
        ci = paired_samples(seeds, 100.0, Settings(), rng_for(0, "same"))
        assert (ci.lo, ci.hi, ci.estimate, ci.significant) == (0.0, 0.0, 0.0, False)
        assert ci.p_value == 1.0  # every draw at 0 counts on both sides
    ci = paired_seeds([0.0, 0.0, 0.0], Settings(), rng_for(0, "same"))
    assert ci is not None and (ci.lo, ci.hi, ci.significant, ci.p_value) == (0.0, 0.0, False, 1.0)


@pytest.mark.parametrize("kind_cost", [ALWAYS_KINDS, ALWAYS_INDICES])
@pytest.mark.parametrize("n_seeds", [1, 3])
def test_swapping_the_columns_negates_the_interval_exactly(monkeypatch, kind_cost, n_seeds):
    monkeypatch.setattr(bootstrap, "KIND_COST", kind_cost)
    rng = np.random.default_rng(4)
    seeds = []
    for _ in range(n_seeds):
        a, b = paired_binary(rng, 200, 0.6, agree=0.5)
        lists = TaskSamples(rng.integers(0, 3, (2, 2, 60)) * 1.0, np.full((2, 2, 60), 2.0))
        seeds.append([numbers(a, b), lists])
    settings = Settings(0.9, 3001, 5)
    ci = paired_samples(seeds, 100.0, settings, rng_for(5, "pair"))
    back = paired_samples([[swapped(t) for t in ts] for ts in seeds], 100.0, settings,
                          rng_for(5, "pair"))  # fmt: skip
    assert (back.lo, back.hi, back.estimate) == (-ci.hi, -ci.lo, -ci.estimate)
    assert back.p_value == ci.p_value and ci.lo < ci.hi
    diffs = [0.3, -1.7, 2.2, 0.9]
    ci = paired_seeds(diffs, settings, rng_for(5, "s"))
    back = paired_seeds([-x for x in diffs], settings, rng_for(5, "s"))
    assert (back.lo, back.hi, back.estimate) == (-ci.hi, -ci.lo, -ci.estimate)


# --------------------------------------------------------------------------- p-values


@pytest.mark.parametrize(
    ("replicates", "p"),
    [
        ([1.0, 2.0, 3.0, 4.0], 2 * 1 / 5),  # none at or below 0: the floor 2 / (B + 1)
        ([-1.0, 2.0, 3.0, 4.0, 5.0], 2 * 2 / 6),
        ([-3.0, -1.0, 0.0, 2.0], 1.0),  # 2 min(1 + 3, 1 + 2) / 5 = 1.2, capped
        ([0.0, 0.0, 0.0], 1.0),
        ([-1.0] * 9, 2 / 10),
    ],
)
def test_p_value_counts_the_draws_beyond_zero_with_one_more(replicates, p):
    assert bootstrap.p_value(np.array(replicates)) == pytest.approx(p, abs=1e-15)


def test_p_value_of_a_constructed_effect_matches_the_normal_approximation():
    """n = 12,000 paired samples whose differences are +1 on 570, -1 on 510, 0 elsewhere: the
    bootstrap law of their mean is about N(m, s^2), m = 60/n, s = sd(d)/sqrt(n), so the two-sided
    p-value of 0 is 2 Phi(-m/s) (about 0.068). Tolerance: 4 binomial standard errors of the
    share of draws at or below 0 (doubled), the +1 (2 / (B + 1)), the Cornish-Fisher shift of the
    law's skewness skew(d)/sqrt(n) at z = m/s, and twice its lattice's half-step correction
    (steps of 1/n, a density phi(z)/s there)."""
    size, draws = 12_000, 20_000
    d = np.zeros(size)
    d[:570], d[570:1080] = 1.0, -1.0
    b = np.where(np.arange(size) % 3 == 0, 1.0, 0.0) * (d == 0)  # shared outcomes off the diff
    b[570:1080] = 1.0
    a = b + d
    assert set(np.unique(a)) <= {0.0, 1.0} and set(np.unique(b)) <= {0.0, 1.0}
    m, s = d.mean(), d.std(ddof=0) / math.sqrt(size)
    z = m / s
    expected = 2 * NORMAL.cdf(-z)
    ci = paired_samples([[numbers(a, b)]], 1.0, Settings(0.95, draws, 0), rng_for(0, "p"))
    q = expected / 2
    skew = float(np.mean((d - m) ** 3) / d.std() ** 3) / math.sqrt(size)
    tol = (
        2 * 4 * math.sqrt(q * (1 - q) / draws)
        + 2 / (draws + 1)
        + 2 * NORMAL.pdf(z) * abs(skew) * abs(z * z - 1) / 6
        + 2 * NORMAL.pdf(z) / (size * s)
    )
    assert 0.05 < expected < 0.09 and tol < expected / 3  # a p-value this check can tell
    assert ci.p_value == pytest.approx(expected, abs=tol)
    # teeth: one-sided, or from unpaired resampling, would be off by more than the tolerance
    unpaired = 2 * NORMAL.cdf(-m / (math.sqrt(a.var() + b.var()) / math.sqrt(size)))
    assert abs(expected / 2 - expected) > tol and abs(unpaired - expected) > tol


@pytest.mark.parametrize("level", [0.8, 0.9, 0.95, 0.99])
def test_a_p_value_at_or_below_alpha_means_the_interval_excludes_zero(level):
    """The promise the table's marks rest on (uapt.bootstrap.p_value): on draws of every shape
    (lattices with ties at 0, few and many draws) p <= 1 - level implies the interval at
    `level` excludes 0."""
    rng = np.random.default_rng(11)
    alpha, seen = 1 - level, 0
    for _ in range(3000):
        size = int(rng.integers(1, 400))
        shift = rng.normal(0, 2)
        reps = np.round(rng.normal(shift, 1, size) * rng.choice([1, 2, 10])) / 2
        p = bootstrap.p_value(reps)
        lo, hi = percentile_interval(reps, level)
        if p <= alpha:
            seen += 1
            assert lo > 0 or hi < 0, (p, lo, hi, size)
    assert seen > 100  # the implication was exercised


# --------------------------------------------------------------------------- seeds only


@pytest.mark.parametrize("diffs", [[-0.1, -0.08], [9.0, 6.0, 9.0], [1.5, -2.0, 4.0]])
def test_seeds_only_over_two_or_three_seeds_spans_their_range(diffs):
    """At 95 %, the 2.5 % quantile of the means of n resampled differences is the smallest
    difference as soon as more than 2.5 % of the draws take its seed n times (chance n^-n: 1/4,
    1/27); with 10,000 draws, 370 expected for n = 3 against 251 needed: 6 standard deviations."""
    ci = paired_seeds(diffs, Settings(), rng_for(0, "range"))
    assert ci is not None and (ci.method, ci.seeds) == ("seeds", len(diffs))
    assert ci.lo == pytest.approx(min(diffs), abs=1e-12)
    assert ci.hi == pytest.approx(max(diffs), abs=1e-12)
    assert ci.estimate == pytest.approx(statistics.mean(diffs), abs=1e-12)


def test_seeds_only_has_the_variance_of_a_resampled_mean_and_needs_two_seeds():
    diffs = [0.4, -0.2, 1.1, 0.7, 0.0, 0.9, 1.6, -0.5]
    draws = 20_000
    reps = seed_replicates(diffs, draws, rng_for(0, "var"))
    # a mean of n draws with replacement: Var = var(d, ddof=0) / n; its law is a sum of 8 draws
    # from a short-tailed set, close enough to normal for the variance's standard error
    expected = float(np.var(diffs)) / len(diffs)
    assert reps.var() == pytest.approx(expected, rel=variance_rel_tol(draws) * 1.2)
    assert paired_seeds([0.5], Settings(), rng_for(0, "one")) is None


# --------------------------------------------------------------------------- mechanics


def test_the_same_seed_gives_the_same_draws():
    a, b = paired_binary(np.random.default_rng(8), 300, 0.5, agree=0.5)
    seeds = [[numbers(a, b)], [numbers(b, a)]]
    first = sample_replicates(seeds, 1.0, 5000, rng_for(3, "k"))
    assert np.array_equal(first, sample_replicates(seeds, 1.0, 5000, rng_for(3, "k")))
    assert not np.array_equal(first, sample_replicates(seeds, 1.0, 5000, rng_for(4, "k")))
    assert not np.array_equal(first, sample_replicates(seeds, 1.0, 5000, rng_for(3, "other")))


def test_the_generator_does_not_depend_on_the_process():
    """rng_for hashes its key itself: Python's string hash changes with PYTHONHASHSEED."""
    code = "from uapt.bootstrap import rng_for; print(rng_for(7, 'row', 'metric').random(3))"
    outs = [
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONHASHSEED": seed},
            check=True,
            timeout=120,
        ).stdout
        for seed in ("1", "2")
    ]
    assert outs[0] == outs[1] and outs[0].strip()


@pytest.mark.parametrize("size", [1, 2, 7, 10_001])
@pytest.mark.parametrize("level", [0.5, 0.9, 0.95, 0.999])
def test_percentile_interval_is_numpys_linear_percentile(size, level):
    reps = np.random.default_rng(size).normal(size=size)
    lo, hi = percentile_interval(reps, level)
    tail = 100 * (1 - level) / 2
    assert lo == pytest.approx(np.percentile(reps, tail), rel=1e-12, abs=1e-12)
    assert hi == pytest.approx(np.percentile(reps, 100 - tail), rel=1e-12, abs=1e-12)
    assert percentile_interval(-reps, level) == (-hi + 0.0, -lo + 0.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"level": 0.0}, "level"),
        ({"level": 1.0}, "level"),
        ({"level": float("nan")}, "level"),
        ({"draws": 0}, "draws"),
        ({"draws": bootstrap.MAX_DRAWS + 1}, "draws"),
        ({"seed": -1}, "seed"),
    ],
)
def test_settings_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Settings(**kwargs)


def test_no_samples_or_seeds_is_an_error_not_a_nan():
    empty = numbers([], [])
    with pytest.raises(ValueError, match="zero samples"):
        sample_replicates([[empty]], 1.0, 10, rng_for(0, "e"))
    with pytest.raises(ValueError, match="no paired seed"):
        sample_replicates([], 1.0, 10, rng_for(0, "e"))


@pytest.mark.parametrize(("size", "continuous"), [(1319, False), (817, True)])
def test_ten_thousand_draws_are_vectorised(size, continuous):
    """GSM8K's test set (1319, 0/1 outcomes) and TruthfulQA MC2's (817, a probability per
    sample), three seeds. Measured about 0.02 s and 0.15 s on two busy cores; the bound only
    catches a Python loop over draws or samples, which takes minutes."""
    rng = np.random.default_rng(0)
    seeds = []
    for _ in range(3):
        a, b = (rng.random(size), rng.random(size))
        if not continuous:
            a, b = (a < 0.5) * 1.0, (b < 0.4) * 1.0
        seeds.append([numbers(a, b)])
    start = time.perf_counter()
    paired_samples(seeds, 100.0, Settings(), rng_for(0, "speed"))
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ([0.3, 0.5], 0.5),  # two seeds that agree: 2 of the 4 sign patterns are as extreme
        ([0.3, 0.5, 0.1], 0.25),  # three: 2 of 8
        # by hand: |±1 ±2 ±3 ±1| >= 5 for +1+2+3+1, +1+2+3-1, -1+2+3+1 and their negatives
        ([1.0, 2.0, 3.0, -1.0], 6 / 16),
        ([1.0, -1.0], 1.0),
    ],
)
def test_seeds_only_p_value_is_the_exact_sign_flip_test(diffs, expected):
    ci = paired_seeds(diffs, Settings(0.95, 1000, 0), rng_for(0, "flip"))
    assert ci.p_value == pytest.approx(expected, rel=1e-12)


def test_sign_flip_p_value_past_the_exact_limit_is_drawn_and_close_to_exact():
    """17 seeds: 2,000 drawn patterns (the data counted as one more) against the exact share,
    within 4 binomial standard errors."""
    from uapt.bootstrap import sign_flip_p_value

    diffs = [0.2, -0.1, 0.4, 0.3, -0.2, 0.5, 0.1, 0.05, -0.3, 0.2, 0.3, 0.1, -0.05, 0.4, 0.2,
             0.1, -0.1]  # fmt: skip
    k = len(diffs)
    signs = 1 - 2 * ((np.arange(2**k)[:, None] >> np.arange(k)) & 1)
    exact = float(np.mean(np.abs((signs * np.array(diffs)).mean(1)) >= abs(np.mean(diffs)) - 1e-12))
    drawn = sign_flip_p_value(diffs, rng_for(0, "many"), 2000)
    assert drawn == pytest.approx(exact, abs=4 * (exact * (1 - exact) / 2000) ** 0.5 + 1 / 2001)
