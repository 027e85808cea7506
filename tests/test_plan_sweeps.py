"""The plan of real sweeps on the tiny model, and the check every launch makes first: a sweep run
partly (a point completed, one killed after a checkpoint, one held by a live lock, one new), its
plan, then the sweep itself, point by point; bad input stops a launch before anything starts."""

from __future__ import annotations

import hashlib
import re
import signal
import subprocess
from pathlib import Path

import pytest
from helpers import TINY, records, signal_at_row, train

from uapt import records as run_records
from uapt.run_lock import RunLock

pytestmark = pytest.mark.slow

OBJECTIVES = ("mle", "masked_mle", "self_distill", "masked_mle_distill")
BASE = [*TINY, "trainer.max_steps=40", "trainer.checkpoint_every=5", "experiment=plan"]
GRID = [*BASE, f"objective={','.join(OBJECTIVES)}"]


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file under root: its size and digest, and its modification time except the held
    lock's (its holder's heartbeat refreshes it)."""
    found = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stamp = None if path.name == "run.lock" else path.stat().st_mtime_ns
        found[str(path.relative_to(root))] = (
            path.stat().st_size,
            hashlib.sha256(path.read_bytes()).hexdigest(),
            stamp,
        )
    return found


def folder_of(runs: Path, objective: str) -> Path:
    from helpers import compose_run

    from uapt.plan import checked_run

    return run_records.run_dir(
        checked_run(compose_run(*BASE, f"objective={objective}", f"runs_dir={runs}")).plain
    )


def kill_after_checkpoint(runs: Path, objective: str) -> None:
    """Killed held before metrics row 13: steps 5 and 10 have their checkpoints."""
    args = ["-m", "uapt.train", *BASE, f"objective={objective}", f"runs_dir={runs}"]
    signal_at_row(args, 13, signal.SIGKILL, run=folder_of(runs, objective).name)


def plan_rows(output: str) -> dict[str, str]:
    """{objective: its plan line} from a plan's output."""
    rows = {}
    for line in output.splitlines():
        match = re.match(r"\s+tiny-arith-([a-z_]+)-r", line)
        if match:
            rows[match.group(1)] = line
    return rows


@pytest.fixture(scope="module")
def partial(tmp_path_factory) -> dict:
    runs = tmp_path_factory.mktemp("plan") / "runs"
    train(*BASE, "objective=mle", f"runs_dir={runs}", check=True)
    kill_after_checkpoint(runs, "masked_mle")
    held = folder_of(runs, "self_distill")
    held.mkdir(parents=True)
    with RunLock(held):  # a live holder: this test process
        before = snapshot(runs)
        planned = train("-m", *GRID, "plan=true", f"runs_dir={runs}", check=True)
        after = snapshot(runs)
        sweep_folder = (runs / ".sweeps").exists()
        swept = train("-m", *GRID, f"runs_dir={runs}", check=True)
    return {
        "runs": runs,
        "before": before,
        "after": after,
        "sweep_folder": sweep_folder,
        "plan": planned,
        "sweep": swept,
    }


def test_the_plan_changes_no_file(partial):
    assert partial["after"] == partial["before"]
    assert not partial["sweep_folder"]  # not even the sweep folder Hydra makes


def test_planned_states_are_what_the_sweep_then_does(partial):
    rows = plan_rows(partial["plan"].stdout)
    assert sorted(rows) == sorted(OBJECTIVES), partial["plan"].stdout
    step = int(re.search(r"partial → resume from step (\d+)", rows["masked_mle"]).group(1))
    assert "completed → skip" in rows["mle"]
    assert "held → skip (by pid" in rows["self_distill"]
    assert "new → train; 40 steps" in rows["masked_mle_distill"]
    assert f"{40 - step} steps" in rows["masked_mle"]
    total = [line for line in partial["plan"].stdout.splitlines() if line.startswith("total:")]
    assert total and total[0].startswith("total: 1 skip, 1 resume, 1 held (skip), 1 train;")

    assert "sweep: 2 completed, 2 skipped, 0 failed" in partial["sweep"].stdout
    done = {r["summary"]["objective"]: r for r in records(partial["runs"])}
    assert sorted(done) == ["masked_mle", "masked_mle_distill", "mle"]  # the held one: untouched
    assert done["mle"]["attempts"] == 1  # skipped, not trained again
    assert done["masked_mle"]["resumed_from_step"] == step and done["masked_mle"]["attempts"] == 2
    assert done["masked_mle_distill"]["resumed_from_step"] is None
    assert all(r["status"] == "completed" for r in done.values())


def test_why_new_names_the_edited_key(partial):
    proc = train(
        "-m", *GRID, "trainer.lr=2e-3", "plan=on", f"runs_dir={partial['runs']}", check=True
    )
    rows = plan_rows(proc.stdout)
    assert re.search(
        r"why new: trainer\.lr: 0\.001 → 0\.002 \(vs tiny-arith-mle-\S+, completed\)$", rows["mle"]
    )


def test_a_tuning_sweep_plans_its_trials_as_proposed_at_run_time(tmp_path):
    study = [
        *[a for a in TINY if not a.startswith("trainer.lr=")],
        "trainer.max_steps=3",
        "hydra/sweeper=uapt_optuna",
        "hydra.sweeper.grid={variant:[mle,masked_mle_r05]}",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.params={trainer.lr:'tag(log, interval(1e-4, 1e-2))'}",
    ]
    proc = train("-m", *study, "plan=on", f"runs_dir={tmp_path / 'runs'}", check=True)
    lines = [line for line in proc.stdout.splitlines() if "proposed at run time" in line]
    assert len(lines) == 2 and all(
        "tuning study, 3 trials" in line and "3 x 3 steps" in line for line in lines
    )
    assert "total: 6 proposed;" in proc.stdout
    assert not (tmp_path / "runs").exists()


def test_one_run_plans_too(tmp_path):
    proc = train(
        *TINY,
        "trainer.max_steps=5",
        "plan=on",
        "plan.device=h100",
        f"runs_dir={tmp_path / 'runs'}",
        check=True,
    )
    assert "plan of one run: 1 grid point(s)" in proc.stdout
    assert "new → train; 5 steps" in proc.stdout and "time on h100" in proc.stdout
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------- bad input
def one_line(proc: subprocess.CompletedProcess) -> str:
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, (proc.returncode, lines)
    return lines[0]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["plan=on", "plan.device=tpu"], "plan.device='tpu' is not one of"),
        (["plan=on", "plan.mfu=1.5"], "plan.mfu=1.5 is not a finite number in (0, 1]"),
        (["seed=range(0,0)"], "seed=range(0,0): sweeps over no value"),
        (["objective.mask_ratio=0.5,1.5"], "objective.mask_ratio=1.5 is not a finite number"),
        (["+trainer.bogus=1"], "trainer.bogus is not a known option"),
    ],
)
def test_bad_input_is_one_line_and_nothing_starts(tmp_path, overrides, needle):
    runs = tmp_path / "runs"
    proc = train("-m", *TINY, "objective=mle,masked_mle", *overrides, f"runs_dir={runs}")
    assert needle in one_line(proc)
    assert not runs.exists()


def test_an_invalid_point_starts_no_local_parallel_job(tmp_path):
    launcher = ["hydra/launcher=local_parallel", "hydra.launcher.array_parallelism=2"]
    proc = train(
        "-m",
        *TINY,
        *launcher,
        "objective=masked_mle",
        "objective.mask_ratio=0.5,1.5",
        f"runs_dir={tmp_path / 'runs'}",
    )
    assert "objective.mask_ratio=1.5 is not a finite number" in one_line(proc)
    assert not (tmp_path / "runs").exists()  # no run folder, sweep folder or submitit job folder
