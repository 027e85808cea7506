"""Scenario 3: the README's "One run" command, its run folder, and running it a second time.

README: "Each run lives in `runs/<slug>-<id>/` ... running the same command again says the run is
complete and does not train twice". docs/run_record.md: the slug is
`<model>-<dataset>-<objective>-r<mask_ratio>-l<distill_weight>-s<seed>`, the id 10 hex digits,
and the folder holds run.json, metrics.jsonl and train.log.
"""

from __future__ import annotations

import json
import math
import re

from uatlib import run_dirs, sh

# masked_mle_distill is rho 0.5, lambda 1 (conf/objective/masked_mle_distill.yaml); seed 0 is the
# default: the slug docs/run_record.md shows for exactly this command.
SLUG = "tiny-arith-masked_mle_distill-r0.5-l1-s0"


def test_readme_command_is_the_one_we_expect(one_run):
    # If the README's line changes, this scenario must be revisited, not silently follow.
    assert one_run.command[1:] == [
        "model=tiny",
        "dataset=arith",
        "objective=masked_mle_distill",
        "trainer.max_steps=20",
    ]


def test_one_run_trains_and_leaves_its_record(one_run):
    seen = one_run.first
    assert seen.rc == 0, seen
    runs = one_run.home / "runs"
    (folder,) = run_dirs(runs)
    assert re.fullmatch(re.escape(SLUG) + r"-[0-9a-f]{10}", folder.name), folder.name
    # The log's last word names the record the user should open.
    assert f"completed {SLUG} -> runs/{folder.name}/run.json" in seen.text, seen

    record = json.loads((folder / "run.json").read_text())
    assert record["status"] == "completed"
    assert record["error"] is None
    assert folder.name == f"{record['slug']}-{record['id']}"
    assert record["summary"]["experiment"] is None  # a single run belongs to no sweep
    for key, want in {
        "model": "tiny",
        "dataset": "arith",
        "objective": "masked_mle_distill",
        "mask_ratio": 0.5,
        "distill_weight": 1.0,
        "seed": 0,
    }.items():
        assert record["summary"][key] == want, key
    assert math.isfinite(record["metrics"]["val/loss"])

    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))  # trainer.log_every=1
    for key in ("loss", "loss/mle", "loss/distill", "kept_frac", "lr", "grad_norm"):
        assert all(key in r for r in rows), key
    # rho = 0.5 keeps ceil(0.5 |V|) of each sequence's tokens: a bit over half.
    assert all(0.5 <= r["kept_frac"] < 0.6 for r in rows)
    assert (folder / "train.log").read_text().strip()
    # trainer.save_model (default true): a loadable model + tokenizer under <run>/model/
    for name in ("config.json", "model.safetensors", "tokenizer_config.json"):
        assert (folder / "model" / name).exists(), name
    # W&B is on and offline by default; `wandb sync runs/wandb/offline-run-*` uploads later.
    assert list((runs / "wandb").glob(f"offline-run-*-{record['id']}")), sorted(
        p.name for p in (runs / "wandb").iterdir()
    )


def test_same_command_again_says_completed_and_does_not_train(one_run, env):
    assert one_run.first.rc == 0, one_run.first
    (folder,) = run_dirs(one_run.home / "runs")
    before = {name: (folder / name).read_bytes() for name in ("run.json", "metrics.jsonl")}

    again = sh(one_run.command, one_run.home, env, timeout=300)

    assert again.rc == 0, again
    assert f"{SLUG} already completed in runs/{folder.name}" in again.text, again
    assert "not training again (force=true to override)" in again.text, again
    assert "train:" not in again.err  # no progress bar: nothing trained
    assert run_dirs(one_run.home / "runs") == [folder]
    assert {name: (folder / name).read_bytes() for name in before} == before
