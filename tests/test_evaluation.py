"""Evaluation suites through lm-eval: real task configs on local data, the embedded suite on the tiny
model, the IFEval scorer against published GPT-4 figures, base-score caching and reporting."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
from helpers import compose_run, tiny_model_cfg
from omegaconf import OmegaConf

from uapt.evaluation import (
    base_scores,
    evaluate_lm,
    flatten_results,
    run_suite,
    score_delta,
    suite_hash,
    suite_tasks,
    validate_suite,
)
from uapt.evaluation.cli import evaluate_cli, load_for_eval
from uapt.schema import ConfigError

REPO = Path(__file__).resolve().parents[1]
EVAL_CONF = REPO / "conf" / "eval"
IFEVAL_METRICS = (
    "prompt_level_strict_acc",
    "inst_level_strict_acc",
    "prompt_level_loose_acc",
    "inst_level_loose_acc",
)
GSM8K_METRICS = ("exact_match,strict-match", "exact_match,flexible-extract")


def load_suite(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(EVAL_CONF / f"{name}.yaml"), resolve=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay_lm(answer):
    """An lm-eval LM whose generations come from `answer(prompt)`: the scoring path without a model."""
    from lm_eval.api.model import LM

    class Replay(LM):
        def generate_until(self, requests, disable_tqdm=False):
            return [answer(r.args[0]) for r in requests]

        def loglikelihood(self, requests, disable_tqdm=False):
            raise NotImplementedError

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return Replay()


# ----------------------------------------------------------------------------- IFEval, real data
# lm-eval's IFEval checker draws a random letter when a letter_frequency instruction's `letter` is
# not a-z (two rows of input_data.jsonl ask for '#' and '!'), so those instructions pass or fail by
# chance. The README's figures are one such draw; the other 538 rows are deterministic.
README_IFEVAL = {
    "prompt_level_strict_acc": 0.770,
    "inst_level_strict_acc": 0.837,
    "prompt_level_loose_acc": 0.796,
    "inst_level_loose_acc": 0.856,
}


def _random_instructions(doc: dict) -> list[bool]:
    return [
        iid == "keywords:letter_frequency"
        and not (
            isinstance(kw.get("letter"), str)
            and len(kw["letter"]) == 1
            and kw["letter"].lower() in string.ascii_lowercase
        )
        for iid, kw in zip(doc["instruction_id_list"], doc["kwargs"], strict=True)
    ]


@pytest.mark.slow
def test_ifeval_scores_gpt4_responses_like_the_published_figures(shared_data, tmp_path):
    inputs = read_jsonl(shared_data / "ifeval" / "input_data.jsonl")
    responses = {
        r["prompt"]: r["response"]
        for r in read_jsonl(shared_data / "ifeval" / "gpt4_responses.jsonl")
    }
    suite = {
        "name": "gpt4",
        "apply_chat_template": False,
        "log_samples": True,
        "tasks": [
            {
                "name": "ifeval",
                "data_files": {"train": str(shared_data / "ifeval" / "input_data.jsonl")},
            }
        ],
    }
    result = evaluate_lm(replay_lm(lambda prompt: responses[prompt]), suite, out_dir=tmp_path)
    scores = result["eval"]["ifeval"]

    samples = read_jsonl(tmp_path / "eval_samples" / "ifeval.jsonl")
    assert len(samples) == len(inputs) == 540
    n_inst = sum(len(d["instruction_id_list"]) for d in inputs)
    random_rows = {d["key"] for d in inputs if any(_random_instructions(d))}
    assert len(random_rows) == 2  # the premise of the tolerance below
    for metric, published in README_IFEVAL.items():
        prompt_level = metric.startswith("prompt")
        total = len(inputs) if prompt_level else n_inst
        # the reported mean is the mean of the per-sample outcomes
        outcomes = [s[metric] if prompt_level else sum(s[metric]) for s in samples]
        assert scores[metric] == pytest.approx(sum(outcomes) / total)
        # deterministic part: rows (or instructions) that involve no random draw
        fixed = 0
        for s in samples:
            flags = _random_instructions(s["doc"])
            if prompt_level:
                fixed += int(s[metric]) if not any(flags) else 0
            else:
                fixed += sum(ok for ok, rnd in zip(s[metric], flags, strict=True) if not rnd)
        published_count = round(published * total)
        assert round(published_count / total, 3) == published
        # the published count = our deterministic count + whatever the 2 random draws gave
        assert fixed <= published_count <= fixed + len(random_rows), (
            metric,
            fixed,
            published_count,
        )
        assert abs(scores[metric] - published) <= len(random_rows) / total + 0.0005
    assert result["eval_meta"]["n_samples"]["ifeval"] == {"original": 540, "effective": 540}


@pytest.mark.slow  # measured over 2 s (make test-fast stays under 90 s)
def test_punkt_tab_built_offline_splits_like_the_punkt_package(tmp_path, monkeypatch, shared_data):
    import nltk
    import punkt

    from uapt import ifeval

    monkeypatch.setattr(nltk.data, "path", [])  # nothing installed anywhere
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download was called"))
    folder = ifeval.ensure_punkt_tab(tmp_path)
    assert folder == (tmp_path / "nltk_data" / "tokenizers" / "punkt_tab" / "english").resolve()
    assert sorted(p.name for p in folder.iterdir()) == sorted(ifeval.PUNKT_FILES)
    ours = nltk.tokenize.PunktTokenizer("english")
    reference = punkt.PunktSentenceTokenizer(punkt.load_model("english"))
    texts = [r["response"] for r in read_jsonl(shared_data / "ifeval" / "gpt4_responses.jsonl")]
    texts += ["Dr. Smith went home. He was tired.", "It cost $3.50 at 5 p.m. on Jan. 3. We paid."]
    for text in texts:
        assert ours.tokenize(text) == reference.tokenize(text)


# ----------------------------------------------------------------------------- generated IFEval prompts
def test_generated_prompts_are_deterministic_and_accepted_by_the_checker():
    from uapt.ifeval import INSTRUCTION_IDS, ifeval_modules, ifeval_prompts

    _, registry = ifeval_modules()
    rows = ifeval_prompts(40, seed=3)
    assert rows == ifeval_prompts(40, seed=3)
    assert rows != ifeval_prompts(40, seed=4)
    assert {r["instruction_id_list"][0] for r in rows[: len(INSTRUCTION_IDS)]} == set(
        INSTRUCTION_IDS
    )
    assert len(INSTRUCTION_IDS) >= 10
    for row in rows:
        assert row["prompt"] and len(row["instruction_id_list"]) == len(row["kwargs"]) >= 1
        assert len(set(row["instruction_id_list"])) == len(row["instruction_id_list"])
        for iid, kwargs in zip(row["instruction_id_list"], row["kwargs"], strict=True):
            instruction = registry.INSTRUCTION_DICT[iid](iid)
            state = random.getstate()
            description = instruction.build_description(**kwargs)  # TypeError on a wrong key
            assert random.getstate() == state, (
                f"{iid}: the checker drew a random value for {kwargs}"
            )
            assert (instruction.get_instruction_args() or {}) == kwargs
            assert description in row["prompt"]


HAND_WRITTEN = [  # (instruction ids, kwargs, compliant response, non-compliant response)
    (
        ["punctuation:no_comma", "detectable_format:title"],
        [{}, {}],
        "<<A Quiet Morning>>\nThe tea was warm and the street was still.",
        "<<A Quiet Morning>>\nThe tea was warm, and the street was still.",
    ),
    (
        ["detectable_format:number_bullet_lists"],
        [{"num_bullets": 3}],
        "* water the plants\n* feed the cat\n* open the windows",
        "* water the plants\n* feed the cat",
    ),
    (
        ["length_constraints:number_words"],
        [{"num_words": 10, "relation": "less than"}],
        "Bees make honey from nectar.",
        "Bees visit many flowers and carry nectar home where they turn it into honey.",
    ),
    (
        ["keywords:existence", "startend:end_checker"],
        [{"keywords": ["lantern", "river"]}, {"end_phrase": "Any other questions?"}],
        "We walked by the river with a lantern. Any other questions?",
        "We walked by the river with a torch. Any other questions?",
    ),
    (
        ["change_case:english_lowercase", "detectable_content:postscript"],
        [{}, {"postscript_marker": "P.S."}],
        "the garden is blooming and the bees are busy all day long.\np.s. bring a hat.",
        "The garden is blooming and the bees are busy all day long.\nP.S. bring a hat.",
    ),
]


@pytest.mark.parametrize(("ids", "kwargs", "good", "bad"), HAND_WRITTEN)
def test_hand_written_responses_score_one_and_zero(ids, kwargs, good, bad):
    from uapt.ifeval import ifeval_modules

    utils, _ = ifeval_modules()
    doc = {"key": 0, "prompt": "Write something.", "instruction_id_list": ids, "kwargs": kwargs}
    assert utils.process_results(doc, [good])["prompt_level_strict_acc"] is True
    assert utils.process_results(doc, [bad])["prompt_level_strict_acc"] is False


def test_generated_dataset_rows_score_like_the_plain_rows():
    """The Arrow dataset pads kwargs with None; scoring must not change."""
    from uapt.evaluation import ifeval_dataset
    from uapt.ifeval import ifeval_modules, ifeval_prompts

    utils, _ = ifeval_modules()
    plain = ifeval_prompts(12, seed=0)
    padded = ifeval_dataset(12, seed=0)["test"]
    for a, b in zip(plain, padded, strict=True):
        response = "<<note>>\n* one\n* two\nall good here. Any other questions?"
        assert utils.process_results(a, [response]) == utils.process_results(b, [response])


# ----------------------------------------------------------------------------- GSM8K and arith scoring
def _gsm8k_suite(shared_data: Path, **task) -> dict:
    files = {
        "train": str(shared_data / "gsm8k" / "train.jsonl"),
        "test": str(shared_data / "gsm8k" / "test.jsonl"),
    }
    return {
        "name": "gsm8k_local",
        "batch_size": 2,
        "apply_chat_template": False,
        "log_samples": True,
        "tasks": [{"name": "gsm8k", "data_files": files, **task}],
    }


@pytest.mark.slow  # measured over 2 s (make test-fast stays under 90 s)
def test_real_gsm8k_config_scores_strict_and_flexible_matches(shared_data, tmp_path):
    rows = read_jsonl(shared_data / "gsm8k" / "test.jsonl")[:4]
    finals = [r["answer"].split("#### ")[-1].strip() for r in rows]
    # by hand: row 0 in GSM8K's format (strict and flexible), row 1 a bare number (flexible only),
    # row 2 wrong, row 3 "####" with a wrong number but the right one earlier (neither: flexible
    # takes the last number)
    replies = [
        f"Some steps.\n#### {finals[0]}",
        f"The answer is {finals[1]}.",
        "#### 123456789",
        f"First {finals[3]}, then\n#### 987654321",
    ]

    def answer(prompt: str) -> str:
        return next(
            reply
            for row, reply in zip(rows, replies, strict=True)
            if row["question"] in prompt.split("Question:")[-1]
        )

    suite = _gsm8k_suite(shared_data, limit=4, num_fewshot=2)
    result = evaluate_lm(replay_lm(answer), suite, out_dir=tmp_path)
    scores = result["eval"]["gsm8k"]
    assert scores["exact_match,strict-match"] == pytest.approx(1 / 4)
    assert scores["exact_match,flexible-extract"] == pytest.approx(2 / 4)
    assert set(scores) == {m + s for m in GSM8K_METRICS for s in ("", "_stderr")}
    samples = read_jsonl(tmp_path / "eval_samples" / "gsm8k.jsonl")
    prompt, gen_kwargs = samples[0]["arguments"][0]
    # lm-eval's own gsm8k config: its prompt, 2 train shots, its stop words
    assert prompt.count("Question:") == 3 and prompt.endswith(
        f"Question: {rows[0]['question']}\nAnswer:"
    )
    assert "Question:" in gen_kwargs["until"]


def test_real_gsm8k_task_runs_on_the_tiny_model(tiny_model, tiny_tokenizer, shared_data, tmp_path):
    suite = _gsm8k_suite(shared_data, limit=3, num_fewshot=1, max_gen_toks=12)
    result = run_suite(tiny_model, tiny_tokenizer, suite, device="cpu", out_dir=tmp_path)
    scores = result["eval"]["gsm8k"]
    for metric in GSM8K_METRICS:
        assert 0.0 <= scores[metric] <= 1.0
    assert result["eval_meta"]["n_samples"]["gsm8k"] == {"original": 1319, "effective": 3}
    assert result["eval_meta"]["lm_eval_version"] == "0.4.13"
    samples = read_jsonl(tmp_path / "eval_samples" / "gsm8k.jsonl")
    assert (
        samples[0]["doc"]["question"]
        == read_jsonl(shared_data / "gsm8k" / "test.jsonl")[0]["question"]
    )
    assert samples[0]["arguments"][0][1]["max_gen_toks"] == 12


def test_arith_is_scored_like_gsm8k():
    from uapt.arith import arith_rows

    rows = arith_rows(5, seed=0, split="test")
    by_question = {r["question"]: r for r in rows}

    def answer(prompt: str) -> str:  # rows 0-2 right in GSM8K format, 3 right number only, 4 wrong
        i = next(k for k, r in enumerate(rows) if r["question"] in prompt)
        final = rows[i]["answer"].split("#### ")[-1]
        return [
            rows[i]["answer"],
            rows[i]["answer"],
            rows[i]["answer"],
            f"It is {final}",
            "#### -1",
        ][i]

    suite = {"name": "t", "apply_chat_template": False, "tasks": [{"name": "arith", "size": 5}]}
    result = evaluate_lm(replay_lm(answer), suite)
    assert len(by_question) == 5
    assert result["eval"]["arith"]["exact_match,strict-match"] == pytest.approx(3 / 5)
    assert result["eval"]["arith"]["exact_match,flexible-extract"] == pytest.approx(4 / 5)


# ----------------------------------------------------------------------------- the embedded suite
def test_embedded_suite_on_the_tiny_model_writes_id_and_ood_results(
    tiny_model, tiny_tokenizer, tmp_path
):
    suite = load_suite("embedded")
    suite.update(limit=3, log_samples=True, batch_size=3)
    for task in suite["tasks"]:
        task["max_gen_toks"] = 8
    tiny_model.train()
    result = run_suite(tiny_model, tiny_tokenizer, suite, device="cpu", out_dir=tmp_path)
    assert tiny_model.training  # back in the mode it came in
    assert set(result["eval"]) == {"arith", "ifeval_embedded"}
    assert set(GSM8K_METRICS) <= set(result["eval"]["arith"])
    assert set(IFEVAL_METRICS) <= set(result["eval"]["ifeval_embedded"])
    assert all(v is None or 0 <= v <= 1 for m in result["eval"].values() for v in m.values())
    assert result["eval_meta"]["suite"]["name"] == "embedded"
    assert result["eval_meta"]["n_samples"]["arith"]["effective"] == 3
    arith = read_jsonl(tmp_path / "eval_samples" / "arith.jsonl")
    assert arith[0]["arguments"][0][0].startswith("<|im_start|>user\n")  # the chat template
    assert (tmp_path / "eval_samples" / "ifeval_embedded.jsonl").exists()


def test_none_suite_is_empty(tiny_model, tiny_tokenizer):
    assert run_suite(tiny_model, tiny_tokenizer, load_suite("none"), device="cpu") == {}


# ----------------------------------------------------------------------------- config
def test_every_suite_config_validates(monkeypatch):
    monkeypatch.chdir(REPO)  # local_real's data folder is relative to the working directory
    for path in sorted(EVAL_CONF.glob("*.yaml")):
        if path.stem == "local_real" and not (REPO.parent / "shared" / "data").exists():
            continue
        if path.stem == "base":  # every key's default, no suite of its own
            with pytest.raises(ConfigError, match=r"eval\.name is required"):
                validate_suite(load_suite(path.stem))
            continue
        validate_suite(load_suite(path.stem))
    paper = {t.name: t for t in suite_tasks(load_suite("paper"))}
    assert {
        "ifeval",
        "gsm8k",
        "arc_easy",
        "arc_challenge",
        "hellaswag",
        "mmlu",
        "truthfulqa_mc2",
        "winogrande",
    } <= set(paper)
    assert paper["gsm8k"].num_fewshot == 5 and paper["gsm8k"].apply_chat_template
    assert not paper["mmlu"].apply_chat_template


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bogus": 1}, "eval.bogus is not a known option"),
        ({"batch_size": 0}, "eval.batch_size=0"),
        ({"tasks": [{"name": "gsm8k", "limit": -1}]}, "eval.tasks[0].limit=-1"),
        (
            {"tasks": [{"name": "gsm8k", "data_files": {"test": "/nope/test.jsonl"}}]},
            "eval.tasks[0].data_files.test",
        ),
        ({"tasks": [{"name": "gsm8k", "size": 5}]}, "eval.tasks[0].size"),
        ({"tasks": ["arith", "arith"]}, "appears twice"),
    ],
)
def test_bad_suite_config_names_the_key(change, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        validate_suite({"name": "x", "tasks": [], **change})


def test_hub_tasks_resolve_to_lm_eval_configs_without_loading_data():
    from uapt.evaluation import task_request
    from uapt.sections import TaskSpec

    request, manager, is_cfg = task_request(TaskSpec(name="arc_easy", task="arc_easy"))
    assert (request, is_cfg) == ("arc_easy", False) and "arc_easy" in manager.task_index
    request, manager, _ = task_request(TaskSpec(name="mmlu", task="mmlu"))
    assert request == "mmlu" and manager.task_index["mmlu"].kind.name == "GROUP"
    with pytest.raises(ConfigError, match="apply to single tasks"):
        task_request(TaskSpec(name="mmlu", task="mmlu", overrides={"num_fewshot": 1}))
    cfg, _, is_cfg = task_request(
        TaskSpec(name="gsm8k_local", task="gsm8k", data_files={"test": "/x.jsonl"})
    )
    assert is_cfg and cfg["task"] == "gsm8k_local" and cfg["dataset_path"] == "json"
    assert cfg["filter_list"][0]["name"] == "strict-match"  # the rest is lm-eval's gsm8k.yaml


def test_suite_limit_caps_task_limits():
    specs = suite_tasks(
        {"name": "x", "limit": 5, "tasks": [{"name": "arith", "limit": 50}, "ifeval_embedded"]}
    )
    assert [s.limit for s in specs] == [5, 5]


# ----------------------------------------------------------------------------- results and base scores
def test_flatten_results_drops_only_the_none_filter():
    raw = {
        "results": {
            "gsm8k": {
                "alias": "gsm8k",
                "exact_match,strict-match": 0.25,
                "exact_match_stderr,strict-match": 0.1,
            },
            "arc_easy": {
                "acc,none": 0.5,
                "acc_stderr,none": 0.05,
                "acc_norm,none": 0.6,
                "acc_norm_stderr,none": "N/A",
            },
            "mmlu_anatomy": {"acc,none": 0.3},
        }
    }
    assert flatten_results(raw, {"gsm8k", "arc_easy"}) == {
        "gsm8k": {"exact_match,strict-match": 0.25, "exact_match,strict-match_stderr": 0.1},
        "arc_easy": {"acc": 0.5, "acc_stderr": 0.05, "acc_norm": 0.6, "acc_norm_stderr": None},
    }


def test_score_delta():
    scores = {"a": {"acc": 0.5, "acc_stderr": 0.1}, "b": {"x": 0.2}}
    base = {"a": {"acc": 0.25, "acc_stderr": 0.05}, "c": {"x": 1.0}}
    assert score_delta(scores, base) == {"a": {"acc": 0.25}}


def test_base_scores_are_cached_per_model_and_suite(tmp_path):
    calls = []

    def evaluate():
        calls.append(1)
        return {"eval": {"arith": {"acc": 0.1 * len(calls)}}, "eval_meta": {}}

    model = {"name": "tiny", "path": "some/model"}
    suite = {"name": "embedded", "batch_size": 4, "tasks": ["arith"]}
    first = base_scores(model, suite, tmp_path, evaluate)
    assert (
        base_scores(model, {**suite, "batch_size": 32, "log_samples": True}, tmp_path, evaluate)
        == first
    )
    assert len(calls) == 1
    base_scores(model, {**suite, "limit": 3}, tmp_path, evaluate)  # another suite: evaluated again
    base_scores({**model, "path": "other/model"}, suite, tmp_path, evaluate)
    assert len(calls) == 3
    files = sorted(p.name for p in (tmp_path / "base_scores").glob("*.json"))
    assert len(files) == 3 and any(f.endswith(f"-{suite_hash(suite)}.json") for f in files)
    assert base_scores(model, {"name": "none", "tasks": []}, tmp_path, evaluate) == {}
    random_init = {"name": "tiny", "path": None}
    base_scores(random_init, suite, tmp_path, evaluate, init_seed=0)
    base_scores(random_init, suite, tmp_path, evaluate, init_seed=1)
    assert len(calls) == 5


# ----------------------------------------------------------------------------- standalone
def test_checkpoint_weights_load_for_evaluation(tiny_model, tiny_tokenizer, cache_dir, tmp_path):
    import torch

    from uapt import checkpoint

    model_cfg = tiny_model_cfg()
    optimizer = torch.optim.SGD(tiny_model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    folder = tmp_path / "run" / "checkpoints"
    checkpoint.save(
        folder, tiny_model, optimizer, scheduler, checkpoint.TrainingState(3, {}, None), keep=5
    )
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.5)
    checkpoint.save(
        folder, tiny_model, optimizer, scheduler, checkpoint.TrainingState(12, {}, None), keep=5
    )
    model, _ = load_for_eval(model_cfg, cache_dir, torch.device("cpu"), checkpoint=tmp_path / "run")
    for (name, a), b in zip(
        model.state_dict().items(), tiny_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name  # step 12 (the newest), not step 3

    hf_folder = tmp_path / "hf"
    tiny_model.save_pretrained(hf_folder)
    tiny_tokenizer.save_pretrained(hf_folder)
    model, tokenizer = load_for_eval(
        model_cfg, cache_dir, torch.device("cpu"), checkpoint=hf_folder
    )
    assert torch.equal(model.lm_head.weight, tiny_model.lm_head.weight)
    assert tokenizer.chat_template == tiny_tokenizer.chat_template


def test_evaluate_cli_prints_and_writes_json(cache_dir, tmp_path, capsys):
    suite = load_suite("embedded")
    suite.update(limit=2, batch_size=2)
    for task in suite["tasks"]:
        task["max_gen_toks"] = 4
    cfg = compose_run("model=tiny", "trainer.device=cpu", f"cache_dir={cache_dir}")
    cfg["eval"] = suite
    assert evaluate_cli(cfg, output=str(tmp_path / "out.json")) == 0
    written = json.loads((tmp_path / "out.json").read_text())
    assert set(written["eval"]) == {"arith", "ifeval_embedded"}
    assert "prompt_level_strict_acc" in capsys.readouterr().out
    assert evaluate_cli({**cfg, "eval": load_suite("none")}) == 2


def test_uapt_eval_help_is_its_own(monkeypatch, capsys):
    from uapt.evaluation import cli

    monkeypatch.setattr("sys.argv", ["uapt-eval", "--help"])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    out = capsys.readouterr().out
    assert stop.value.code == 0 and out.startswith("uapt-eval:") and "checkpoint=" in out
    assert "uapt-train [group=option" not in out  # not uapt-train's Hydra help
