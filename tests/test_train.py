"""uapt-train end to end on the tiny model: every objective variant, records, skip, errors, W&B."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from helpers import TINY, metric_rows, records, train

pytestmark = pytest.mark.slow

LOGGED = [
    "loss",
    "loss/mle",
    "loss/distill",
    "kept_frac",
    "nll/kept",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "peak_mem_mb",
]


@pytest.mark.parametrize(
    "variant", ["mle", "masked_mle", "self_distill", "masked_mle_distill", "rho1"]
)
def test_every_variant_trains_three_steps(variant, tmp_path):
    train(*TINY, f"objective={variant}", "trainer.max_steps=3", f"runs_dir={tmp_path}", check=True)
    (record,) = records(tmp_path)
    assert record["status"] == "completed" and record["summary"]["objective"] == variant
    assert all(
        math.isfinite(record["metrics"][k]) for k in ("train/loss", "train/loss/mle", "val/loss")
    )
    rows = metric_rows(Path(record["config"]["runs_dir"]) / f"{record['slug']}-{record['id']}")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(k in rows[-1] for k in LOGGED)
    assert record["versions"]["torch"].startswith("2.13") and "git_commit" in record
    if variant in ("masked_mle", "masked_mle_distill", "rho1"):
        assert 0 < rows[-1]["kept_frac"] < 1 and "kept_overlap" in rows[-1]
    if variant in ("self_distill",):
        assert rows[-1]["loss/distill"] >= 0


def test_plain_mle_loss_falls_over_50_steps(tmp_path):
    train(*TINY, "objective=mle", "trainer.max_steps=50", f"runs_dir={tmp_path}", check=True)
    (run_dir,) = tmp_path.glob("tiny-*")
    losses = [r["loss"] for r in metric_rows(run_dir)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 1.0, (first, last)


def test_same_command_twice_does_not_train_twice(tmp_path):
    args = [*TINY, "trainer.max_steps=2", f"runs_dir={tmp_path}"]
    train(*args, check=True)
    first = records(tmp_path)[0]
    again = train(*args, check=True)
    assert "already completed" in again.stdout + again.stderr
    assert records(tmp_path)[0]["started_at"] == first["started_at"]
    train(*args, "force=true", check=True)
    assert records(tmp_path)[0]["attempts"] == 2


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("objective.mask_ratio=1.5", "objective.mask_ratio"),
        ("objective.scope=global", "objective.scope"),
        ("model.path=./missing-model", "model.path"),
    ],
)
def test_bad_config_fails_before_anything_is_written(override, needle, tmp_path):
    proc = train(*TINY, override, f"runs_dir={tmp_path}")
    assert proc.returncode == 2
    assert needle in proc.stderr + proc.stdout
    assert not any(tmp_path.iterdir())
