"""What a table can resolve: the minimum detectable effect (MDE) of every delta, from the per-sample
outcomes of finished runs (a pilot's, or a grid's so far), and the samples and seeds that a target
MDE needs (`uapt-table <experiment> --power [P] [--mde X]`; docs/tables.md, "Power").

Method: the normal approximation of the table's own interval, the two-level paired bootstrap
(uapt.bootstrap: draw k paired seeds, then the n samples of each drawn seed). For one comparison
let s² be the sampling variance of one seed's paired difference (from the per-sample differences,
linearised for pooled metrics such as IFEval's instruction level: s² = σ²/n), and τ² the variance
of the per-seed differences that sampling does not explain (estimated as the variance of the
per-seed differences minus s², floored at 0; it needs two seeds). Then the estimate Δ̂ over k seeds
has variance V = (s² + τ²) / k, and the bootstrap's replicates have variance
B = (s² + (k - 1) / k · (s² + τ²)) / k (each draw re-picks the seeds and resamples within them,
which counts the sampling noise about twice: the interval is conservative). The interval excludes
0 when Δ̂ > z · √B, z = the level's two-sided quantile; a true effect δ does so with probability
`power` when

    δ = MDE = z_(1+level)/2 · √B + z_power · √V,

which for one seed is the textbook paired MDE (z_(1+level)/2 + z_power) · σ / √n. A metric that
spans several tasks scales every task's samples in proportion.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from uapt.bootstrap import TaskSamples
from uapt.table.cells import Table, cell_label, signed
from uapt.table.intervals import NoPerSampleOutcomes, Where, paired_sample_outcomes

DEFAULT_POWER = 0.8
METHOD = (
    "normal approximation of the table's two-level paired bootstrap (seeds, then samples within "
    "each seed); seed variance estimated from the runs' paired seeds"
)
MAX_SAMPLES = 10**9
MAX_SEEDS = 1000


@dataclass(frozen=True)
class Noise:
    """What one comparison's uncertainty is made of, in the metric's display units."""

    sampling_var: float  # s²: variance of one seed's Δ from its samples, at `samples`
    samples: int  # samples per seed (over the metric's tasks)
    seeds: int  # paired seeds
    seed_diffs: tuple[float, ...]  # Δ of each paired seed

    @property
    def sample_sd(self) -> float:
        """σ: standard deviation of one sample's paired difference (s² = σ² / n)."""
        return math.sqrt(self.sampling_var * self.samples)

    @property
    def seed_sd(self) -> float | None:
        """Standard deviation over paired seeds of the per-seed Δ (None for one seed)."""
        if self.seeds < 2:
            return None
        return float(np.std(self.seed_diffs, ddof=1))

    @property
    def tau(self) -> float | None:
        """Seed-level standard deviation of Δ beyond sampling: √max(0, seed_sd² − s²)."""
        sd = self.seed_sd
        return None if sd is None else math.sqrt(max(0.0, sd**2 - self.sampling_var))

    @property
    def delta(self) -> float:
        return float(np.mean(self.seed_diffs))


def noise(seeds: Sequence[Sequence[TaskSamples]], scale: float) -> Noise:
    """The Noise of a comparison from its paired per-sample outcomes (uapt.bootstrap.align)."""
    variances, diffs = [], []
    for tasks in seeds:
        var, diff = _one_seed(tasks)
        variances.append(var)
        diffs.append(diff)
    samples = sum(t.size for t in seeds[0])
    return Noise(
        sampling_var=scale**2 * float(np.mean(variances)),
        samples=samples,
        seeds=len(seeds),
        seed_diffs=tuple(scale * d for d in diffs),
    )


def _one_seed(tasks: Sequence[TaskSamples]) -> tuple[float, float]:
    """(variance, value) of one seed's Δ = mean over paths of (cell − baseline) pooled ratios.
    The variance is the delta method's: each sample's influence on the ratios, summed over the
    metric's paths, its variance over samples divided by their count, summed over tasks."""
    paths = sum(t.paths for t in tasks)
    variance = value = 0.0
    for task in tasks:
        ratio = task.num.sum(-1) / task.den.sum(-1)  # (side, path)
        influence = (task.num - ratio[..., None] * task.den) / task.den.mean(-1)[..., None]
        per_sample = (influence[0] - influence[1]).sum(0) / paths  # (samples,)
        variance += float(np.var(per_sample, ddof=1)) / task.size if task.size > 1 else 0.0
        value += float((ratio[0] - ratio[1]).sum()) / paths
    return variance, value


def z(probability: float) -> float:
    return NormalDist().inv_cdf(probability)


def detectable(sampling_var: float, tau2: float, seeds: int, level: float, power: float) -> float:
    """The MDE (module docstring) for a per-seed sampling variance s², a seed-level variance τ²
    and k paired seeds."""
    k = seeds
    v_estimate = (sampling_var + tau2) / k
    v_bootstrap = (sampling_var + (k - 1) / k * (sampling_var + tau2)) / k
    return z((1 + level) / 2) * math.sqrt(v_bootstrap) + z(power) * math.sqrt(v_estimate)


def mde(
    n: Noise, level: float, power: float, samples: float | None = None, seeds: int | None = None
) -> float:
    """The smallest true Δ the table's interval at `level` excludes 0 for with probability
    `power`, with `samples` per seed and `seeds` paired seeds (default: the runs')."""
    s2 = n.sampling_var * n.samples / (samples or n.samples)
    return detectable(s2, (n.tau or 0.0) ** 2, seeds or n.seeds, level, power)


def samples_needed(n: Noise, target: float, level: float, power: float) -> int | None:
    """The fewest samples per seed (at the runs' seeds) whose MDE is at most `target`; None
    when no number of samples gets there (the seed-level variance alone is too large)."""
    if mde(n, level, power, samples=MAX_SAMPLES) > target:
        return None
    lo, hi = 1, MAX_SAMPLES  # mde decreases in samples: bisect for the first that reaches it
    while lo < hi:
        mid = (lo + hi) // 2
        if mde(n, level, power, samples=mid) <= target:
            hi = mid
        else:
            lo = mid + 1
    return lo


def seeds_needed(n: Noise, target: float, level: float, power: float) -> int | None:
    """The fewest paired seeds (at the runs' samples) whose MDE is at most `target`."""
    return next(
        (k for k in range(1, MAX_SEEDS + 1) if mde(n, level, power, seeds=k) <= target), None
    )


# --------------------------------------------------------------------------- the table's report
@dataclass(frozen=True)
class PowerRow:
    where: Where
    noise: Noise
    mde: float
    samples_needed: int | None
    seeds_needed: int | None


@dataclass(frozen=True)
class PowerReport:
    rows: list[PowerRow]
    without: dict[str, list[Where]]  # reason -> comparisons without per-sample outcomes
    level: float
    power: float
    target: float | None


def power_report(table: Table, power: float, target: float | None = None) -> PowerReport:
    """A PowerRow for every delta of the table whose runs have per-sample outcomes."""
    rows, without = [], {}
    for where, cell in table.cells.items():
        if cell.delta is None:
            continue
        try:
            seeds = paired_sample_outcomes(table, where)
        except NoPerSampleOutcomes as e:
            without.setdefault(str(e), []).append(where)
            continue
        metric = next(m for m in table.experiment.cells if m.label == where[1])
        found = noise(seeds, metric.scale)
        level = table.ci.level
        rows.append(
            PowerRow(
                where,
                found,
                mde(found, level, power),
                None if target is None else samples_needed(found, target, level, power),
                None if target is None else seeds_needed(found, target, level, power),
            )
        )
    return PowerReport(rows, without, table.ci.level, power, target)


def render_power(table: Table, report: PowerReport) -> str:
    """The report as a Markdown table and its notes."""
    exp = table.experiment
    head = ["cell", "metric", "Δ", "n × k", "σ sample", "SD seeds", "τ", "MDE"]
    if report.target is not None:
        head += [f"samples for {report.target:g}", f"seeds for {report.target:g}"]
    lines = [
        f"## Power: {exp.title}",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + " |",
    ]
    for row in report.rows:
        (rk, label, ck), nz = row.where, row.noise
        d = next(m for m in exp.cells if m.label == label).decimals
        cells = [
            cell_label(exp, rk, ck),
            label,
            signed(nz.delta, d),
            f"{nz.samples} × {nz.seeds}",
            f"{nz.sample_sd:.{d + 1}f}",
            _opt(nz.seed_sd, d + 1),
            _opt(nz.tau, d + 1),
            f"{row.mde:.{d}f}",
        ]
        if report.target is not None:
            cells += [_count(row.samples_needed), _count(row.seeds_needed)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *(f"- {note}" for note in _notes(table, report))]
    return "\n".join(lines) + "\n"


def _opt(x: float | None, decimals: int) -> str:
    return "—" if x is None else f"{x:.{decimals}f}"


def _count(x: int | None) -> str:
    return "unreachable" if x is None else str(x)


def _notes(table: Table, report: PowerReport) -> list[str]:
    base = table.experiment.column.display(table.experiment.baseline, True)
    out = [
        f"Method: {METHOD}.",
        f"MDE: the smallest true Δ (vs {base}) that the table's {100 * report.level:g} % "
        f"interval excludes 0 for with {100 * report.power:g} % power, at n samples per seed "
        "and k paired seeds, in the metric's display units.",
        "σ sample: standard deviation of one sample's paired difference (linearised for pooled "
        "metrics); SD seeds: standard deviation of the per-seed Δ over paired seeds; τ: the part "
        "of it that sampling does not explain, √max(0, SD seeds² − σ²/n).",
    ]
    if any(row.noise.seeds < 2 for row in report.rows):
        out.append(
            "With one paired seed τ cannot be estimated: those MDEs assume none, so they "
            "understate what a grid with seed-to-seed variation needs."
        )
    if report.target is not None:
        out.append(
            f"samples for {report.target:g}: samples per seed at the runs' seeds; seeds for "
            f"{report.target:g}: paired seeds at the runs' samples; unreachable: the seed-level "
            "variance alone exceeds the target at any number of samples (or over "
            f"{MAX_SEEDS} seeds)."
        )
    for reason, wheres in report.without.items():
        names = sorted(
            {f"{cell_label(table.experiment, rk, ck)}: {label}" for rk, label, ck in wheres}
        )
        out.append(f"No power row ({reason}): {'; '.join(names)}.")
    return out


def describe_missing(report: PowerReport, table: Table) -> str:
    """One line for a table none of whose deltas has per-sample outcomes: which runs lack them."""
    base = table.experiment.baseline
    runs = sorted(
        {
            run.name
            for wheres in report.without.values()
            for rk, label, ck in wheres
            for column in (ck, base)
            for run in table.cells[(rk, label, column)].runs
        }
    )
    reasons = "; ".join(report.without) or "the table has no delta"
    shown = ", ".join(runs[:6]) + (f" and {len(runs) - 6} more" if len(runs) > 6 else "")
    return f"--power needs per-sample outcomes ({reasons}): runs {shown or '(none)'}"
