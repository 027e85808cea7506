"""Scenario 5: a table and a plot from the runs the sweep scenario made.

README: "`uapt-table` prints a file in `experiments/` as a table (... mean ± std over seeds with n,
... the delta to a baseline column with a paired bootstrap confidence interval, ..., missing cells
shown as missing) and draws its plots". docs/tables.md: paths of written files (`wrote ...`) go to
stderr, so stdout stays the table; a metric without per-sample outcomes (the losses) gets a
seeds-only interval, which over two seeds spans the two paired differences.
"""

from __future__ import annotations

import json
import statistics

from uatlib import UAT, run_dirs, sh

EXPERIMENT = UAT / "experiments" / "uat_resume.yaml"


def _by_objective(runs, path: str) -> dict[str, dict[int, float]]:
    """The metric per objective and seed, read straight from the run records (the golden side)."""
    out: dict[str, dict[int, float]] = {}
    for folder in run_dirs(runs):
        record = json.loads((folder / "run.json").read_text())
        summary = record["summary"]
        out.setdefault(summary["objective"], {})[summary["seed"]] = record["metrics"][path]
    return out


def _signed(x: float) -> str:
    """As tables print a difference: 3 decimals, a sign, no "-0.000"."""
    text = f"{x:+.3f}"
    return "+" + text[1:] if float(text) == 0 else text


def test_table_shows_mean_and_std_over_seeds_and_a_plot(resumed_sweep, bin_dir, env):
    assert resumed_sweep.rerun.rc == 0, resumed_sweep.rerun
    home = resumed_sweep.home
    seen = sh(
        [bin_dir / "uapt-table", EXPERIMENT, "--runs", "runs", "--plot", "plots"],
        home,
        env,
        timeout=300,
    )
    assert seen.rc == 0, seen
    table = seen.out
    assert "UAT: mle vs masked_mle on the tiny model" in table
    for header in ("mle", "masked_mle", "tiny", "arith", "val loss", "train loss"):
        assert header in table, header
    assert "missing" not in table
    assert "Not aggregated" not in table  # every run completed after the re-run

    for path in ("val/loss", "train/loss"):
        values = _by_objective(home / "runs", path)
        assert sorted(values) == ["masked_mle", "mle"]
        for objective, by_seed in values.items():
            assert sorted(by_seed) == [0, 1], (objective, by_seed)
            xs = list(by_seed.values())
            cell = f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"
            if objective != "mle":  # the baseline column: others show their difference to it
                base = values["mle"]
                cell += f" ({_signed(statistics.mean(xs) - statistics.mean(base.values()))}"
                diffs = sorted(by_seed[s] - base[s] for s in (0, 1))
                interval = f"[{_signed(diffs[0])}, {_signed(diffs[1])}])"
                assert interval in table, f"{objective} {path}: expected {interval!r} in\n{table}"
            assert cell in table, f"{objective} {path}: expected {cell!r} in\n{table}"
    assert "n = 2 per cell" in table
    words = " ".join(table.split())  # notes wrap at the table's width
    assert "95 % percentile interval of Δ from a paired bootstrap (10000 draws, seed 0)" in words

    pngs = sorted((home / "plots").glob("*.png"))
    assert len(pngs) == 1, pngs
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote plots/{pngs[0].name}" in seen.err, seen
    assert "wrote" not in seen.out  # stdout stays the table
