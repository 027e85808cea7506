"""A run's inputs: a local data file's content is part of the run id; bad values and undecodable
files stop the run with exit status 2 naming them, before anything is written; edge values that
are valid train; the record is strict JSON."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers import REPO, TINY, records, strict_json, train

from uapt import files

pytestmark = pytest.mark.slow

SHORT = [*TINY, "trainer.max_steps=3"]
# a local file instead of the generated task (whose dataset.* keys do not apply to it)
LOCAL = [a for a in SHORT if not a.startswith("dataset")] + ["dataset=gsm8k"]


def test_editing_a_local_data_file_is_a_new_run(tmp_path):
    data = tmp_path / "qa.jsonl"
    shutil.copy(REPO / "tests/fixtures/data/qa.jsonl", data)
    args = [
        *LOCAL,
        f"runs_dir={tmp_path / 'runs'}",
        "dataset.name=qa",
        f"dataset.source={data}",
        "dataset.prompt_field=q",
        "dataset.response_field=a",
        "dataset.val_size=1",
    ]
    train(*args, check=True)
    (first,) = records(tmp_path / "runs")
    digest = files.sha256(data)
    assert first["config"]["inputs"] == {"dataset.source": f"sha256:{digest}"}
    os.utime(data)  # touched, not changed: the same run
    assert "already completed" in train(*args, check=True).stdout
    with data.open("a") as f:
        f.write(json.dumps({"q": "What is 9 + 9?", "a": "9 + 9 = 18.\n#### 18"}) + "\n")
    train(*args, check=True)
    ids = {r["id"] for r in records(tmp_path / "runs")}
    assert len(ids) == 2 and first["id"] in ids


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.lr=inf", "trainer.lr=inf is not a finite number > 0"),
        ("seed=300000000000", "seed=300000000000 is not an integer in [0, 4294967295]"),
        (
            "model.tokenizer=./no-such-tokenizer",
            "model.tokenizer='./no-such-tokenizer': no such local folder",
        ),
        (
            "model.path=no-such-org/no-such-model",
            "model.path='no-such-org/no-such-model': cannot be loaded",
        ),
    ],
)
def test_bad_input_exits_2_naming_it_before_writing(tmp_path, override, needle):
    proc = train(*SHORT, override, f"runs_dir={tmp_path}")
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out[-2000:]
    assert needle in out and "Traceback" not in out
    if "model.path" not in override:  # the config checks run before any folder is made
        assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_data_exits_2_naming_file_and_line(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    good = json.dumps({"q": "1 + 1?", "a": "2"})
    body = (
        (good + "\n" + '{"q": "caf\xe9?", "a": "x"}\n')
        if suffix == ".jsonl"
        else f"[{good},\n" + '{"q": "caf\xe9?", "a": "x"}]'
    )
    path.write_bytes(body.encode("latin-1"))
    proc = train(
        *LOCAL,
        f"dataset.source={path}",
        "dataset.val_size=0",
        "dataset.prompt_field=q",
        "dataset.response_field=a",
        f"runs_dir={tmp_path / 'runs'}",
    )
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out[-2000:]
    assert f"{path}:2: not UTF-8 (byte 0xe9)" in out and "Traceback" not in out


def test_the_largest_seed_trains(tmp_path):
    train(
        *SHORT,
        "seed=4294967295",
        "objective=masked_mle",
        "objective.select=random",
        f"runs_dir={tmp_path}",
        check=True,
    )
    (record,) = records(tmp_path)
    assert record["status"] == "completed"


def test_run_records_are_strict_json(tmp_path):
    train(*SHORT, f"runs_dir={tmp_path}", check=True)  # mle: nothing unkept, nll/unkept is NaN
    (folder,) = tmp_path.glob("tiny-*")
    record = strict_json(folder / "run.json")
    assert record["metrics"]["train/nll/unkept"] == "nan"
