"""The nll task (uapt.evaluation.nll): per-sample teacher-forced NLL of reference responses, checked
against a naive one-row-at-a-time computation, averaged into the reported score, bad input named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from uapt.data import IGNORE_INDEX, tokenize_conversations
from uapt.evaluation import nll, run_suite, validate_suite
from uapt.evaluation.outcomes import FILE, aggregate
from uapt.schema import ConfigError
from uapt.sections import TaskSpec

ROWS = [
    {"q": "What is 2 + 3?", "a": "2 + 3 = 5.\n#### 5"},
    {"q": "Name a colour.", "a": "Blue, the colour of a clear sky at noon, is one."},
    {"q": "Count to three.", "a": "One, two, three."},
    {"q": "Say hi.", "a": "Hi!"},
    {"q": "Spell cat backwards, then forwards, then backwards again.", "a": "tac cat tac"},
]


def write_rows(path: Path, rows=ROWS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def nll_task(path: Path, **extra) -> dict:
    return {
        "name": "toy_nll",
        "task": "nll",
        "data_files": str(path),
        "prompt_field": "q",
        "response_field": "a",
        **extra,
    }


def naive_nll(model, tokenizer, prompt: str, response: str, max_length: int) -> float:
    """One row, no batch, no padding: mean -log p over the labelled tokens, by log_softmax."""
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
    columns, _ = tokenize_conversations([messages], tokenizer, max_length)
    ids = torch.tensor([columns["input_ids"][0]])
    labels = columns["labels"][0]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
    terms = [-logp[t - 1, y].item() for t, y in enumerate(labels) if y != IGNORE_INDEX]
    return sum(terms) / len(terms)


def test_per_sample_nll_equals_a_naive_row_by_row_computation(tiny_model, tiny_tokenizer, tmp_path):
    spec = TaskSpec.parse(nll_task(write_rows(tmp_path / "rows.jsonl")), "eval.tasks[0]")
    tiny_model.eval()
    result = nll.evaluate(spec, tiny_model, tiny_tokenizer, "cpu")
    by_doc = {line["doc_id"]: line["value"] for line in result["outcomes"]}
    assert sorted(by_doc) == list(range(len(ROWS)))
    for i, row in enumerate(ROWS):
        expected = naive_nll(tiny_model, tiny_tokenizer, row["q"], row["a"], 1024)
        # fp32 forward of a padded batch vs fp64 log-softmax of an unpadded row: agreement to
        # single-precision rounding of values of order 1-10 nats
        assert by_doc[i] == pytest.approx(expected, rel=1e-5)
    assert result["scores"]["nll"] == pytest.approx(sum(by_doc.values()) / len(ROWS), rel=1e-12)


def test_batch_composition_does_not_change_a_samples_nll(tiny_model, tiny_tokenizer, tmp_path):
    spec = TaskSpec.parse(nll_task(write_rows(tmp_path / "rows.jsonl")), "eval.tasks[0]")
    rows = nll.encode(nll.read_rows(spec), tiny_tokenizer, 1024)
    one_batch = nll.sample_nll(tiny_model, rows, tiny_tokenizer.pad_token_id, "cpu")
    nll.TOKENS_PER_BATCH, saved = 1, nll.TOKENS_PER_BATCH  # one row per batch: no padding at all
    try:
        alone = nll.sample_nll(tiny_model, rows, tiny_tokenizer.pad_token_id, "cpu")
    finally:
        nll.TOKENS_PER_BATCH = saved
    for doc_id, value in alone.items():
        # padding changes the matmul shapes, hence float32 summation order only
        assert one_batch[doc_id] == pytest.approx(value, rel=1e-5)


@pytest.mark.slow  # imports lm-eval (run_suite)
def test_suite_outcomes_average_to_the_reported_nll(tiny_model, tiny_tokenizer, tmp_path):
    data = write_rows(tmp_path / "rows.jsonl")
    suite = {"name": "toy", "tasks": [nll_task(data, limit=4, max_length=64)]}
    result = run_suite(tiny_model, tiny_tokenizer, suite, device="cpu", out_dir=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / FILE).read_text().splitlines()]
    assert {(x["task"], x["metric"]) for x in lines} == {("toy_nll", "nll")}
    assert sorted(x["doc_id"] for x in lines) == [0, 1, 2, 3]  # limit: the file's first rows
    reported = result["eval"]["toy_nll"]["nll"]
    # the same Python floats summed in the same order: equal up to the last bit
    assert aggregate(x["value"] for x in lines) == pytest.approx(reported, rel=1e-15)
    values = [x["value"] for x in lines]
    mean = sum(values) / 4
    sd = (sum((v - mean) ** 2 for v in values) / 3) ** 0.5
    assert result["eval"]["toy_nll"]["nll_stderr"] == pytest.approx(sd / 2, rel=1e-12)
    assert result["eval_meta"]["n_samples"]["toy_nll"] == {"original": 4, "effective": 4}
    assert result["eval_meta"]["task_versions"]["toy_nll"] == nll.VERSION


def test_truncation_and_the_system_instruction_follow_the_training_rows(
    tiny_model, tiny_tokenizer, tmp_path
):
    spec = TaskSpec.parse(nll_task(write_rows(tmp_path / "rows.jsonl")), "eval.tasks[0]")
    plain = nll.encode(nll.read_rows(spec), tiny_tokenizer, 1024)
    lengths = sorted(len(ids) for _, ids, _ in plain)
    limit = lengths[-1] - 2  # cuts the longest row's response short
    cut = nll.encode(nll.read_rows(spec), tiny_tokenizer, limit)
    assert all(len(ids) <= limit for _, ids, _ in cut)
    assert any(len(a) > len(b) for (_, a, _), (_, b, _) in zip(plain, cut, strict=True))
    # a row whose prompt fills max_length has nothing to score: left out, the others kept
    prompt_only = nll.encode(nll.read_rows(spec), tiny_tokenizer, 3)
    assert prompt_only == []
    system = nll.encode(nll.read_rows(spec), tiny_tokenizer, 1024, system="Be brief.")
    assert all(len(s) > len(p) for (_, s, _), (_, p, _) in zip(system, plain, strict=True))
    # the labels are the same response tokens, wherever the conversation starts
    for (_, _, s), (_, _, p) in zip(system, plain, strict=True):
        assert [y for y in s if y != IGNORE_INDEX] == [y for y in p if y != IGNORE_INDEX]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"max_gen_toks": 10}, "eval.tasks[0].max_gen_toks does not apply to the nll task"),
        ({"num_fewshot": 2}, "eval.tasks[0].num_fewshot does not apply to the nll task"),
        ({"apply_chat_template": False}, "renders every row with the chat template"),
        ({"data_files": {"test": "x.jsonl"}}, "reads one local .json or .jsonl file"),
        ({"data_files": "missing.jsonl"}, "eval.tasks[0].data_files: no such file missing.jsonl"),
    ],
)
def test_bad_nll_task_config_names_the_key(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(tmp_path)
    task = {**nll_task(write_rows(tmp_path / "rows.jsonl")), **change}
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        validate_suite({"name": "toy", "tasks": [task]})


def test_nll_keys_on_an_lm_eval_task_are_refused():
    with pytest.raises(ConfigError, match=r"eval\.tasks\[0\]\.prompt_field applies to the nll"):
        validate_suite({"name": "x", "tasks": [{"name": "ifeval", "prompt_field": "q"}]})


def test_a_suite_wide_plain_prompt_is_refused_for_nll(tmp_path):
    task = nll_task(write_rows(tmp_path / "rows.jsonl"))
    with pytest.raises(ConfigError, match=r"eval\.apply_chat_template=false: eval\.tasks\[0\]"):
        validate_suite({"name": "toy", "apply_chat_template": False, "tasks": [task]})


def test_a_row_without_the_field_is_named_by_file_and_line(tiny_tokenizer, tmp_path):
    path = write_rows(tmp_path / "rows.jsonl", [ROWS[0], {"q": "no answer here"}])
    spec = TaskSpec.parse(nll_task(path), "eval.tasks[0]")
    with pytest.raises(Exception, match=rf"{path}:2: toy_nll needs a non-empty string field 'a'"):
        nll.read_rows(spec)


def test_gsm8k_test_solutions_load_as_nll_rows(shared_data):
    spec = TaskSpec.parse(
        {
            "name": "gsm8k_nll",
            "task": "nll",
            "data_files": str(shared_data / "gsm8k" / "test.jsonl"),
            "prompt_field": "question",
            "response_field": "answer",
            "limit": 3,
        },
        "eval.tasks[0]",
    )
    rows = nll.read_rows(spec)
    first = json.loads((shared_data / "gsm8k" / "test.jsonl").read_text().splitlines()[0])
    assert [r[0] for r in rows] == [0, 1, 2] and rows[0][1:] == (first["question"], first["answer"])
