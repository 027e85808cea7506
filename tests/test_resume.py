"""A run killed at a random step resumes from its last checkpoint and ends bitwise identical."""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path

import pytest
import torch
from helpers import TINY, records, signal_at_row, train
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

ARGS = [*TINY, "trainer.max_steps=8", "trainer.checkpoint_every=2", "trainer.keep_checkpoints=2"]


def final_state(runs_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    (record,) = records(runs_dir)
    (run_dir,) = runs_dir.glob("tiny-*")
    return record, load_file(run_dir / "model" / "model.safetensors")


def kill_before_row(args: list[str], row: int) -> None:
    """SIGKILL `uapt-train args` with `row - 1` metric rows written, step `row` computed."""
    killed = signal_at_row(["-m", "uapt.train", *args], row, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL


@pytest.mark.parametrize("variant", ["mle", "masked_mle_distill"])
def test_kill9_then_rerun_equals_uninterrupted(variant, tmp_path):
    args = [*ARGS, f"objective={variant}"]
    train(*args, f"runs_dir={tmp_path / 'straight'}", check=True)

    killed = tmp_path / "killed"
    kill_at = random.Random(variant).randint(3, 7)  # after the first checkpoint (step 2)
    kill_before_row([*args, f"runs_dir={killed}"], kill_at + 1)
    (metrics,) = killed.glob("tiny-*/metrics.jsonl")
    assert len(metrics.read_text().splitlines()) == kill_at
    assert records(killed)[0]["status"] == "running"

    again = train(*args, f"runs_dir={killed}", check=True)
    assert "resuming from" in again.stdout + again.stderr
    (want, want_weights), (got, got_weights) = (
        final_state(tmp_path / "straight"),
        final_state(killed),
    )
    assert got["status"] == "completed" and got["resumed_from_step"] >= 2
    assert got["resumed_from_step"] == kill_at - kill_at % 2  # its newest checkpoint
    assert got["metrics"]["train/loss"] == want["metrics"]["train/loss"]
    assert got["metrics"]["val/loss"] == want["metrics"]["val/loss"]
    assert want_weights.keys() == got_weights.keys()
    assert all(torch.equal(want_weights[k], got_weights[k]) for k in want_weights)
    rows = [json.loads(r)["step"] for r in metrics.read_text().splitlines()]
    assert rows == list(range(1, 9))


def test_truncated_last_checkpoint_falls_back_to_the_previous_one(tmp_path):
    args = [*ARGS, "objective=mle", f"runs_dir={tmp_path}", "trainer.max_steps=6"]
    kill_before_row(args, 5)  # after the checkpoint of step 4, before the run's end (6)
    (newest,) = tmp_path.glob("tiny-*/checkpoints/step-00000004")
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    again = train(*args, check=True)
    log = again.stdout + again.stderr
    assert "skipping checkpoint" in log and "step-00000004" in log
    assert "step-00000002" in log
    assert records(tmp_path)[0]["resumed_from_step"] == 2
