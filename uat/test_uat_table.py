"""Scenario 5: a table and a plot from the runs the sweep scenario made.

README: "`uapt-table` prints a file in `experiments/` as a table (... mean ± std over seeds with n,
... the delta to a baseline column ..., missing cells shown as missing) and draws its plots".
docs/tables.md: paths of written files (`wrote ...`) go to stderr, so stdout stays the table.
"""

from __future__ import annotations

import json
import statistics

from uatlib import UAT, run_dirs, sh

EXPERIMENT = UAT / "experiments" / "uat_resume.yaml"


def _by_objective(runs, path: str) -> dict[str, list[float]]:
    """The metric per objective, read straight from the run records (the golden side)."""
    out: dict[str, list[float]] = {}
    for folder in run_dirs(runs):
        record = json.loads((folder / "run.json").read_text())
        out.setdefault(record["summary"]["objective"], []).append(record["metrics"][path])
    return out


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
        for objective, xs in values.items():
            assert len(xs) == 2, (objective, xs)  # seeds 0 and 1
            cell = f"{statistics.mean(xs):.3f} ± {statistics.stdev(xs):.3f}"
            if objective != "mle":  # the baseline column: others show their difference to it
                cell += f" ({statistics.mean(xs) - statistics.mean(values['mle']):+.3f})"
            assert cell in table, f"{objective} {path}: expected {cell!r} in\n{table}"
    assert "n = 2 per cell" in table

    pngs = sorted((home / "plots").glob("*.png"))
    assert len(pngs) == 1, pngs
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote plots/{pngs[0].name}" in seen.err, seen
    assert "wrote" not in seen.out  # stdout stays the table
