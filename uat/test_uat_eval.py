"""Scenario 7: evaluating a finished run's saved model with `uapt-eval`.

README: "`uapt-eval model=... eval=... checkpoint=<run>` evaluates a saved model standalone".
docs/evaluation.md: `checkpoint=` takes "a run folder or its `checkpoints/` ..., a saved Hugging
Face model folder (`config.json`)"; `output=<file.json>` writes the results; "It prints a table of
every metric with its stderr". The run is the one scenario 3 trained (trainer.save_model is on by
default, so it has `<run>/model/` and, with checkpoint_every=0, no checkpoints).
"""

from __future__ import annotations

import json

import pytest
from uatlib import Seen, run_dirs, sh

# What a user types, besides checkpoint= and output=: the embedded suite as a 2-sample smoke test.
EVAL = ["model=tiny", "eval=embedded", "eval.limit=2"]
# docs/tables.md and docs/evaluation.md: the embedded suite's tasks and their metric keys.
METRICS = {
    "arith": ("exact_match,strict-match", "exact_match,flexible-extract"),
    "ifeval_embedded": (
        "prompt_level_strict_acc",
        "inst_level_strict_acc",
        "prompt_level_loose_acc",
        "inst_level_loose_acc",
    ),
}


def _run_folder(one_run) -> str:
    assert one_run.first.rc == 0, one_run.first
    (folder,) = run_dirs(one_run.home / "runs")
    return f"runs/{folder.name}"


def _evaluate(one_run, bin_dir, env, checkpoint: str, output: str) -> Seen:
    args = [bin_dir / "uapt-eval", *EVAL, f"checkpoint={checkpoint}", f"output={output}"]
    return sh(args, one_run.home, env, timeout=600)


def _check_table(seen: Seen, checkpoint: str, results: dict) -> None:
    assert f"tiny @ {checkpoint} on eval=embedded" in seen.text, seen
    lines = seen.out.splitlines()
    for task, metrics in METRICS.items():
        for metric in metrics:
            value = f"{results['eval'][task][metric]:.4f}"
            row = [ln for ln in lines if f" {task} " in ln and f" {metric} " in ln]
            assert len(row) == 1 and value in row[0], f"{task} {metric} = {value}?\n{seen.out}"


@pytest.fixture(scope="session")
def model_folder_eval(one_run, bin_dir, env) -> tuple[Seen, dict]:
    checkpoint = f"{_run_folder(one_run)}/model"
    seen = _evaluate(one_run, bin_dir, env, checkpoint, "eval/model.json")
    assert seen.rc == 0, seen
    results = json.loads((one_run.home / "eval" / "model.json").read_text())
    return seen, results


def test_eval_of_the_saved_model_folder_prints_a_table(model_folder_eval, one_run):
    seen, results = model_folder_eval
    _check_table(seen, f"{_run_folder(one_run)}/model", results)
    for task in METRICS:
        assert results["eval_meta"]["n_samples"][task]["effective"] == 2  # eval.limit=2
    assert "wrote eval/model.json" in seen.text


def test_eval_of_the_run_folder_as_the_readme_says(model_folder_eval, one_run, bin_dir, env):
    """`checkpoint=<run>` of a run that kept no checkpoints means its final model/."""
    checkpoint = _run_folder(one_run)
    seen = _evaluate(one_run, bin_dir, env, checkpoint, "eval/run.json")
    assert seen.rc == 0, seen
    results = json.loads((one_run.home / "eval" / "run.json").read_text())
    _check_table(seen, checkpoint, results)
    # The same weights, greedy decoding: the same scores as evaluating <run>/model directly.
    assert results["eval"] == model_folder_eval[1]["eval"]
