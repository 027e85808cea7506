"""Scenario 4: a sweep killed (SIGKILL) during a later run, then the same command again.

README: "Re-running a sweep command after a crash, a kill or a failure skips completed runs (by run
id), re-runs failed and unfinished ones, resumes each from its newest checkpoint
(`trainer.checkpoint_every`), and ends with one line: `sweep: N completed, M skipped, K failed`".
"""

from __future__ import annotations

import json

from uatlib import run_dirs


def test_the_kill_left_two_runs_done_and_one_unfinished(resumed_sweep):
    runs = resumed_sweep.home / "runs"
    # The first launch never got to its summary line.
    assert "sweep:" not in resumed_sweep.killed.text
    assert resumed_sweep.killed_record["status"] == "running"  # killed: no chance to say otherwise
    assert resumed_sweep.killed_record["slug"] == resumed_sweep.killed_slug
    assert (runs / ".sweeps" / "uat_resume").is_dir()  # where Hydra keeps the sweep's own files


def test_rerun_skips_the_finished_and_resumes_the_killed(resumed_sweep):
    seen = resumed_sweep.rerun
    assert seen.rc == 0, seen
    # mle s0 and mle s1 were done; masked_mle s0 (killed) and masked_mle s1 run now.
    assert "sweep: 2 completed, 2 skipped, 0 failed" in seen.out, seen
    assert seen.text.count("already completed") == 2, seen
    assert "resuming from" in seen.text, seen

    records = [
        json.loads((d / "run.json").read_text()) for d in run_dirs(resumed_sweep.home / "runs")
    ]
    assert sorted(r["slug"] for r in records) == sorted(
        f"tiny-arith-{obj}-s{seed}"
        for obj in ("mle-r0-l0", "masked_mle-r0.5-l0")
        for seed in (0, 1)
    )
    assert {r["status"] for r in records} == {"completed"}
    assert {r["summary"]["experiment"] for r in records} == {"uat_resume"}
    # The killed run resumed: its metrics.jsonl has every step exactly once, none twice.
    (killed,) = (resumed_sweep.home / "runs").glob(f"{resumed_sweep.killed_slug}-*")
    steps = [
        json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == list(range(1, 7))
