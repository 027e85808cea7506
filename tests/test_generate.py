"""uapt's greedy loop for lm-eval's generate_until (uapt.evaluation.generate): the same outputs
and scores as lm-eval's call to model.generate, rows leaving the batch as they finish, the cases
where it hands a batch back to model.generate, and eval.generate as a knob outside the run id."""

from __future__ import annotations

import copy
import logging
import random

import pytest
import torch
from lm_eval.api.instance import Instance

from uapt import records
from uapt.evaluation import run_suite, suite_hash
from uapt.evaluation import suite as suite_module
from uapt.evaluation.generate import (
    NEAR_TIE,
    ExactSizes,
    InPlaceCache,
    StopTexts,
    UaptLM,
    difference,
    divergence,
    fast_path_blocker,
    greedy_generate,
    overlaps,
    should_compact,
)
from uapt.schema import ConfigError

# Fixed prompts of varied lengths (left padding differs per row) for the tiny model.
PROMPTS = [f"Question {i}: what is {i} plus {i * 7}? " + "and more " * (i % 5) for i in range(12)]
# Texts the tiny model (random init, seed 0) writes early in many of its replies, at various
# steps, so rows finish at different times; "\ufffd" also appears (bytes of a split character).
FREQUENT = ["Fatima e", " 4", "with"]


def lm_for(model, tokenizer, generator: str, batch_size: int = 5) -> UaptLM:
    return UaptLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, generator=generator)


def requests(until: list[str], max_gen_toks: int = 24, prompts=PROMPTS) -> list[Instance]:
    kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
    return [Instance("generate_until", {}, (p, dict(kwargs)), i) for i, p in enumerate(prompts)]


def continuations(lm: UaptLM) -> dict[tuple[int, ...], list[int]]:
    """Spy on lm._model_generate: each row's generated ids, keyed by its unpadded prompt ids."""
    found: dict[tuple[int, ...], list[int]] = {}
    inner = lm._model_generate

    def spy(context, max_length, stop, **kwargs):
        out = inner(context, max_length, stop, **kwargs)
        for row, mask, ids in zip(context, kwargs["attention_mask"], out, strict=True):
            found[tuple(row[mask.bool()].tolist())] = ids[context.shape[1] :].tolist()
        return out

    lm._model_generate = spy
    return found


def run_both(model, tokenizer, until, monkeypatch=None, batch_size=5, max_gen_toks=24):
    """Outputs and generated ids of lm-eval's path and of the fast path on the same requests;
    with `monkeypatch`, also the batch sizes the fast path shrank its batches to."""
    result, shrinks = {}, []
    if monkeypatch is not None:
        keep = InPlaceCache.keep_rows

        def spy(self, rows):
            shrinks.append(len(rows))
            keep(self, rows)

        monkeypatch.setattr(InPlaceCache, "keep_rows", spy)
    for generator in ("hf", "fast"):
        lm = lm_for(model, tokenizer, generator, batch_size)
        ids = continuations(lm)
        texts = lm.generate_until(requests(until, max_gen_toks), disable_tqdm=True)
        result[generator] = (texts, ids, dict(lm.fallbacks))
    return result, shrinks


def assert_same_outputs(model, result, pad: int) -> None:
    """Per prompt, the fast path's text equals lm-eval's, and so do the generated ids up to where
    the fast path finished the row (it pads after that; model.generate may go on). On CPU the
    loop computes each row bitwise as model.generate does (see the module docstring), so the ids
    never part; elsewhere they may, at a near tie (generate.divergence, NEAR_TIE)."""
    hf_texts, hf_ids, _ = result["hf"]
    fast_texts, fast_ids, fallbacks = result["fast"]
    assert not fallbacks
    assert fast_texts == hf_texts
    for prompt, reference in hf_ids.items():
        ours = fast_ids[prompt]
        end = len(ours)
        while end and ours[end - 1] == pad:
            end -= 1
        assert divergence(model, prompt, reference[:end], ours[:end]) is None


# ----------------------------------------------------------------------------- same outputs
@pytest.mark.parametrize("batch_size", [5, 12])  # 12 prompts by 5: batches of 5, 5 and 2
@pytest.mark.parametrize("until", [[], FREQUENT])
def test_outputs_equal_model_generate(tiny_model, tiny_tokenizer, until, batch_size, monkeypatch):
    result, shrinks = run_both(tiny_model, tiny_tokenizer, until, monkeypatch, batch_size)
    assert_same_outputs(tiny_model, result, tiny_tokenizer.pad_token_id)
    if until:  # rows finished early and left their batch
        assert shrinks and max(shrinks) < batch_size
    else:  # no stop sequence, no end-of-sequence token: every row runs to max_gen_toks
        assert not shrinks


@pytest.mark.slow
def test_outputs_equal_model_generate_on_two_threads(tiny_model, tiny_tokenizer, monkeypatch):
    """BLAS splits a product's rows across threads, so other batch sizes are exact."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        result, shrinks = run_both(tiny_model, tiny_tokenizer, FREQUENT, monkeypatch, 12, 16)
    finally:
        torch.set_num_threads(before)
    assert_same_outputs(tiny_model, result, tiny_tokenizer.pad_token_id)
    assert shrinks


def test_rows_ending_at_an_end_of_sequence_token_equal_model_generate(
    tiny_model, tiny_tokenizer, monkeypatch
):
    """End-of-sequence ids come from the model's generation config: make a token the tiny model
    writes often one of them, so rows end (and are padded) at many different steps."""
    probe = lm_for(tiny_model, tiny_tokenizer, "hf")
    ids = continuations(probe)
    probe.generate_until(requests([]), disable_tqdm=True)
    counts: dict[int, int] = {}
    for row in ids.values():
        for t in row[4:]:
            counts[t] = counts.get(t, 0) + 1
    common = max(counts, key=counts.get)
    monkeypatch.setattr(tiny_model.generation_config, "eos_token_id", [common, 2])
    result, shrinks = run_both(tiny_model, tiny_tokenizer, [], monkeypatch)
    assert_same_outputs(tiny_model, result, tiny_tokenizer.pad_token_id)
    ended = [row for row in result["fast"][1].values() if common in row]
    assert len(ended) > 3 and shrinks
    for row in ended:  # padded after its end, as model.generate pads
        tail = row[row.index(common) + 1 :]
        assert tail == [tiny_tokenizer.pad_token_id] * len(tail)


@pytest.mark.parametrize("lora", [False, True], ids=["plain", "lora"])
@pytest.mark.parametrize("arch", ["llama", "phi3", "gemma2"])
def test_other_architectures_and_lora_adapters(arch, lora, tiny_tokenizer, cache_dir):
    """uapt's random-init architectures, bare and with LoRA adapters (a PeftModel, as a LoRA run
    evaluates it): the same outputs; Gemma-2 (sliding-window layers) goes to model.generate."""
    from test_models import LORA, build, model_cfg

    model = build(model_cfg(arch, **({"lora": LORA} if lora else {})), tiny_tokenizer, cache_dir)
    gen = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # zero at init: give the adapters an effect
            p.data.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    result, _ = run_both(model, tiny_tokenizer, FREQUENT, max_gen_toks=16)
    if arch == "gemma2":
        assert result["fast"][0] == result["hf"][0]
        (reason,) = result["fast"][2]
        assert "layer types" in reason
    else:
        assert_same_outputs(model, result, tiny_tokenizer.pad_token_id)


@pytest.mark.slow
def test_suite_scores_and_samples_equal_with_either_generator(tiny_model, tiny_tokenizer, tmp_path):
    """The embedded suite end to end (lm-eval's prompts, stop sequences, filters and metrics):
    the same per-sample outputs and outcomes and the same scores."""
    from test_evaluation import load_suite, read_jsonl

    out = {}
    for generator in ("hf", "fast"):
        suite = load_suite("embedded")
        suite.update(limit=6, log_samples=True, batch_size=4, generate=generator)
        for task in suite["tasks"]:
            task["max_gen_toks"] = 12
        folder = tmp_path / generator
        result = run_suite(tiny_model, tiny_tokenizer, suite, device="cpu", out_dir=folder)
        assert result["eval_meta"]["generation"] == {"generate": generator, "fell_back": {}}
        samples = {
            task: [(s["doc_id"], s["resps"]) for s in read_jsonl(folder / "eval_samples" / f)]
            for task, f in (("arith", "arith.jsonl"), ("ifeval", "ifeval_embedded.jsonl"))
        }
        outcomes = (folder / "eval_outcomes.jsonl").read_text()
        out[generator] = (result["eval"], samples, outcomes)
    assert out["fast"] == out["hf"]
    assert len(out["fast"][1]["arith"]) == 12  # 6 documents x 2 filters


# ----------------------------------------------------------------------------- the pieces
def test_exact_sizes_compute_rows_as_the_full_batch_does(tiny_model):
    """Every batch size ExactSizes calls exact gives the model's logits bitwise as in the full
    batch (a decoding step's input: one token per row over a shared prompt)."""
    full = 12
    sizes = ExactSizes(tiny_model, full)
    ids = torch.randint(3, 200, (full, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = tiny_model(input_ids=ids).logits[:, -1]
        exact = [n for n in range(1, full + 1) if sizes.exact(n)]
        for n in exact:
            assert torch.equal(tiny_model(input_ids=ids[:n]).logits[:, -1], whole[:n]), n
    assert full in exact and sizes.at_least(exact[0], full) == exact[0]
    assert sizes.at_least(full, full) == full


def test_in_place_cache_matches_concatenation(tiny_model):
    """Keys and values written in place (and rows dropped) are those a DynamicCache holds."""
    from transformers.cache_utils import DynamicCache

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 200, (6, 7), generator=gen)
    steps = torch.randint(3, 200, (6, 3), generator=gen)
    ours, theirs = InPlaceCache(tiny_model.config.num_hidden_layers, 10), DynamicCache()
    with torch.no_grad():
        for cache in (ours, theirs):
            tiny_model(input_ids=ids, cache=cache, use_cache=True)
            for t in range(2):
                tiny_model(input_ids=steps[:, t : t + 1], cache=cache, use_cache=True)
        keep = torch.tensor([0, 2, 3, 5])
        ours.keep_rows(keep)
        theirs.batch_select_indices(keep)
        last = steps[keep, 2:3]
        a = tiny_model(input_ids=last, cache=ours, use_cache=True).logits
        b = tiny_model(input_ids=last, cache=theirs, use_cache=True).logits
    assert torch.equal(a, b)
    for mine, ref in zip(ours.layers, theirs.layers, strict=True):
        assert torch.equal(mine.keys, ref.keys) and torch.equal(mine.values, ref.values)
    assert ours.get_seq_length() == 10


def test_packed_prefill_gives_the_padded_batch_numbers(tiny_model, tiny_tokenizer):
    """Prompts run packed (real tokens only) give bitwise the last-position logits, keys and
    values that the left-padded batch gives, as model.generate's prefill computes them."""
    from uapt.evaluation import generate

    lm = lm_for(tiny_model, tiny_tokenizer, "fast")
    ids, mask = lm.tok_batch_encode(PROMPTS[:7])
    assert not bool(mask.bool().all())  # the batch has padding
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    layers = tiny_model.config.num_hidden_layers
    packed, padded = InPlaceCache(layers, ids.shape[1]), InPlaceCache(layers, ids.shape[1])
    calls = []
    inner = generate.sdpa_attention_forward

    def counted(*args, **kwargs):  # packed_sdpa's inner call (the padded run's goes elsewhere)
        calls.append(1)
        return inner(*args, **kwargs)

    with torch.no_grad(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(generate, "sdpa_attention_forward", counted)
        ours = generate._prefill(tiny_model, ids, mask, positions, packed)
        theirs = generate._forward(tiny_model, ids, mask, positions, padded)
    assert len(calls) == layers  # the packed path ran
    assert tiny_model.config._attn_implementation == "sdpa"  # and was switched back
    assert torch.equal(ours, theirs[:, -1:])
    real = mask.bool()
    for a, b in zip(packed.layers, padded.layers, strict=True):
        for ours_, theirs_ in ((a.keys, b.keys), (a.values, b.values)):
            # [rows, heads, columns, dim] -> [rows, columns, heads, dim]: tokens by (row, column)
            assert torch.equal(ours_.transpose(1, 2)[real], theirs_.transpose(1, 2)[real])
            assert not ours_.transpose(1, 2)[~real].any()  # pads: zeros, masked everywhere


def test_stop_texts_fire_when_the_whole_decoded_text_first_holds_a_stop(tiny_tokenizer):
    """The incremental check against the naive one: decode every prefix in full."""
    rng = random.Random(0)
    vocab = tiny_tokenizer.vocab_size
    specials = [tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id]
    stops = ["ab", "Fatima", "\n\n", "é"]
    for trial in range(60):
        row = [
            rng.choice(specials) if rng.random() < 0.05 else rng.randrange(vocab) for _ in range(40)
        ]
        check = StopTexts(tiny_tokenizer, stops)
        fired = next((t for t in range(1, 41) if check.reached(trial, row[t - 1], row[:t])), None)
        naive = next(
            (
                t
                for t in range(1, 41)
                if any(s in tiny_tokenizer.decode(row[:t], skip_special_tokens=True) for s in stops)
            ),
            None,
        )
        assert fired == naive, (trial, row)


def test_should_compact_when_the_rows_saved_outweigh_the_rows_copied():
    assert not should_compact(0, 32, 100)
    assert should_compact(1, 32, 100)  # 100 row-steps saved, 31 rows copied
    assert not should_compact(1, 32, 10)
    assert should_compact(16, 32, 2)


def test_overlaps_names_shared_characters_at_either_end():
    assert overlaps("<|im_end|>", "<|im_end|>")
    assert overlaps("end|>x", "<|im_end|>")  # a suffix of the special text starts the stop
    assert overlaps("x<|", "<|im_start|>")
    assert not overlaps("Question:", "<|im_end|>")
    assert not overlaps("\n\n", "<|endoftext|>")


def test_divergence_is_the_reference_margin_at_the_first_difference(tiny_model):
    prompt = [5, 17, 33, 8]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        reference = greedy_generate(
            tiny_model, ids, torch.ones_like(ids), max_new_tokens=6, eos_ids=[], pad_id=0
        )[0, 4:].tolist()
        logits = tiny_model(input_ids=torch.tensor([prompt + reference[:3]])).logits[0, -1]
    second = int(torch.topk(logits, 2).indices[1])
    other = [*reference[:3], second, 9, 9]
    index, margin = divergence(tiny_model, prompt, reference, other)
    assert index == 3
    assert margin == pytest.approx(float(logits[reference[3]] - logits[second]), abs=1e-6)
    assert margin > 0
    assert divergence(tiny_model, prompt, reference, reference[:4]) is None


def test_a_difference_at_tied_logits_is_a_near_tie_and_one_at_a_clear_choice_is_not(tiny_model):
    """What the benchmark counts (generate.difference): give a second token the output-layer row
    of the reference's token at step 3, so the two logits tie; departing there is a near tie,
    departing to the least likely token is not."""
    model = copy.deepcopy(tiny_model)  # the session's model stays untouched
    prompt = [5, 17, 33, 8]
    ids = torch.tensor([prompt])
    reference = greedy_generate(
        model, ids, torch.ones_like(ids), max_new_tokens=6, eos_ids=[], pad_id=0
    )[0, 4:].tolist()
    unused = [t for t in range(3, 200) if t not in prompt and t not in reference]
    twin, head = unused[0], model.get_output_embeddings()
    with torch.no_grad():
        head.weight[twin] = head.weight[reference[3]]  # twin is no input: only its logit changes
        logits = model(input_ids=torch.tensor([prompt + reference[:3]])).logits[0, -1]
    least = int(logits.argmin())
    tied = difference(model, prompt, reference, [*reference[:3], twin, 7])
    # the same weights times the same hidden state: equal up to the order of one dot product's
    # 64 float32 terms (|logit| < 10 here), far below NEAR_TIE
    assert tied["token"] == 3 and abs(tied["margin"]) < 1e-5 and tied["near_tie"]
    clear = difference(model, prompt, reference, [*reference[:3], least])
    margin = float(logits[reference[3]] - logits[least])  # by hand, from the logits above
    assert clear["token"] == 3 and clear["margin"] == pytest.approx(margin, abs=1e-6)
    assert margin > NEAR_TIE and not clear["near_tie"]
    assert difference(model, prompt, reference, reference) is None


# ----------------------------------------------------------------------------- when it steps aside
def test_what_the_loop_does_not_reproduce_goes_to_model_generate(
    tiny_model, tiny_tokenizer, monkeypatch
):
    def blocker(stops=(), **kwargs):
        return fast_path_blocker(tiny_model, tiny_tokenizer, list(stops), kwargs)

    assert blocker(["Question:", "<|im_end|>"], attention_mask=None, do_sample=False) is None
    assert "sampling" in blocker(do_sample=True)
    assert "sampling" in blocker(temperature=0.7)
    assert "top_p_bogus" in blocker(top_p_bogus=1)
    assert "overlaps" in blocker(["end|>"])
    assert "is a special token" in blocker(["<|im_start|>"])
    with monkeypatch.context() as patch:
        patch.setattr(tiny_model.generation_config, "repetition_penalty", 1.3)
        assert "repetition_penalty" in blocker()
    monkeypatch.setattr(tiny_tokenizer, "clean_up_tokenization_spaces", True)
    assert "cleans up spaces" in blocker()


def test_a_batch_it_does_not_reproduce_runs_model_generate_and_says_so(
    tiny_model, tiny_tokenizer, caplog
):
    lm = lm_for(tiny_model, tiny_tokenizer, "fast")
    hf = lm_for(tiny_model, tiny_tokenizer, "hf")
    reqs = requests(["<|im_start|>"], max_gen_toks=6)
    with caplog.at_level(logging.WARNING, logger="uapt.evaluation"):
        got = lm.generate_until(reqs, disable_tqdm=True)
    assert got == hf.generate_until(requests(["<|im_start|>"], max_gen_toks=6), disable_tqdm=True)
    reason = "the stop sequence '<|im_start|>' is a special token that does not end generation"
    assert lm.fallbacks == {reason: 3}  # 12 prompts in batches of 5
    assert caplog.text.count(reason) == 1
    assert hf.fallbacks == {}


# ----------------------------------------------------------------------------- the knob
def test_generate_is_not_part_of_the_run_id_nor_of_the_base_score_key():
    from test_records import base_cfg

    cfg = base_cfg()
    other = base_cfg()
    other["eval"]["generate"] = "hf"
    assert records.run_id(cfg) == records.run_id(other)
    suite = {"name": "embedded", "tasks": ["arith"], "generate": "fast"}
    assert suite_hash(suite) == suite_hash({**suite, "generate": "hf"})
    assert "generate" in records.NON_SEMANTIC["eval"]


def test_a_bad_generate_value_names_the_key():
    with pytest.raises(ConfigError, match=r"eval\.generate.*fast, hf"):
        suite_module.parse_suite({"name": "x", "tasks": ["arith"], "generate": "vllm"})
    assert suite_module.parse_suite({"name": "x", "tasks": []}).generate == "fast"
