"""A run killed at a random step resumes from its last checkpoint and ends bitwise identical."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, env, records, train
from safetensors.torch import load_file

ARGS = [*TINY, "trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2"]


def final_state(runs_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    (record,) = records(runs_dir)
    (run_dir,) = runs_dir.glob("tiny-*")
    return record, load_file(run_dir / "model" / "model.safetensors")


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "uapt.train", *args],
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_steps(metrics: Path, steps: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= steps:
            return
        time.sleep(0.05)
    raise AssertionError(f"run did not reach step {steps} (exit code {proc.poll()})")


@pytest.mark.parametrize("variant", ["mle", "masked_mle_distill"])
def test_kill9_then_rerun_equals_uninterrupted(variant, tmp_path):
    args = [*ARGS, f"objective={variant}"]
    train(*args, f"runs_dir={tmp_path / 'straight'}", check=True)

    killed = tmp_path / "killed"
    kill_at = random.Random(variant).randint(3, 7)  # after the first checkpoint (step 2)
    proc = start([*args, f"runs_dir={killed}"])
    while not list(killed.glob("tiny-*/metrics.jsonl")) and proc.poll() is None:
        time.sleep(0.05)
    (metrics,) = killed.glob("tiny-*/metrics.jsonl")
    wait_for_steps(metrics, kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert records(killed)[0]["status"] == "running"

    again = train(*args, f"runs_dir={killed}", check=True)
    assert "resuming from" in again.stdout + again.stderr
    (want, want_weights), (got, got_weights) = (
        final_state(tmp_path / "straight"),
        final_state(killed),
    )
    assert got["status"] == "completed" and got["resumed_from_step"] >= 2
    assert got["metrics"]["train/loss"] == want["metrics"]["train/loss"]
    assert got["metrics"]["val/loss"] == want["metrics"]["val/loss"]
    assert want_weights.keys() == got_weights.keys()
    assert all(torch.equal(want_weights[k], got_weights[k]) for k in want_weights)
    rows = [json.loads(r)["step"] for r in metrics.read_text().splitlines()]
    assert rows == list(range(1, 9))


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    args = [*ARGS, "objective=mle", f"runs_dir={tmp_path}", "trainer.max_steps=6"]
    proc = start(args)
    while not list(tmp_path.glob("tiny-*/checkpoints/step-00000004")) and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (newest,) = tmp_path.glob("tiny-*/checkpoints/step-00000004")
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    again = train(*args, check=True)
    log = again.stdout + again.stderr
    assert "skipping checkpoint" in log and "step-00000004" in log
    assert "step-00000002" in log
    assert records(tmp_path)[0]["resumed_from_step"] == 2
