"""Failures are loud and harmless: NaN stops the run, Ctrl-C checkpoints, a failed write keeps the last."""

from __future__ import annotations

import errno
import signal

import pytest
import torch
from helpers import TINY, records, signal_at_row, train

from uapt import checkpoint

pytestmark = pytest.mark.slow


def test_non_finite_loss_fails_the_run_naming_step_and_checkpoint(tmp_path):
    # An absurd learning rate without clipping overflows the weights within a few steps.
    proc = train(
        *TINY,
        "trainer.max_steps=6",
        "trainer.lr=1e30",
        "trainer.grad_clip=0",
        "trainer.warmup_steps=0",
        "trainer.checkpoint_every=1",
        f"runs_dir={tmp_path}",
    )
    assert proc.returncode != 0
    (record,) = records(tmp_path)
    assert record["status"] == "failed"
    assert "non-finite loss" in record["error"] and "at step" in record["error"]
    assert "last good checkpoint" in record["error"]


def test_ctrl_c_checkpoints_and_exits_cleanly(tmp_path):
    args = [*TINY, "trainer.max_steps=8", f"runs_dir={tmp_path}"]
    # Ctrl-C in the middle of step 2 (computed, not yet logged): that step is finished and saved.
    stopped = signal_at_row(["-m", "uapt.train", *args], 2, signal.SIGINT)
    assert stopped.returncode != 0
    (record,) = records(tmp_path)
    assert record["status"] == "failed" and "stopped by SIGINT" in record["error"]
    (saved,) = tmp_path.glob("tiny-*/checkpoints/step-*")
    assert saved.name == "step-00000002" and checkpoint.problem(saved) is None
    assert "Traceback" not in stopped.output


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    model = _Model()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    first = checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainingState(1, {}, None), 2)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space"):
        checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainingState(2, {}, None), 2)
    assert checkpoint.latest(tmp_path) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]
