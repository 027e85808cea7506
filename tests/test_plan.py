"""The plan's parts, in process: the cost model against hand counts, run-folder states, the "why
new" diff, uapt-diff, and the plan's config. The plan of real sweeps: tests/test_plan_sweeps.py."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
from helpers import TINY, compose_run

from uapt import costs, diff, files, plan, records
from uapt.devices import DEVICES, rate
from uapt.schema import ConfigError
from uapt.sections import ObjectiveSpec, PlanConfig, TrainerConfig

NO_DATA = [a for a in TINY if not a.startswith("dataset")]  # the tiny run, for other data

# A model whose every figure is known: N = 1000 multiplied parameters, 2 layers, attention 8
# wide. A row of T tokens costs 2 N T + 4 L A T^2 = 2000 T + 64 T^2 forward (PaLM's count).
SHAPE = costs.ModelShape(params=1200, matmul_params=1000, layers=2, attn_width=8, source="test")


def fwd(t: int) -> int:
    return 2000 * t + 64 * t * t


def trainer(**changes) -> TrainerConfig:
    base = {"max_steps": 2, "batch_size": 2, "micro_batch_size": 1, "log_every": 1, "val_every": 0}
    return TrainerConfig.parse({**base, **changes})


def objective(**changes) -> ObjectiveSpec:
    return ObjectiveSpec.parse({"name": "x", **changes})


# ----------------------------------------------------------------------------- hand counts
# Two training rows of 4 and 6 tokens, one validation row of 5; batch 2, so every step reads
# both rows (an epoch) and 2 steps read each row twice.
ROWS = costs.Rows(train=[4, 6], val=[5])


def test_tokens_and_flops_of_mle_packed_match_a_hand_count():
    cost = costs.train_cost(trainer(), objective(), SHAPE, ROWS, seed=0, lora=False)
    assert cost.steps == 2 and cost.tokens == 2 * (4 + 6) and cost.computed == 20
    assert cost.flops["student"] == 3 * 2 * (fwd(4) + fwd(6))  # forward + 2 x backward
    assert cost.flops["validation"] == fwd(5)  # once, at the end (val_every=0)
    assert set(cost.flops) == {"student", "validation"}
    assert cost.rows_read == {0, 1}


def test_padded_micro_batches_compute_their_padding():
    cost = costs.train_cost(
        trainer(micro_batch_size=2, packing=False), objective(), SHAPE, ROWS, 0, False
    )
    assert cost.tokens == 20 and cost.computed == 2 * (2 * 6)  # both rows padded to 6
    assert cost.flops["student"] == 3 * 2 * (2 * fwd(6))


def test_lora_trains_at_twice_the_forward():
    cost = costs.train_cost(trainer(), objective(), SHAPE, ROWS, 0, lora=True)
    assert cost.flops["student"] == 2 * 2 * (fwd(4) + fwd(6))


def test_live_teacher_scoring_pass_and_probe_match_a_hand_count():
    spec = objective(mask_ratio=0.5, distill_weight=1.0, scope="batch")
    cost = costs.train_cost(trainer(), spec, SHAPE, ROWS, 0, False)
    step = fwd(4) + fwd(6)
    assert cost.flops["teacher"] == 2 * step  # distillation: a teacher forward every step
    # scope=batch over two micro-batches of one row: the student and the teacher score first
    assert cost.flops["scoring"] == 2 * 2 * step
    # the probe (the first batch_size validation rows) is scored at both logged steps, twice
    assert cost.flops["probe"] == 2 * 2 * fwd(5)


def test_a_cached_teacher_runs_no_forward_and_reads_its_rows():
    spec = objective(distill_weight=1.0, teacher="cached")
    cost = costs.train_cost(trainer(), spec, SHAPE, ROWS, 0, False)
    assert "teacher" not in cost.flops
    assert costs.cache_fill_flops(SHAPE, {"a": 4, "b": 6}) == fwd(4) + fwd(6)


def test_a_resumed_run_costs_only_the_steps_left():
    cost = costs.train_cost(trainer(max_steps=3), objective(), SHAPE, ROWS, 0, False, 2)
    assert cost.steps == 1 and cost.tokens == 10


def test_validation_every_n_steps_counts_each():
    cost = costs.train_cost(trainer(max_steps=4, val_every=2), objective(), SHAPE, ROWS, 0, False)
    assert cost.flops["validation"] == 2 * fwd(5)  # step 2, and the end (step 4 is the end)


def test_eval_tasks_cost_by_kind():
    scored = costs.TaskCost("mc", "multiple_choice", samples=3, requests=4, prompt=10, new=2)
    assert costs.eval_flops([scored], SHAPE) == 3 * 4 * fwd(12)
    gen = costs.TaskCost("g", "generate_until", samples=2, requests=1, prompt=10, new=4)
    # the prompt once, then 4 tokens, each 2N plus attention over the context (10 + 4/2 mean)
    per_sample = fwd(10) + 4 * (2000 + 4 * 2 * 8 * 12)
    assert costs.eval_flops([gen], SHAPE) == 2 * per_sample
    assert costs.TASK_KINDS["nll"] is costs.TASK_KINDS["loglikelihood"]


NLL_ROWS = [("What is 2 + 3?", "It is 5."), ("Name a colour.", "Blue, the colour of the sky.")]


def nll_spec(tmp_path: Path, **extra):
    from uapt.sections import TaskSpec

    path = tmp_path / "nll.jsonl"
    path.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in NLL_ROWS))
    raw = {"name": "toy_nll", "task": "nll", "data_files": str(path), **extra}
    return TaskSpec.parse({**raw, "prompt_field": "q", "response_field": "a"}, "eval.tasks[0]")


def test_the_nll_task_costs_one_forward_over_prompt_and_response(tmp_path, tiny_tokenizer):
    system = "Answer briefly."
    found = costs.task_cost(nll_spec(tmp_path), tiny_tokenizer, system)
    prompts, scored = [], []
    for q, a in NLL_ROWS:  # by hand: the chat template with and without the response
        head = [{"role": "system", "content": system}, {"role": "user", "content": q}]
        full = tiny_tokenizer.apply_chat_template(
            [*head, {"role": "assistant", "content": a}], tokenize=True
        )["input_ids"]
        asked = tiny_tokenizer.apply_chat_template(head, tokenize=True, add_generation_prompt=True)[
            "input_ids"
        ]
        scored.append(len(full) - len(asked) - 1)  # the newline after the end of turn: no label
        prompts.append(len(full) - scored[-1])
    assert (found.kind, found.samples, found.requests) == ("nll", 2, 1)
    assert found.prompt == sum(prompts) / 2 and found.new == sum(scored) / 2
    assert found.estimate is None
    mean = round(found.prompt + found.new)
    assert costs.eval_flops([found], SHAPE) == 2 * fwd(mean)  # one forward per row, no generation


def test_the_nll_task_without_its_tokenizer_is_an_estimate_with_its_rule(tmp_path):
    found = costs.task_cost(nll_spec(tmp_path, max_length=15), None)
    # characters / 4 rounded up, + 4 per message: prompts 4 + 4 and 4 + 4; responses 2 + 4 and
    # 7 + 4, the second cut to 15 - 8 = 7 by max_length
    assert (found.samples, found.prompt, found.new) == (2, 8, (6 + 7) / 2)
    assert "characters/4 + 4 per message, capped at max_length" in found.estimate


def test_tokenised_rows_of_a_constructed_file_are_counted_exactly(tmp_path, tiny_tokenizer):
    rows = [{"q": f"What is {i} + {i}?" * (i + 1), "a": f"It is {2 * i}."} for i in range(4)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = plan.checked_run(
        compose_run(
            *NO_DATA, "dataset=gsm8k", f"dataset.source={path}", "dataset.val_size=0",
            "dataset.prompt_field=q", "dataset.response_field=a", "trainer.max_steps=3",
            f"cache_dir={tmp_path / 'cache'}",
        )
    )  # fmt: skip
    found = costs.tokenised_rows(run.dataset, tiny_tokenizer, run.seed, run.cache_dir)
    by_hand = sorted(
        len(tiny_tokenizer.apply_chat_template(
            [{"role": "user", "content": r["q"]}, {"role": "assistant", "content": r["a"]}],
            tokenize=True,
        )["input_ids"])
        for r in rows
    )  # fmt: skip
    assert sorted(found.train) == by_hand
    cost = costs.train_cost(run.trainer, run.objective, SHAPE, found, run.seed, False)
    assert cost.tokens == 3 * sum(by_hand)  # 3 steps of 4 rows: each row 3 times


def test_model_shapes_match_hand_counts(tiny_tokenizer, tmp_path):
    run = plan.checked_run(compose_run(*TINY))
    tiny = costs.model_shape(run.model, run.cache_dir, tiny_tokenizer)
    v = len(tiny_tokenizer)
    layer = 64 * 64 + 64 * 32 + 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64  # GQA: 2 of 4 heads
    assert tiny.params == 2 * v * 64 + 2 * layer + 64  # embedding, head, layers, final norm
    assert tiny.matmul_params == tiny.params - v * 64 and tiny.layers == 2
    assert tiny.attn_width == 64
    smol = compose_run("model=smollm2_135m", f"cache_dir={tmp_path}")  # nothing on disk there
    shape = costs.model_shape(plan.checked_run(smol).model, str(tmp_path), None)
    layer = 2 * 576 * 576 + 2 * 576 * 192 + 3 * 576 * 1536 + 2 * 576
    assert shape.params == 49152 * 576 + 30 * layer + 576 == 134_515_008
    assert shape.matmul_params == shape.params  # tied: the embedding multiplies as the head
    assert "uapt's table" in shape.source


# ----------------------------------------------------------------------------- states
def _record(folder: Path, status: str, **extra) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    files.write_json(folder / "run.json", {"status": status, "config": {}, **extra})


def _checkpoint(folder: Path, step: int) -> None:
    target = folder / "checkpoints" / f"step-{step:08d}"
    target.mkdir(parents=True)
    (target / "model.safetensors").write_bytes(b"x")
    files.write_manifest(target, step=step)


def test_states_follow_the_run_folder(tmp_path):
    assert plan.point_state(tmp_path / "none", force=False) == plan.State("new", "train")
    _record(tmp_path / "done", "completed")
    assert plan.point_state(tmp_path / "done", False).action == "skip"
    assert plan.point_state(tmp_path / "done", True).action == "rerun"  # force=true
    _record(tmp_path / "killed", "running")
    _checkpoint(tmp_path / "killed", 4)
    _checkpoint(tmp_path / "killed", 6)
    state = plan.point_state(tmp_path / "killed", False)
    assert (state.state, state.action, state.step) == ("partial", "resume", 6)
    assert plan.point_state(tmp_path / "killed", True).step == 0  # force: from scratch
    _record(tmp_path / "failed", "failed", error="FloatingPointError: nan")
    state = plan.point_state(tmp_path / "failed", False)
    assert (state.state, state.action, state.step) == ("failed", "rerun", 0)
    assert "nan" in state.text()
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "run.json").write_text('{"status": "comp')
    assert plan.point_state(tmp_path / "torn", False).state == "damaged"
    assert (tmp_path / "torn" / "run.json").exists()  # read only: nothing set aside


def test_a_live_lock_holds_and_a_dead_one_does_not(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    lock = {"pid": os.getpid(), "host": socket.gethostname(), "since": "now", "token": "t"}
    (folder / "run.lock").write_text(json.dumps(lock))
    state = plan.point_state(folder, False)
    assert (state.state, state.action) == ("held", "skip") and f"pid {os.getpid()}" in state.text()
    (folder / "run.lock").write_text(json.dumps({**lock, "pid": 2**22 + 12345}))  # no such pid
    assert plan.point_state(folder, False).state == "new"


# ----------------------------------------------------------------------------- why new
def _completed(plain: dict) -> records.Run:
    folder = records.run_dir(plain)
    record = records.RunRecord.start(folder, plain)
    record.complete()
    return records.Run(folder, record.data)


def _point(*overrides: str) -> plan.Point:
    return plan.Point(list(overrides), plan.checked_run(compose_run(*overrides)))


def test_why_new_names_the_one_edited_key(tmp_path):
    base = [*TINY, f"runs_dir={tmp_path}"]
    done = _completed(_point(*base).run.plain)
    edited = _point(*base, "trainer.lr=2e-3")
    why = plan.why_new(edited, [done], plan.varying_keys([edited]))
    assert why == f"trainer.lr: 0.001 → 0.002 (vs {done.folder.name}, completed)"


def test_why_new_names_the_fingerprint_of_an_edited_data_file(tmp_path, shared_data):
    data = tmp_path / "train.jsonl"
    data.write_text(
        "".join((shared_data / "gsm8k" / "train.jsonl").read_text().splitlines(True)[:40])
    )
    args = [*NO_DATA, "dataset=gsm8k", f"dataset.source={data}", "dataset.val_size=4"]
    args += [f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}"]
    done = _completed(_point(*args).run.plain)
    old = done.data["config"]["inputs"]["dataset.source"]
    with data.open("a") as f:
        f.write(json.dumps({"question": "1 + 1?", "answer": "#### 2"}) + "\n")
    edited = _point(*args)
    new = edited.run.plain["inputs"]["dataset.source"]
    assert old != new
    why = plan.why_new(edited, [done], plan.varying_keys([edited]))
    assert why == f"inputs.dataset.source: {old} → {new} (vs {done.folder.name}, completed)"


def test_why_new_apart_from_the_grid_keys(tmp_path):
    base = [*TINY, f"runs_dir={tmp_path}"]
    done = _completed(_point(*base, "seed=0").run.plain)
    points = [_point(*base, "seed=1"), _point(*base, "seed=2")]
    why = plan.why_new(points[0], [done], plan.varying_keys(points))
    assert why.startswith("seed: 0 → 1 (vs ")
    # a record that differs in a key the grid does not vary is not "the same point"
    other = _point(*base, "seed=1", "trainer.max_steps=7")
    assert plan.why_new(other, [done], plan.varying_keys([other])) is None


# ----------------------------------------------------------------------------- uapt-diff
def test_uapt_diff_names_semantic_keys_versions_commits_and_provenance(tmp_path, capsys):
    a = _point(*TINY, f"runs_dir={tmp_path}").run.plain
    b = _point(*TINY, f"runs_dir={tmp_path}", "trainer.lr=2e-3", "trainer.log_every=5").run.plain
    for plain, torch_version, commit, where in (
        (a, "2.13.0", "abc", "x"),
        (b, "2.14.0", "def", "y"),
    ):
        record = records.RunRecord.start(records.run_dir(plain), plain)
        record.update(
            versions={**record.data["versions"], "torch": torch_version},
            git_commit=commit,
            provenance={"data": {"origin": where}, "host": "same"},
        )
    names = [records.run_dir(p).name for p in (a, b)]
    code = diff.main([*names, "--runs", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 1
    assert "semantic config: 1 differ\n  trainer.lr: 0.001 → 0.002\n" in out  # not log_every
    assert "  versions.torch: 2.13.0 → 2.14.0" in out
    assert "  git_commit: abc → def" in out
    assert "provenance: 1 differ\n  provenance.data.origin: x → y" in out
    assert diff.main([names[0], names[0], "--runs", str(tmp_path)]) == 0
    assert diff.main(["nope", names[0], "--runs", str(tmp_path)]) == 2
    assert "nope: no run of that name" in capsys.readouterr().err


def test_flatten_and_changes():
    assert diff.flatten({"a": {"b": 1, "c": [1, 2]}, "d": {}}) == {"a.b": 1, "a.c": [1, 2], "d": {}}
    found = diff.changes({"a": {"b": 1}}, {"a": {"b": 2, "c": 3}})
    assert [diff.show(c) for c in found] == ["a.b: 1 → 2", "a.c: (absent) → 3"]


# ----------------------------------------------------------------------------- the config
@pytest.mark.parametrize(
    ("node", "needle"),
    [
        ({"enabled": True, "device": "tpu"}, "plan.device='tpu' is not one of: auto, h100"),
        ({"enabled": True, "mfu": 1.5}, "plan.mfu=1.5 is not a finite number in (0, 1]"),
        ({"enabled": True, "mfu": 0}, "plan.mfu=0 is not a finite number in (0, 1]"),
        ({"enabled": True, "peak_tflops": -1}, "plan.peak_tflops=-1 is not a finite number > 0"),
        ({"enabled": False, "device": "h100"}, "plan.device is set but the plan is off"),
        ({"enabled": True, "gpus": 8}, "plan.gpus is not a known option"),
    ],
)
def test_bad_plan_settings_are_named(node, needle):
    with pytest.raises(ConfigError, match=None) as caught:
        PlanConfig.parse(node)
    assert needle in str(caught.value)


def test_device_rates_and_overrides():
    h100 = rate(PlanConfig.parse({"enabled": True, "device": "h100"}), "bf16")
    assert h100.seconds(989.4e12 * 0.35) == pytest.approx(1.0)  # 1 s at peak x the assumed MFU
    assert not DEVICES["h100"].measured and "assumption" in h100.mfu_source
    mine = rate(PlanConfig.parse({"enabled": True, "device": "a100", "mfu": 0.5}), "fp32")
    assert mine.peak_tflops == 19.5 and mine.mfu == 0.5 and mine.mfu_source == "plan.mfu"
    assert DEVICES["cpu"].measured


def test_plan_true_means_plan_on():
    argv = ["uapt-train", "plan=true", "+plan=True", "plan=false", "plan.device=h100", "x=true"]
    assert plan.normalized_argv(argv) == [
        "uapt-train", "plan=on", "plan=on", "plan=off", "plan.device=h100", "x=true",
    ]  # fmt: skip


def test_the_plan_key_is_not_semantic():
    on = compose_run(*TINY, "plan=on", "plan.device=h100")
    assert records.run_id(on) == records.run_id(compose_run(*TINY))
    assert dataclasses.asdict(plan.checked_run(on).plan)["device"] == "h100"


def test_a_plan_prices_each_eval_task_and_the_base_model_once(tmp_path, tiny_tokenizer):
    from uapt.arith import arith_rows

    plain = compose_run(
        *TINY, "eval=embedded", "trainer.max_steps=2", "plan=on", "plan.device=cpu",
        f"runs_dir={tmp_path / 'runs'}", f"cache_dir={tmp_path / 'cache'}",
    )  # fmt: skip
    lines = plan.plan_run(plain, [])
    questions = [r["question"] for r in arith_rows(64, 0, "test")]
    prompt = sum(len(i) for i in tiny_tokenizer(questions)["input_ids"]) / 64
    (evals,) = [line for line in lines if line.startswith("eval=embedded")]
    assert f"arith 64 x 1 x ({prompt:.0f} prompt + 64 generated)" in evals
    assert "ifeval_embedded 48 x 1 x (" in evals and "+ 128 generated)" in evals
    (total,) = [line for line in lines if line.startswith("total:")]
    assert "(1 model x suite, once)" in total and "1 train;" in total
    assert not (tmp_path / "runs").exists()
