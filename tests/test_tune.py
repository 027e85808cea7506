"""Tuning: a study per objective on the tiny model, every trial an ordinary run; the best settings
written as an override file a grid composes; never tuned on what the final table reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import REPO, TINY, records, train

pytestmark = pytest.mark.slow

STUDY = [
    *[a for a in TINY if not a.startswith("trainer.lr=")],  # searched: not fixed
    "trainer.max_steps=3",
    "hydra/sweeper=uapt_optuna",
    "hydra.sweeper.grid={variant:[mle,masked_mle_r05]}",
    "hydra.sweeper.n_trials=2",
    "hydra.sweeper.params={trainer.lr:'tag(log, interval(1e-4, 1e-2))'}",
]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("tune")
    tuned = home / "conf" / "tuned" / "tiny_lr.yaml"
    args = [
        "-m",
        *STUDY,
        "experiment=tiny_lr",
        f"runs_dir={home / 'runs'}",
        f"hydra.sweeper.tuned_file={tuned}",
    ]
    first = train(*args, check=True)
    text = tuned.read_text()
    again = train(*args, check=True)
    return {
        "home": home,
        "args": args,
        "first": first,
        "again": again,
        "tuned": tuned,
        "text": text,
    }


def test_every_trial_is_a_run_and_the_best_is_written(study):
    runs = records(study["home"] / "runs")
    assert len(runs) == 4 and all(r["status"] == "completed" for r in runs)
    assert {r["summary"]["variant"] for r in runs} == {"mle", "masked_mle-r0.5"}
    doc = yaml.safe_load(study["text"])
    # the best lr of each study is the lr of its run with the lowest validation loss
    for variant, summary_variant in (("mle", "mle"), ("masked_mle_r05", "masked_mle-r0.5")):
        trials = [r for r in runs if r["summary"]["variant"] == summary_variant]
        best = min(trials, key=lambda r: r["metrics"]["val/loss"])
        assert doc["tuned"]["values"]["trainer"]["lr"][variant] == best["config"]["trainer"]["lr"]
        assert doc["tuned"]["best"][variant]["val/loss"] == pytest.approx(
            best["metrics"]["val/loss"],
            abs=1e-6,  # written rounded to 6 decimals
        )
    assert doc["trainer"]["lr"] == "${tuned.values.trainer.lr.${hydra:runtime.choices.variant}}"
    assert "best trainer.lr per study (val/loss):" in study["first"].stdout


def test_a_rerun_search_reuses_its_trials(study):
    assert "sweep: 0 completed, 4 skipped, 0 failed" in study["again"].stdout
    assert study["tuned"].read_text() == study["text"]  # the seeded sampler proposed the same


def test_the_grid_composes_the_tuned_settings(study, tmp_path):
    doc = yaml.safe_load(study["text"])
    conf = study["tuned"].parent.parent
    train(
        "-m",
        *STUDY[:-4],  # the tiny settings, without the search and its fixed lr
        "trainer.max_steps=1",
        "variant=mle,masked_mle_r05",
        "tuned=tiny_lr",
        f"hydra.searchpath=[file://{conf}]",
        f"runs_dir={tmp_path}",
        check=True,
    )
    lrs = {r["summary"]["variant"]: r["config"]["trainer"]["lr"] for r in records(tmp_path)}
    values = doc["tuned"]["values"]["trainer"]["lr"]
    assert lrs == {"mle": values["mle"], "masked_mle-r0.5": values["masked_mle_r05"]}
    # a command-line value for a tuned key is refused, not silently preferred
    clash = train(
        *STUDY[:-4],
        "trainer.lr=1e-3",
        "variant=mle",
        "tuned=tiny_lr",
        f"hydra.searchpath=[file://{conf}]",
        f"runs_dir={tmp_path / 'x'}",
    )
    assert clash.returncode == 2
    assert "trainer.lr=0.001 overrides the tuned value" in " ".join(
        (clash.stdout + clash.stderr).split()
    )


def test_tuning_on_an_eval_score_is_refused(tmp_path):
    proc = train(
        "-m", *STUDY, "hydra.sweeper.metric=eval.arith.exact_match", f"runs_dir={tmp_path}"
    )
    assert proc.returncode != 0
    assert "never on an eval-suite score" in proc.stdout + proc.stderr
    assert not list(tmp_path.glob("*/run.json"))


def _questions(rows) -> set[str]:
    return {m["content"] for row in rows for m in row if m["role"] == "user"}


def test_tuning_rows_and_reported_rows_do_not_overlap(tiny_tokenizer, shared_data):
    """The search's metric (val/loss) is computed on rows held out from the training data; the
    table reports the eval suites' test rows. No problem is in both."""
    from uapt.arith import arith_rows
    from uapt.data import _config, _conversations
    from uapt.evaluation import arith_dataset

    # cpu_repro: arith's held-out training rows vs the embedded suite's arith test problems
    cfg = _config(
        {"name": "arith", "source": "synthetic", "format": "qa", "num_train": 2000, "val_size": 32}
    )
    conversations, _ = _conversations(cfg, 0)
    n_val = 32
    val = _questions(conversations[:n_val])
    assert len(val) == n_val
    test = {row["question"] for row in arith_dataset(64, 0)["test"]}
    assert test and not val & test
    assert not {r["question"] for r in arith_rows(2032, 0)} & test  # not even in training rows
    # cpu_repro_real: GSM8K train.jsonl (its held-out rows) vs test.jsonl (the reported problems)
    train_q = {json.loads(line)["question"] for line in (shared_data / "gsm8k/train.jsonl").open()}
    test_q = {json.loads(line)["question"] for line in (shared_data / "gsm8k/test.jsonl").open()}
    assert not train_q & test_q


def test_the_cpu_repro_search_matches_the_grid_it_tunes():
    """A learning rate is tuned for the schedule it runs: sweep=cpu_repro_lr trains what
    sweep=cpu_repro trains, minus the eval suite and the lr."""
    from helpers import REPO as repo
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(repo / "conf"), version_base="1.3"):
        search = OmegaConf.to_container(compose("train", ["sweep=cpu_repro_lr"]), resolve=False)
        grid = OmegaConf.to_container(compose("train", ["sweep=cpu_repro"]), resolve=False)
    for section in ("model", "dataset", "objective"):
        assert search[section] == grid[section], section
    same = {k: v for k, v in search["trainer"].items() if k not in ("lr", "val_every")}
    assert same == {k: grid["trainer"][k] for k in same}
    assert search["eval"]["name"] == "none"
    assert Path(REPO / "sweeps" / "cpu_repro_lr.yaml").exists()
