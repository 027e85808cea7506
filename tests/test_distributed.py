"""`uapt-train` under torchrun (by hand, and by trainer.nproc): two CPU processes (gloo) log what
one process logs for the same global batch (every split is checked in-process in
test_invariance.py; here the launch paths, the run record and the logged rows)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, TINY, env, metric_rows, records, train

pytestmark = pytest.mark.slow

ARGS = [*TINY, "trainer.max_steps=3", "trainer.batch_size=8"]


def torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "uapt.train",
        *args,
    ]
    return subprocess.run(command, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600)


def losses(runs_dir) -> list[dict]:
    (run_dir,) = runs_dir.glob("tiny-*")
    return metric_rows(run_dir)


@pytest.mark.parametrize(
    ("variant", "extra", "launch"),
    [
        ("mle", [], "torchrun"),
        ("masked_mle_distill", ["objective.scope=batch"], "nproc"),
        ("masked_mle_distill", ["objective.scope=batch", "trainer.fsdp=true"], "nproc"),
    ],
    ids=["ddp-torchrun", "ddp-nproc", "fsdp-nproc"],
)
def test_two_ranks_match_one_process(variant, extra, launch, tmp_path):
    args = [*ARGS, f"objective={variant}", *extra]
    # One process: one micro-batch of 8. Two ranks: micro-batches of 2, two accumulation steps.
    train(*args, "trainer.micro_batch_size=8", f"runs_dir={tmp_path / 'one'}", check=True)
    two = [*args, "trainer.micro_batch_size=2", f"runs_dir={tmp_path / 'two'}"]
    if launch == "torchrun":
        proc = torchrun(*two)
        assert proc.returncode == 0, proc.stderr[-4000:]
    else:
        train(*two, "trainer.nproc=2", check=True)
    (record,) = records(tmp_path / "two")
    assert record["status"] == "completed" and record["world_size"] == 2
    assert record["id"] == records(tmp_path / "one")[0]["id"]  # the split is not semantic
    one, two_rows = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two_rows) == 3
    for a, b in zip(one, two_rows, strict=True):
        # float32 sums of the same terms in another order (see test_invariance.REL)
        for key in ("loss", "loss/mle", "loss/distill", "kept_frac", "grad_norm"):
            assert b[key] == pytest.approx(a[key], abs=1e-7, rel=1e-5), (key, a["step"])
        assert b.get("kept_overlap") == pytest.approx(a.get("kept_overlap")), a["step"]
