"""Power analysis (uapt.table.power, `uapt-table --power`): the noise of a comparison read off
constructed outcomes, the MDE against closed forms and against the table's own interval on
simulated grids, the samples and seeds a target needs, and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_table import _ci_run

from uapt import bootstrap
from uapt.table.cli import main
from uapt.table.power import detectable, mde, noise, samples_needed, seeds_needed

Z975, Z80 = 1.959963984540054, 0.8416212335729143  # standard normal quantiles (tables)


def paired(cell: np.ndarray, base: np.ndarray) -> bootstrap.TaskSamples:
    num = np.stack([cell, base])[:, None, :].astype(float)
    return bootstrap.TaskSamples(num, np.ones_like(num))


def rademacher_grid(rng, n: int, k: int, sigma: float, tau: float, delta: float):
    """k paired seeds of n samples whose per-sample difference is delta + the seed's N(0, tau²)
    offset + sigma·(±1): a known per-sample SD and seed variance, with few distinct outcomes."""
    seeds = []
    for _ in range(k):
        offset = rng.normal(0, tau) if tau else 0.0
        base = (rng.random(n) < 0.5).astype(float)
        cell = base + delta + offset + sigma * rng.choice([-1.0, 1.0], n)
        seeds.append([paired(cell, base)])
    return seeds


def test_one_seed_gives_the_textbook_paired_mde():
    # differences with sample SD exactly 2 (ddof=1): ±a around 0.5, a = 2·sqrt((n-1)/n)
    n = 64
    a = 2 * math.sqrt((n - 1) / n)
    d = np.array([a, -a] * (n // 2)) + 0.5
    found = noise([[paired(d, np.zeros(n))]], scale=100)
    assert found.sample_sd == pytest.approx(200, rel=1e-12)  # scale 100: display units
    assert found.delta == pytest.approx(50, rel=1e-12)
    assert found.seeds == 1 and found.seed_sd is None and found.tau is None
    # (z_.975 + z_.8) σ / √n: the textbook paired MDE at 95 % and 80 % power
    assert mde(found, 0.95, 0.8) == pytest.approx((Z975 + Z80) * 200 / 8, rel=1e-9)


def test_seed_level_noise_is_read_off_the_per_seed_differences():
    n, offsets = 50, [0.0, 0.3, -0.3]
    seeds = []
    for off in offsets:
        d = np.array([1.0, -1.0] * (n // 2)) + off  # sample SD sqrt(n/(n-1)) within each seed
        seeds.append([paired(d, np.zeros(n))])
    found = noise(seeds, scale=1)
    s2 = (n / (n - 1)) / n
    assert found.sampling_var == pytest.approx(s2, rel=1e-12)
    assert found.seed_sd == pytest.approx(0.3, rel=1e-12)  # SD of (0, 0.3, -0.3)
    assert found.tau == pytest.approx(math.sqrt(0.09 - s2), rel=1e-12)
    k, t2 = 3, 0.09 - s2
    by_hand = Z975 * math.sqrt((s2 + 2 / 3 * (s2 + t2)) / k) + Z80 * math.sqrt((s2 + t2) / k)
    assert mde(found, 0.95, 0.8) == pytest.approx(by_hand, rel=1e-12)


def test_the_modelled_bootstrap_variance_is_the_bootstraps_own():
    """The B of the MDE is the variance of the table's replicates: (s² + (k-1)/k · S²) / k with
    S² the variance of the per-seed differences; checked on 40,000 replicates (a variance's
    relative Monte Carlo SE is √(2/draws) = 0.7 %: 4 % is over 5 SEs)."""
    rng = np.random.default_rng(7)
    seeds = rademacher_grid(rng, 200, 4, sigma=1.0, tau=0.2, delta=0.1)
    found = noise(seeds, scale=1)
    k = found.seeds
    modelled = (found.sampling_var + (k - 1) / k * found.seed_sd**2) / k
    reps = bootstrap.sample_replicates(seeds, 1.0, 40_000, np.random.default_rng(3))
    assert np.var(reps) == pytest.approx(modelled, rel=0.04)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "k", "tau"), [(400, 1, 0.0), (150, 3, 0.08)])
def test_a_true_effect_at_the_mde_is_detected_with_the_stated_power(n, k, tau):
    """Simulated grids with a true Δ equal to the MDE: the table's own interval (uapt.bootstrap,
    95 %) excludes 0 in 80 % of them. 400 grids: the rate's Monte Carlo SE is 2 points; the
    band is 3 SEs."""
    sigma, grids = 1.0, 400
    target = detectable(sigma**2 / n, tau**2, k, 0.95, 0.8)
    rng = np.random.default_rng(11)
    settings = bootstrap.Settings(0.95, 1000, 0)
    hits = 0
    for _ in range(grids):
        seeds = rademacher_grid(rng, n, k, sigma, tau, target)
        hits += bootstrap.paired_samples(seeds, 1.0, settings, rng).lo > 0
    se = math.sqrt(0.8 * 0.2 / grids)
    assert abs(hits / grids - 0.8) < 3 * se


def test_samples_and_seeds_needed_are_the_fewest_that_reach_the_target():
    found = noise(rademacher_grid(np.random.default_rng(5), 100, 3, 1.0, 0.1, 0.0), scale=1)
    target = 0.5 * mde(found, 0.95, 0.8)
    n = samples_needed(found, target, 0.95, 0.8)
    k = seeds_needed(found, target, 0.95, 0.8)
    assert mde(found, 0.95, 0.8, samples=n) <= target < mde(found, 0.95, 0.8, samples=n - 1)
    assert mde(found, 0.95, 0.8, seeds=k) <= target < mde(found, 0.95, 0.8, seeds=k - 1)
    # below what the seed-level variance alone allows at 3 seeds, no sample count gets there
    floor = detectable(0.0, found.tau**2, 3, 0.95, 0.8)
    assert samples_needed(found, 0.9 * floor, 0.95, 0.8) is None


def _power_runs(root, seeds=(0, 1, 2), with_outcomes=True):
    rng = np.random.default_rng(0)
    for seed in seeds:
        a = (rng.random(80) < 0.5).astype(float)
        b = np.where(rng.random(80) < 0.8, a, 1.0)
        for objective, side in (("A", a), ("B", b)):
            outcomes = {("qa", "acc"): dict(enumerate(map(float, side)))}
            outcomes[("mc", "acc")] = dict(enumerate(map(float, side[:30])))
            folder = _ci_run(root, objective, seed, outcomes, 1.0 + 0.01 * seed)
            if not with_outcomes:
                (folder / "eval_outcomes.jsonl").unlink()
    exp = root.parent / "ci.yaml"
    from test_table import CI_EXPERIMENT

    exp.write_text(CI_EXPERIMENT)
    return exp


def test_cli_prints_the_power_of_every_per_sample_delta(tmp_path, capsys):
    exp = _power_runs(tmp_path / "runs")
    runs = tmp_path / "runs"
    assert main([str(exp), "--runs", str(runs), "--power", "--mde", "5"]) == 0
    out = capsys.readouterr().out
    assert "## Power:" in out and "normal approximation of the table's two-level" in out
    row = next(line for line in out.splitlines() if line.startswith("| m / B | acc |"))
    assert "| 80 × 3 |" in row
    assert "No power row (not an eval metric): m / B: val loss." in out
    assert main([str(exp), "--runs", str(runs), "--power", "0.9"]) == 0
    assert "with 90 % power" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--power", "1.5"], "argument --power: expected a power strictly between 0 and 1"),
        (["--power", "0"], "argument --power: expected a power strictly between 0 and 1"),
        (["--power", "--mde", "0"], "argument --mde: expected an effect size > 0"),
        (["--power", "--mde", "-2"], "argument --mde: expected an effect size > 0"),
        (["--mde", "3"], "--mde needs --power"),
    ],
)
def test_bad_power_options_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    exp = _power_runs(tmp_path / "runs", seeds=(0,))
    with pytest.raises(SystemExit) as exit_:
        main([str(exp), "--runs", str(tmp_path / "runs"), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_power_without_per_sample_outcomes_names_the_runs(tmp_path, capsys):
    exp = _power_runs(tmp_path / "runs", seeds=(0, 1), with_outcomes=False)
    assert main([str(exp), "--runs", str(tmp_path / "runs"), "--power"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("uapt-table: error: --power needs per-sample outcomes (")
    assert "m-A-s0" in err and "m-B-s1" in err
