"""The base model's per-sample outcomes: cached with its scores, written beside every run's own
(eval_base_outcomes.jsonl), and read by a table whose deltas are to the base model
(`baseline: base`), with the same paired intervals as between columns."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from helpers import TINY, records, train

from uapt.evaluation import base_scores
from uapt.evaluation.outcomes import BASE_FILE, FILE, aggregate
from uapt.records import load_runs
from uapt.table.aggregate import build_table
from uapt.table.spec import load_table_spec
from uapt.table.values import TableSpecError

ROWS = [{"q": f"What is {i} + {i}?", "a": f"{i} + {i} = {2 * i}.\n#### {2 * i}"} for i in range(6)]


def nll_suite(data: Path) -> list[str]:
    task = (
        f"{{name:toy_nll,task:nll,data_files:'{data}',prompt_field:q,response_field:a,"
        "max_length:64}"
    )
    return ["eval=none", "eval.name=toy", f"eval.tasks=[{task}]"]


@pytest.mark.slow
def test_a_run_keeps_its_base_models_outcomes_beside_its_own(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    cache = tmp_path / "cache"
    args = [*TINY, "trainer.max_steps=3", f"runs_dir={tmp_path / 'runs'}", f"cache_dir={cache}"]
    train(*args, *nll_suite(data), check=True)
    (record,) = records(tmp_path / "runs")
    folder = tmp_path / "runs" / f"{record['slug']}-{record['id']}"
    own = [json.loads(x) for x in (folder / FILE).read_text().splitlines()]
    base = [json.loads(x) for x in (folder / BASE_FILE).read_text().splitlines()]
    assert [x["doc_id"] for x in own] == [x["doc_id"] for x in base] == list(range(6))
    # each file averages to the score its record holds (the table checks the same)
    assert aggregate(x["value"] for x in own) == pytest.approx(record["eval"]["toy_nll"]["nll"])
    assert aggregate(x["value"] for x in base) == pytest.approx(
        record["eval_base"]["toy_nll"]["nll"]
    )
    (cached,) = (cache / "base_scores").glob("*.json")
    assert json.loads(cached.read_text())["outcomes"] == base
    # three steps of lr 1e-3 on these very rows: the run's NLL on them falls below the base's
    assert record["eval_delta"]["toy_nll"]["nll"] < 0


def test_a_cache_entry_without_outcomes_is_evaluated_again_once(tmp_path):
    calls = []

    def evaluate():
        calls.append(1)
        return {"eval": {"t": {"acc": 0.5}}, "eval_meta": {}, "outcomes": [{"doc_id": 0}]}

    model, suite = {"name": "tiny", "path": "m"}, {"name": "s", "tasks": ["arith"]}
    first = base_scores(model, suite, tmp_path, evaluate)
    (entry,) = (tmp_path / "base_scores").glob("*.json")
    old = json.loads(entry.read_text())
    del old["outcomes"]  # as written before outcomes were cached
    entry.write_text(json.dumps(old))
    assert base_scores(model, suite, tmp_path, evaluate) == first
    assert base_scores(model, suite, tmp_path, evaluate) == first
    assert len(calls) == 2


EXPERIMENT = """\
title: vs base
runs: {experiment: vb}
rows: [model]
columns: {field: objective}
cells:
  - {label: acc, path: eval.qa.acc, scale: 100}
baseline: base
"""


def _run(root: Path, objective: str, seed: int, own, base, base_file: bool = True) -> None:
    folder = root / f"m-{objective}-s{seed}-{objective}{seed:09d}"
    folder.mkdir(parents=True)
    record = {
        "id": folder.name[-10:], "slug": folder.name[:-11], "status": "completed",
        "summary": {"model": "m", "objective": objective, "seed": seed, "experiment": "vb"},
        "config": {}, "metrics": {}, "eval": {"qa": {"acc": float(np.mean(own))}},
        "eval_base": {"qa": {"acc": float(np.mean(base))}},
    }  # fmt: skip
    (folder / "run.json").write_text(json.dumps(record))
    for name, values in ((FILE, own), (BASE_FILE, base) if base_file else (None, None)):
        if name:
            lines = [{"task": "qa", "metric": "acc", "doc_id": i, "value": float(v)}
                     for i, v in enumerate(values)]  # fmt: skip
            (folder / name).write_text("".join(json.dumps(x) + "\n" for x in lines))


def _table(tmp_path: Path, base_file: bool = True):
    rng = np.random.default_rng(0)
    base = (rng.random(200) < 0.5).astype(float)
    for seed in (0, 1, 2):
        for objective, keep in (("mle", 0.6), ("sd", 0.95)):  # mle forgets more of the base
            own = np.where(rng.random(200) < keep, base, 0.0)
            _run(tmp_path / "runs", objective, seed, own, base, base_file)
    spec = tmp_path / "vb.yaml"
    spec.write_text(EXPERIMENT)
    runs, problems = load_runs([tmp_path / "runs"])
    return build_table(load_table_spec(spec), runs, problems), base


def test_every_column_is_compared_to_the_base_model_on_paired_samples(tmp_path):
    table, base = _table(tmp_path)
    for objective in ("mle", "sd"):
        cell = table.cells[(("m",), "acc", objective)]
        base_mean = 100 * base.mean()
        assert cell.delta == pytest.approx(cell.mean - base_mean, abs=1e-9)
        assert cell.ci.method == "samples+seeds" and cell.ci.seeds == 3
    mle, sd = (table.cells[(("m",), "acc", c)] for c in ("mle", "sd"))
    # mle zeroes 40 % of the base's right answers (about -20 points): far outside the noise
    assert mle.ci.hi < 0 and mle.delta < sd.delta
    assert any("difference to the base model" in note for note in table.notes)
    # its intervals and marks are explained as a column baseline's are
    assert any(note.startswith("[lo, hi]: 95 % percentile interval") for note in table.notes)
    assert any("Holm-adjusted p-value" in note for note in table.notes)


def test_runs_without_the_base_models_outcomes_fall_back_to_seeds_and_say_why(tmp_path):
    table, _ = _table(tmp_path, base_file=False)
    cell = table.cells[(("m",), "acc", "mle")]
    assert cell.ci.method == "seeds"
    assert any("without eval_base_outcomes.jsonl" in note for note in table.notes)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("base: false\n", "baseline: base needs the base column"),
        ("", "'base' names the base model"),
    ],
)
def test_a_base_baseline_that_cannot_be_read_is_an_error(tmp_path, extra, message):
    text = EXPERIMENT + extra
    if not extra:  # a column value spelled "base" would make `baseline: base` ambiguous
        text = text.replace("{field: objective}", "{field: objective, values: [mle, base]}")
    spec = tmp_path / "x.yaml"
    spec.write_text(textwrap.dedent(text))
    with pytest.raises(TableSpecError, match=message):
        load_table_spec(spec)
