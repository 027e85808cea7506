"""The data room: rows ► chat messages ► tokens whose labels are exactly the assistant text.

Golden values come from the data itself (the answer text plus the template's end-of-turn
marker) or from a naive reference written here, never from uapt.data.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from uapt import data
from uapt.data import DataError, build_datasets, collate, load_conversations
from uapt.schema import ConfigError
from uapt.sections.dataset import validate_dataset

FIXTURES = Path(__file__).parent / "fixtures" / "data"

# Hand-written templates in the style of real model families (their markers are plain text to the
# tiny tokenizer, which is fine: the tests compare decoded text).
LLAMA3 = (
    "{{ bos_token }}<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: "
    "December 2023\nToday Date: 26 Jul 2024\n\n{% if messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] | trim }}{% set messages = messages[1:] %}{% endif %}<|eot_id|>"
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\n' + "
    "message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Phi-3 closes every turn with <|end|> and the whole text with eos (only when not generating):
# the closer of a non-final turn must not swallow part of the next header.
PHI3 = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + "
    "'<|end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}"
    "{% else %}{{ eos_token }}{% endif %}"
)
# Mistral-style: the space before the reply is template text, which BPE may merge into the
# reply's first token; such a straddling token is trained whole (the documented rule).
MISTRAL = (
    "{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)
# template name -> (chat template or None for ChatML, end-of-turn marker)
TEMPLATES = {
    "chatml": (None, "<|im_end|>"),
    "llama3": (LLAMA3, "<|eot_id|>"),
    "gemma": (GEMMA, "<end_of_turn>"),
    "phi3": (PHI3, "<|end|>"),
    "mistral": (MISTRAL, "<|im_end|>"),  # eos of the tiny tokenizer is <|im_end|>
}


def expected_run(tokenizer, template: str, reply: str) -> str:
    """What decoding a trained turn must give: the reply (templates that trim it: trimmed) and
    its marker; for Mistral also the template's space when BPE merges it into the first token."""
    marker = TEMPLATES[template][1]
    if template in ("llama3", "gemma"):
        reply = reply.strip()
    if template == "mistral":
        first = tokenizer.tokenize(" " + reply)[0]  # byte-level BPE: "Ġ" is the space
        return (" " if first.startswith("Ġ") and first != "Ġ" else "") + reply + marker
    return reply + marker


def with_template(tokenizer, template: str | None):
    tok = copy.deepcopy(tokenizer)
    if template is not None:
        tok.chat_template = template
    return tok


def gsm8k_rows(shared_data: Path, n: int = 20) -> list[dict]:
    lines = (shared_data / "gsm8k" / "train.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def qa(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def label_runs(tokenizer, labels: list[int]) -> list[str]:
    """Decoded text of each maximal run of trained positions."""
    runs, current = [], []
    for label in [*labels, -100]:
        if label != -100:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current, clean_up_tokenization_spaces=False))
            current = []
    return runs


def encode(conversations, tokenizer, max_length=4096):
    columns, counts = data.tokenize_conversations(conversations, tokenizer, max_length)
    return columns, counts


def cfg(**overrides) -> dict:
    base = {
        "name": "t",
        "source": str(FIXTURES / "qa.jsonl"),
        "format": "qa",
        "prompt_field": "q",
        "response_field": "a",
    }
    return {**base, **overrides}


# ----------------------------------------------------------------------------- label exactness
@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_gsm8k_labels_are_exactly_the_answer_and_end_marker(template, tiny_tokenizer, shared_data):
    tok = with_template(tiny_tokenizer, TEMPLATES[template][0])
    rows = gsm8k_rows(shared_data)
    columns, _ = encode([qa(r["question"], r["answer"]) for r in rows], tok)
    assert len(columns["labels"]) == len(rows)
    for row, ids, labels in zip(rows, columns["input_ids"], columns["labels"], strict=True):
        assert label_runs(tok, labels) == [expected_run(tok, template, row["answer"])]
        assert all(lab in (-100, i) for lab, i in zip(labels, ids, strict=True))


def naive_chatml_labels(tokenizer, messages: list[dict]) -> list[int]:
    """Reference for ChatML (whose markers are special tokens): the tokens after the assistant
    header up to and including <|im_end|>, found by tokenising prefixes."""
    ids = tokenizer(
        tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False
    )["input_ids"]
    labels = [-100] * len(ids)
    end_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head = tokenizer.apply_chat_template(
            messages[:i], tokenize=False, add_generation_prompt=True
        )
        start = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        end = ids.index(end_id, start)
        labels[start : end + 1] = ids[start : end + 1]
    return labels


def test_chatml_labels_match_a_naive_reference(tiny_tokenizer, shared_data):
    convs = [qa(r["question"], r["answer"]) for r in gsm8k_rows(shared_data)]
    convs += load_conversations(
        {"name": "s", "source": str(FIXTURES / "sharegpt.json"), "format": "sharegpt"}, seed=0
    )
    columns, _ = encode(convs, tiny_tokenizer)
    for messages, labels in zip(convs, columns["labels"], strict=True):
        assert labels == naive_chatml_labels(tiny_tokenizer, messages)


@pytest.mark.parametrize("template", sorted(TEMPLATES))
def test_every_sharegpt_assistant_turn_is_trained(template, tiny_tokenizer):
    tok = with_template(tiny_tokenizer, TEMPLATES[template][0])
    convs = load_conversations(
        {"name": "s", "source": str(FIXTURES / "sharegpt.json"), "format": "sharegpt"}, seed=0
    )
    if template == "gemma":  # Gemma's template refuses a system role
        convs = [c for c in convs if c[0]["role"] != "system"]
    columns, _ = encode(convs, tok)
    for messages, labels in zip(convs, columns["labels"], strict=True):
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert label_runs(tok, labels) == [expected_run(tok, template, r) for r in replies]


def test_a_token_straddling_the_reply_start_is_trained_whole(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, MISTRAL)
    columns, _ = encode([qa("What is 2 + 2?", "4 apples"), qa("Name a fruit.", "Apples")], tok)
    straddling, plain = columns["labels"]
    first = next(t for t in straddling if t != -100)
    assert tok.decode([first]) == " 4"  # the tiny vocabulary merges " 4" (space from the template)
    assert label_runs(tok, straddling) == [" 4 apples<|im_end|>"]
    assert label_runs(tok, plain) == ["Apples<|im_end|>"]  # " " and "A" stay apart: space untrained


def test_gemma_template_errors_are_reported_with_the_conversation(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, GEMMA)
    sys = [{"role": "system", "content": "Be brief."}, *qa("Hi there", "Hello.")]
    with pytest.raises(DataError, match=r"chat template .*'Be brief\.'.*System role not supported"):
        encode([sys], tok)


def test_alpaca_rule_and_multibyte_text(tiny_tokenizer):
    convs = load_conversations(
        {
            "name": "a",
            "source": str(FIXTURES / "alpaca.json"),
            "format": "alpaca",
            "shuffle_seed": 0,
        },
        seed=0,
    )
    users = sorted(c[0]["content"] for c in convs)
    assert users == sorted(
        [
            "Give three tips for staying healthy.",
            "Translate the sentence into French.\n\nThe cat is black.",
            "Summarise the text in one word.",  # a blank input adds nothing
            "Name a prime number greater than 10.",  # no input field at all
            "Classify the sentiment.\n\nI love this café! 😀",
        ]
    )
    columns, _ = encode(convs, tiny_tokenizer)
    for messages, labels in zip(convs, columns["labels"], strict=True):
        assert label_runs(tiny_tokenizer, labels) == [messages[1]["content"] + "<|im_end|>"]


def test_smollm2_real_tokenizer_labels(cache_dir, shared_data):
    from transformers import AutoTokenizer

    from uapt.smollm2 import ensure_smollm2

    tok = AutoTokenizer.from_pretrained(ensure_smollm2(cache_dir))
    rows = gsm8k_rows(shared_data)
    convs = [qa(r["question"], r["answer"]) for r in rows]
    convs += load_conversations(
        {"name": "s", "source": str(FIXTURES / "sharegpt.json"), "format": "sharegpt"}, seed=0
    )
    columns, _ = encode(convs, tok)
    for messages, labels in zip(convs, columns["labels"], strict=True):
        replies = [m["content"] for m in messages if m["role"] == "assistant"]
        assert label_runs(tok, labels) == [r + "<|im_end|>" for r in replies]
        # SmolLM2's template injects a default system prompt: none of it is trained
        assert "SmolLM" not in "".join(label_runs(tok, labels))


# ----------------------------------------------------------------------------- truncation, skips
def test_truncation_cuts_from_the_right_and_skips_samples_left_without_labels(tiny_tokenizer):
    messages = qa("What is 12 + 30?", "12 + 30 = 42.\n#### 42")
    prompt = tiny_tokenizer.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True
    )
    n_prompt = len(tiny_tokenizer(prompt, add_special_tokens=False)["input_ids"])
    full, _ = encode([messages], tiny_tokenizer)
    cut, counts = encode([messages], tiny_tokenizer, max_length=n_prompt + 3)
    assert cut["input_ids"] == [full["input_ids"][0][: n_prompt + 3]]
    assert cut["labels"][0] == [-100] * n_prompt + full["input_ids"][0][n_prompt : n_prompt + 3]
    assert counts["truncated"] == 1
    gone, counts = encode([messages], tiny_tokenizer, max_length=n_prompt)
    assert gone["input_ids"] == [] and counts["no_trainable_token"] == 1


def test_skips_are_counted_in_stats(tiny_tokenizer, tmp_path):
    _, _, stats = build_datasets(cfg(), tiny_tokenizer, 0, tmp_path)
    # qa.jsonl: 6 rows (+1 blank line): one empty answer, one empty question
    assert stats == {
        "train": 4,
        "val": 0,
        "truncated": 0,
        "skipped": {"empty_response": 1, "empty_prompt": 1, "no_trainable_token": 0},
    }
    _, _, stats = build_datasets(
        {"name": "s", "source": str(FIXTURES / "sharegpt.json"), "format": "sharegpt"},
        tiny_tokenizer,
        0,
        tmp_path,
    )
    assert stats["train"] == 3
    assert stats["skipped"] == {
        "empty_response": 1,
        "no_trainable_token": 0,
        "bad_turn_order": 1,
        "no_assistant_turn": 1,
    }
    # 3 tokens hold no more than "<|im_start|>user\n": no sample keeps a trained token
    with pytest.raises(DataError, match=r"dataset.source='.*qa.jsonl': no training sample left"):
        build_datasets(cfg(max_length=3), tiny_tokenizer, 0, tmp_path)


# ----------------------------------------------------------------------------- bad input
def test_malformed_jsonl_line_names_file_and_line(tiny_tokenizer, tmp_path):
    path = FIXTURES / "qa_malformed.jsonl"
    with pytest.raises(DataError, match=rf"{path}:3: malformed JSON line"):
        build_datasets(
            cfg(source=str(path), prompt_field="question", response_field="answer"),
            tiny_tokenizer,
            0,
            tmp_path,
        )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"source": "/nonexistent/x.jsonl"},
            "dataset.source: file not found: /nonexistent/x.jsonl",
        ),
        ({"format": "foo"}, "dataset.format='foo' is not one of: qa, alpaca, sharegpt"),
        ({"source": str(FIXTURES)}, "is not a .json, .jsonl or .parquet file"),
        ({"val_size": 1.5}, "dataset.val_size=1.5 is not an integer >= 0"),
        ({"max_length": 1}, "dataset.max_length=1 is not an integer >= 2"),
        ({"num_train": 10}, "dataset.num_train only applies to dataset.source=synthetic"),
        ({"colour": "red"}, "dataset.colour is not a known option"),
        ({"source": None}, "dataset.source is required"),
        ({"source": "synthetic", "num_train": None}, "dataset.num_train is required"),
        ({"data_files": 3}, "dataset.data_files=3 is not a file name, list or mapping"),
    ],
)
def test_config_errors_name_the_key(overrides, message, tiny_tokenizer, tmp_path):
    with pytest.raises(ConfigError) as err:
        validate_dataset(cfg(**overrides))
    assert message in str(err.value)
    with pytest.raises(ConfigError):
        build_datasets(cfg(**overrides), tiny_tokenizer, 0, tmp_path)


@pytest.mark.parametrize(
    ("source", "fmt", "message"),
    [
        (
            "sharegpt_unknown_role.jsonl",
            "sharegpt",
            r"sharegpt_unknown_role.jsonl:2 turn 1: unknown role 'robot'; known: system, human",
        ),
        (
            "alpaca_missing_output.jsonl",
            "alpaca",
            r"alpaca_missing_output.jsonl:2: missing field 'output'; "
            r"the row has: instruction, input, response",
        ),
        (
            "qa.jsonl",
            "sharegpt",
            r"qa.jsonl:1: missing field 'conversations' "
            r"\(dataset.conversations_field\)",
        ),
    ],
)
def test_bad_rows_name_file_and_row(source, fmt, message):
    with pytest.raises(DataError, match=message):
        load_conversations({"name": "x", "source": str(FIXTURES / source), "format": fmt}, 0)
    with pytest.raises(DataError, match=r"qa.jsonl:1: missing field 'question' \(dataset.prompt"):
        load_conversations({"name": "x", "source": str(FIXTURES / "qa.jsonl"), "format": "qa"}, 0)


def test_json_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in (FIXTURES / "qa.jsonl").read_text().splitlines() if line]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "qa.parquet")
    (tmp_path / "qa.json").write_text(json.dumps(rows))
    expected = load_conversations(cfg(), seed=3)
    assert len(expected) == 4
    assert load_conversations(cfg(source=str(tmp_path / "qa.parquet")), seed=3) == expected
    assert load_conversations(cfg(source=str(tmp_path / "qa.json")), seed=3) == expected
    (tmp_path / "bad.json").write_text('[{"q": "a",\n "a": }]')
    with pytest.raises(DataError, match=r"bad.json:2: malformed JSON"):
        load_conversations(cfg(source=str(tmp_path / "bad.json")), seed=0)


def test_system_prompt_is_prepended_when_missing():
    convs = load_conversations(
        {
            "name": "s",
            "source": str(FIXTURES / "sharegpt.json"),
            "format": "sharegpt",
            "system_prompt": "Be kind.",
        },
        seed=0,
    )
    systems = sorted(c[0]["content"] for c in convs)
    assert systems == ["Be kind.", "Be kind.", "You are terse."]
    assert all(c[0]["role"] == "system" and c[-1]["role"] == "assistant" for c in convs)


# ------------------------------------------------------------------------- split, shuffle, cache
def arith_cfg(**overrides) -> dict:
    return {
        "name": "arith",
        "source": "synthetic",
        "format": "qa",
        "num_train": 40,
        "val_size": 10,
        "max_length": 256,
        **overrides,
    }


def decoded(tokenizer, dataset) -> list[str]:
    return [tokenizer.decode(row["input_ids"]) for row in dataset]


def test_split_and_shuffle_are_deterministic_for_a_seed(tiny_tokenizer, tmp_path):
    from uapt.arith import arith_rows

    train, val, stats = build_datasets(arith_cfg(), tiny_tokenizer, 0, tmp_path)
    assert (stats["train"], stats["val"]) == (40, 10)
    a_train, a_val = decoded(tiny_tokenizer, train), decoded(tiny_tokenizer, val)
    assert not set(a_train) & set(a_val)
    questions = {r["question"] for r in arith_rows(50, 0)}
    assert {t.split("user\n")[1].split("<|im_end|>")[0] for t in a_train + a_val} == questions
    again = build_datasets(arith_cfg(), tiny_tokenizer, 0, None)  # no cache: recomputed
    assert (decoded(tiny_tokenizer, again[0]), decoded(tiny_tokenizer, again[1])) == (
        a_train,
        a_val,
    )
    other = build_datasets(arith_cfg(), tiny_tokenizer, 1, tmp_path)
    assert decoded(tiny_tokenizer, other[1]) != a_val
    pinned = build_datasets(arith_cfg(shuffle_seed=0), tiny_tokenizer, 1, tmp_path)
    assert decoded(tiny_tokenizer, pinned[1]) == a_val  # shuffle_seed overrides the run seed
    frac = build_datasets(arith_cfg(val_size=0.25), tiny_tokenizer, 0, tmp_path)[2]
    assert (frac["train"], frac["val"]) == (40, 10)  # arith: a fraction of num_train, on top
    capped = build_datasets(cfg(val_size=0.5, max_samples=3), tiny_tokenizer, 0, tmp_path)[2]
    assert (capped["train"], capped["val"]) == (1, 2)  # round(0.5 * 3) = 2 held out
    with pytest.raises(ConfigError, match=r"dataset\.val_size=4 holds out 4 of 4"):
        build_datasets(cfg(val_size=4), tiny_tokenizer, 0, tmp_path)


def test_second_build_is_a_cache_hit(tiny_tokenizer, tmp_path, monkeypatch):
    calls = []
    real = data.tokenize_conversations

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(data, "tokenize_conversations", counting)
    first = build_datasets(arith_cfg(), tiny_tokenizer, 0, tmp_path)
    assert len(calls) == 2  # train and val
    assert len(list((tmp_path / "datasets").iterdir())) == 1
    second = build_datasets(arith_cfg(), tiny_tokenizer, 0, tmp_path)
    assert len(calls) == 2  # nothing tokenised again
    assert second[2] == first[2]
    assert second[0]["input_ids"] == first[0]["input_ids"]
    assert second[0]["labels"] == first[0]["labels"]
    build_datasets(arith_cfg(max_length=128), tiny_tokenizer, 0, tmp_path)
    assert len(calls) == 4  # another max_length is another entry
    build_datasets(arith_cfg(), with_template(tiny_tokenizer, GEMMA), 0, tmp_path)
    assert len(calls) == 6  # so is another chat template
    assert len(list((tmp_path / "datasets").iterdir())) == 3


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("arith", ["dataset.num_train=16", "dataset.val_size=4"]),
        (
            "gsm8k",
            [
                "dataset.source=../shared/data/gsm8k/train.jsonl",
                "dataset.max_samples=12",
                "dataset.val_size=2",
            ],
        ),
        ("alpaca", [f"dataset.source={FIXTURES / 'alpaca.json'}", "dataset.val_size=1"]),
        ("sharegpt", [f"dataset.source={FIXTURES / 'sharegpt.json'}", "dataset.val_size=1"]),
    ],
)
def test_shipped_configs_build_offline(name, overrides, tiny_tokenizer, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # ../shared/data is repo-relative
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        node = compose(config_name="train", overrides=[f"dataset={name}", *overrides]).dataset
    train, val, stats = build_datasets(node, tiny_tokenizer, 0, tmp_path)  # a DictConfig
    expected = {"arith": (16, 4), "gsm8k": (10, 2), "alpaca": (4, 1), "sharegpt": (2, 1)}[name]
    assert (stats["train"], stats["val"]) == expected
    assert len(train) == stats["train"] and len(val) == stats["val"]


# ----------------------------------------------------------------------------- collate
def test_collate_pads_right():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    out = collate(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert all(t.dtype == torch.long for t in out.values())
