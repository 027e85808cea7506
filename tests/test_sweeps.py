"""Sweeps: a killed sweep re-run finishes only what is missing; one failure never stops the rest."""

from __future__ import annotations

import signal

import pytest
from helpers import TINY, records, signal_at_row, train

pytestmark = pytest.mark.slow

GRID = [*TINY, "trainer.max_steps=2", "experiment=grid", "objective=mle,masked_mle", "seed=0,1"]
# Hydra's basic sweeper runs the product in override order: the third run is masked_mle, seed 0.
THIRD = "tiny-arith-masked_mle-r0.5-l0-s0-*"


def test_killed_sweep_reruns_only_what_is_missing(tmp_path):
    args = ["-m", *GRID, f"runs_dir={tmp_path}"]
    killed = signal_at_row(["-m", "uapt.train", *args], 1, signal.SIGKILL, run=THIRD)
    assert killed.returncode == -signal.SIGKILL  # during the third run, before its first row
    before = {r["id"]: r for r in records(tmp_path)}
    done = {i for i, r in before.items() if r["status"] == "completed"}
    assert len(done) == 2 and len(before) == 3

    again = train(*args, check=True)
    assert "sweep: 2 completed, 2 skipped, 0 failed" in again.stdout
    after = {r["id"]: r for r in records(tmp_path)}
    assert len(after) == 4 and all(r["status"] == "completed" for r in after.values())
    for run_id in done:  # not retrained
        assert after[run_id]["started_at"] == before[run_id]["started_at"]
        assert after[run_id]["attempts"] == 1


def test_one_failing_point_does_not_stop_the_sweep(tmp_path):
    """A point that fails when it runs (its model folder does not load: no check can see that
    before) is one failed point; the others run. A bad value is refused before the sweep starts
    (tests/test_plan_sweeps.py)."""
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    runs = tmp_path / "runs"
    proc = train(
        "-m",
        *TINY,
        "trainer.max_steps=2",
        "experiment=bad",
        f"runs_dir={runs}",
        f"model.path=null,{empty}",
    )
    assert proc.returncode == 1  # the sweep as a whole is not complete
    done = [r for r in records(runs) if r["status"] == "completed"]
    assert len(done) == 1 and done[0]["config"]["model"]["path"] is None
    summary = [line for line in proc.stdout.splitlines() if line.startswith("sweep:")]
    assert summary and summary[0].startswith("sweep: 1 completed, 0 skipped, 1 failed")
    assert f"Unrecognized model in {empty}" in summary[0]  # the failed point, named
