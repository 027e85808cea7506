"""The model room: the paper's architectures load through the hub path, hidden states feed the
output layer exactly, LoRA trains only adapters and its teacher is the untouched base model."""

from __future__ import annotations

import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from uapt.models import (
    AdaptersOff,
    LoraConfig,
    ModelConfig,
    hidden_states,
    load_model,
    make_teacher,
    model_fingerprint,
)
from uapt.schema import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
CPU = torch.device("cpu")
SOFTCAP = 30.0
SMALL = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
# One tiny random-init model per architecture the paper uses (Gemma, LLaMA, Phi).
ARCHS = {
    "llama": {"config": SMALL, "attn_implementation": "sdpa"},
    "gemma2": {
        "config": {**SMALL, "head_dim": 8, "final_logit_softcapping": SOFTCAP},
        "attn_implementation": "eager",
    },
    "phi3": {"config": SMALL, "attn_implementation": "sdpa"},
}
CLASSES = {"llama": "LlamaForCausalLM", "gemma2": "Gemma2ForCausalLM", "phi3": "Phi3ForCausalLM"}


def model_cfg(arch: str, **extra) -> dict:
    return {"name": f"tiny-{arch}", "arch": arch, "dtype": "float32", **ARCHS[arch], **extra}


def build(cfg: dict, tokenizer, cache_dir, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return load_model(cfg, tokenizer, cache_dir, CPU)


def batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sequences, the second left-padded, so that attention masks matter."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 512, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def logits_of(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def head_reference(hidden: torch.Tensor, weight: torch.Tensor, softcap: float | None):
    """The output layer written out: h W^T, then softcap * tanh(z / softcap) for Gemma-2."""
    z = hidden @ weight.T
    return torch.tanh(z / softcap) * softcap if softcap else z


@pytest.fixture(scope="module", params=list(ARCHS))
def saved(request, tmp_path_factory, tiny_tokenizer, cache_dir):
    """(arch, folder, model): a random-init model saved as safetensors with its tokenizer."""
    arch = request.param
    model = build(model_cfg(arch), tiny_tokenizer, cache_dir).eval()
    folder = tmp_path_factory.mktemp(f"saved-{arch}")
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer.save_pretrained(folder)
    return arch, folder, model


# ----------------------------------------------------------------------------- architectures
def test_saved_model_loads_through_the_hub_path(saved, tiny_tokenizer, cache_dir):
    arch, folder, reference = saved
    assert (folder / "model.safetensors").exists() and not list(folder.glob("*.bin"))
    cfg = {"name": arch, "path": str(folder), "dtype": "float32"}
    cfg["attn_implementation"] = ARCHS[arch]["attn_implementation"]
    loaded = build(cfg, tiny_tokenizer, cache_dir, seed=123).eval()  # another seed: no re-init
    assert type(loaded).__name__ == CLASSES[arch]
    assert loaded.config._attn_implementation == ARCHS[arch]["attn_implementation"]
    ids, mask = batch()
    assert torch.equal(logits_of(loaded, ids, mask), logits_of(reference, ids, mask))
    if arch == "gemma2":
        assert loaded.config.final_logit_softcapping == SOFTCAP


def test_hidden_states_feed_the_output_layer_exactly(saved):
    arch, _, model = saved
    model = copy.deepcopy(model)
    with torch.no_grad():  # large logits, so that Gemma-2's softcapping really bites
        model.get_output_embeddings().weight.mul_(200.0)
    ids, mask = batch()
    logits = logits_of(model, ids, mask)
    hidden = hidden_states(model, ids, mask)
    assert hidden.shape == (2, 9, SMALL["hidden_size"])
    weight = model.get_output_embeddings().weight
    softcap = SOFTCAP if arch == "gemma2" else None
    assert torch.equal(head_reference(hidden, weight, softcap), logits)
    raw = hidden @ weight.T
    if softcap:
        assert raw.abs().max() > softcap >= logits.abs().max()  # the cap changed the values
    else:
        assert torch.equal(raw, logits)
    from uapt.objectives import output_head

    head = output_head(model)
    assert head.softcap == softcap
    # the model applies the head in its own matmul (and Gemma's cap in its dtype), ours in
    # fp32 after the matmul: logits of size ~10 agree to fp32 rounding of a 64-term dot
    # product and a tanh, ~1e-6 relative; atol 1e-4 covers the largest logits.
    torch.testing.assert_close(head.logits(hidden), logits, rtol=1e-5, atol=1e-4)


def test_hidden_states_carry_gradients_like_the_logits(tiny_tokenizer, cache_dir):
    model = build(model_cfg("llama"), tiny_tokenizer, cache_dir)
    ids, mask = batch()
    model(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    weight = model.get_output_embeddings().weight
    head_reference(hidden_states(model, ids, mask), weight, None).square().mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)


def test_gemma2_without_eager_attention_is_refused_naming_the_key(tiny_tokenizer, cache_dir):
    cfg = model_cfg("gemma2", attn_implementation="sdpa")
    with pytest.raises(ConfigError, match=r"model\.attn_implementation.*eager"):
        ModelConfig.parse(cfg)
    with pytest.raises(ConfigError, match=r"model\.attn_implementation.*eager"):
        build(cfg, tiny_tokenizer, cache_dir)


def test_auto_attention_lets_transformers_choose(tiny_tokenizer, cache_dir):
    gemma = build(model_cfg("gemma2", attn_implementation="auto"), tiny_tokenizer, cache_dir)
    llama = build(model_cfg("llama", attn_implementation="auto"), tiny_tokenizer, cache_dir)
    assert gemma.config._attn_implementation == "eager"
    assert llama.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------- LoRA
LORA = {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


def linear_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_trains_only_adapters_on_every_linear_but_the_head(arch, tiny_tokenizer, cache_dir):
    plain = build(model_cfg(arch), tiny_tokenizer, cache_dir)
    expected = linear_names(plain) - {"lm_head"}
    model = build(model_cfg(arch, lora=LORA), tiny_tokenizer, cache_dir)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    adapted = {
        n.split("base_model.model.")[1]
        for n, m in model.named_modules()
        if hasattr(m, "lora_A") and m.lora_A
    }
    assert adapted == expected
    assert type(model.get_base_model().get_output_embeddings()) is torch.nn.Linear
    for name, p in model.named_parameters():
        if ".lora_" not in name:
            assert not p.requires_grad, name
    some = ["q_proj", "v_proj"] if arch != "phi3" else ["qkv_proj"]
    chosen = build(
        model_cfg(arch, lora={**LORA, "target_modules": some}), tiny_tokenizer, cache_dir
    )
    picked = {
        n.rsplit(".", 1)[-1] for n, m in chosen.named_modules() if hasattr(m, "lora_A") and m.lora_A
    }
    assert picked == set(some)


def train_adapters(model: torch.nn.Module, steps: int = 3) -> None:
    """A few AdamW steps on a next-token loss, enough to move the adapters far from zero."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    model.train()
    for step in range(steps):
        ids, mask = batch(seed=10 + step)
        logits = model(input_ids=ids, attention_mask=mask).logits
        F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        ).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("arch", list(ARCHS))
def test_lora_teacher_is_the_base_model_after_training(arch, tiny_tokenizer, cache_dir):
    # Attention dropout on: the teacher must run in eval mode even while the student trains.
    drop = {**ARCHS[arch]["config"], "attention_dropout": 0.5}
    base_cfg = model_cfg(arch, config=drop)
    base = build(base_cfg, tiny_tokenizer, cache_dir).eval()
    cfg = {**base_cfg, "lora": {**LORA, "dropout": 0.3}}
    student = build(cfg, tiny_tokenizer, cache_dir)
    teacher = make_teacher(student, cfg)
    assert isinstance(teacher, AdaptersOff) and teacher.student is student
    # no copy of the weights: the teacher owns nothing
    assert list(teacher.parameters()) == [] and list(teacher.buffers()) == []
    assert teacher.state_dict() == {} and list(teacher.children()) == []
    ids, mask = batch()
    reference = logits_of(base, ids, mask)
    train_adapters(student)
    assert any(p.abs().max() > 0 for n, p in student.named_parameters() if "lora_B" in n)
    student.train()
    out = teacher(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out, reference) and not out.requires_grad
    assert torch.equal(teacher(input_ids=ids, attention_mask=mask).logits, reference)
    # the student is left as it was: training mode, adapters on
    assert student.training and all(m.training for m in student.modules())
    student.eval()
    trained = logits_of(student, ids, mask)
    assert not torch.allclose(trained, reference, atol=1e-3)  # one step moved it (lr 1e-2)
    # hidden states: the teacher's are the base model's; the student's feed its logits
    softcap = SOFTCAP if arch == "gemma2" else None
    weight = base.get_output_embeddings().weight
    assert torch.equal(hidden_states(teacher, ids, mask), hidden_states(base, ids, mask))
    assert torch.equal(head_reference(hidden_states(student, ids, mask), weight, softcap), trained)
    assert torch.equal(student.get_base_model().get_output_embeddings().weight, weight)


def test_teacher_view_and_output_head_share_the_students_head(tiny_tokenizer, cache_dir):
    from uapt.objectives import output_head

    cfg = model_cfg("gemma2", lora=LORA)
    student = build(cfg, tiny_tokenizer, cache_dir)
    teacher = make_teacher(student, cfg)
    head, t_head = output_head(student), output_head(teacher)
    assert t_head.weight is head.weight and t_head.softcap == SOFTCAP
    student.train()
    teacher.eval()  # the student is not a submodule: its mode is its own
    assert student.training
    student.eval()
    teacher.train()
    assert not student.training


def test_full_finetuning_teacher_is_a_frozen_copy(tiny_tokenizer, cache_dir):
    cfg = model_cfg("llama")
    student = build(cfg, tiny_tokenizer, cache_dir)
    student.train()
    teacher = make_teacher(student, cfg)
    ptrs = {p.data_ptr() for p in student.parameters()}
    assert all(p.data_ptr() not in ptrs for p in teacher.parameters())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    ids, mask = batch()
    before = logits_of(student.eval(), ids, mask)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    student(input_ids=ids, attention_mask=mask).logits.square().mean().backward()
    opt.step()
    assert torch.equal(logits_of(teacher, ids, mask), before)
    assert not torch.equal(logits_of(student, ids, mask), before)


def test_make_teacher_refuses_lora_config_without_adapters(tiny_tokenizer, cache_dir):
    student = build(model_cfg("llama"), tiny_tokenizer, cache_dir)
    with pytest.raises(ValueError, match="lora"):
        make_teacher(student, model_cfg("llama", lora=LORA))


@pytest.mark.parametrize(
    ("lora", "key"),
    [
        ({"rank": 4}, "rank"),
        ({"r": 0}, "r"),
        ({"r": 2.5}, "r"),
        ({"r": True}, "r"),
        ({"alpha": 0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"target_modules": "all"}, "target_modules"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q_proj", ""]}, "target_modules"),
        ({"enabled": "yes"}, "enabled"),
    ],
)
def test_bad_lora_options_name_the_key(lora, key, tiny_tokenizer, cache_dir):
    cfg = model_cfg("llama", lora={**LORA, **lora})
    pattern = rf"model\.lora\.{key}\b"
    with pytest.raises(ConfigError, match=pattern):
        ModelConfig.parse(cfg)
    with pytest.raises(ValueError, match=pattern):
        load_model(cfg, tiny_tokenizer, cache_dir, CPU)


def test_lora_options_are_checked_even_when_disabled_and_default_filled():
    with pytest.raises(ConfigError, match=r"model\.lora\.r\b"):
        LoraConfig.parse({"enabled": False, "r": -1}, "model.lora")
    assert LoraConfig.parse({"enabled": False}).enabled is False
    # the values written in conf/model/base.yaml, read here by hand
    assert LoraConfig.parse({"enabled": True}).as_dict() == {
        "enabled": True,
        "r": 16,
        "alpha": 32,
        "dropout": 0.0,
        "target_modules": "all-linear",
    }


def test_lora_target_that_matches_nothing_names_the_key(tiny_tokenizer, cache_dir):
    cfg = model_cfg("llama", lora={**LORA, "target_modules": ["no_such_proj"]})
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules"):
        load_model(cfg, tiny_tokenizer, cache_dir, CPU)


def test_saved_lora_adapters_load_merged_as_model_path(tmp_path, tiny_tokenizer, cache_dir):
    base_dir = tmp_path / "base"
    build(model_cfg("llama"), tiny_tokenizer, cache_dir).save_pretrained(base_dir)
    cfg = {"name": "b", "path": str(base_dir), "dtype": "float32", "lora": LORA}
    student = build(cfg, tiny_tokenizer, cache_dir)
    train_adapters(student)
    student.save_pretrained(tmp_path / "run")  # what uapt-train's save_model writes under LoRA
    assert (tmp_path / "run" / "adapter_config.json").exists()
    loaded = build(
        {"name": "r", "path": str(tmp_path / "run"), "dtype": "float32"}, tiny_tokenizer, cache_dir
    )
    assert type(loaded).__name__ == "LlamaForCausalLM"  # merged: a plain model again
    ids, mask = batch()
    torch.testing.assert_close(logits_of(loaded, ids, mask), logits_of(student.eval(), ids, mask))
    # an adapter over a random-init base names no base: refused with the key named
    orphan = build(model_cfg("llama", lora=LORA), tiny_tokenizer, cache_dir)
    orphan.save_pretrained(tmp_path / "orphan")
    with pytest.raises(ValueError, match=r"model\.path"):
        build({"name": "o", "path": str(tmp_path / "orphan")}, tiny_tokenizer, cache_dir)


def test_hidden_states_through_ddp_keep_gradient_sync(tmp_path, tiny_tokenizer, cache_dir):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    model = build(model_cfg("llama", lora=LORA), tiny_tokenizer, cache_dir)
    twin = copy.deepcopy(model)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        calls = []  # DDP's own forward must run: it prepares the gradient all-reduce
        ddp.register_forward_pre_hook(lambda *_: calls.append(1))
        weight = model.get_base_model().get_output_embeddings().weight
        for step in range(2):  # twice: the reducer must be ready again for the second step
            ids, mask = batch(seed=step)
            for runner in (ddp, twin):
                h = hidden_states(runner, ids, mask)
                head_reference(h, weight, None).square().mean().backward()
            grads = {n: p.grad for n, p in twin.named_parameters() if p.requires_grad}
            for name, p in model.named_parameters():
                if p.requires_grad:
                    torch.testing.assert_close(p.grad, grads[name], msg=name)
            model.zero_grad()
            twin.zero_grad()
        assert len(calls) == 2
    finally:
        dist.destroy_process_group()


def test_fingerprint_ignores_name_and_lora_but_not_the_weights():
    a = {"name": "a", "path": "org/m", "dtype": "auto", "lora": {"enabled": False}}
    assert model_fingerprint(a) == model_fingerprint({**a, "name": "b", "lora": LORA})
    assert model_fingerprint(a) != model_fingerprint({**a, "path": "org/other"})
    assert model_fingerprint(a) != model_fingerprint({**a, "dtype": "bfloat16"})


# ----------------------------------------------------------------------------- model configs
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")


def compose_plain(overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.mark.parametrize(
    "name", sorted(p.stem for p in (CONF / "model").glob("*.yaml") if p.stem != "base")
)
def test_model_configs_name_real_models_with_safe_settings(name):
    model = compose_plain([f"model={name}"])["model"]
    ModelConfig.parse(model)
    assert model["name"] == name and model["trust_remote_code"] is False
    assert model["path"] is None or HUB_ID.fullmatch(model["path"]), model["path"]
    assert model["path"] or model["tokenizer"] == "tiny"
    if model["path"] and "gemma" in model["path"].lower():
        assert model["attn_implementation"] == "eager"  # Gemma-2 has no SDPA path


# ----------------------------------------------------------------------------- end to end
@pytest.fixture()
def restore_determinism():
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def train_cfg(folder: Path, arch: str, runs: Path, *extra: str) -> dict:
    return compose_plain(
        [
            f"model.path={folder}",
            f"model.name={arch}",
            "model.tokenizer=null",
            f"model.attn_implementation={ARCHS[arch]['attn_implementation']}",
            "dataset=arith",
            "dataset.num_train=16",
            "dataset.val_size=8",
            "objective=masked_mle_distill",
            "trainer.max_steps=3",
            "trainer.batch_size=4",
            "trainer.micro_batch_size=4",
            "logger=none",
            f"runs_dir={runs}",
            *extra,
        ]
    )


def finished_run(runs: Path) -> tuple[dict, Path]:
    (record_path,) = runs.glob("*/run.json")
    return json.loads(record_path.read_text()), record_path.parent


def test_train_three_steps_from_a_saved_folder(saved, tmp_path, restore_determinism):
    from uapt.data import build_datasets  # noqa: F401  (the data room must exist)
    from uapt.train import execute

    arch, folder, _ = saved
    outcome = execute(train_cfg(folder, arch, tmp_path))
    record, run_dir = finished_run(tmp_path)
    assert outcome["status"] == record["status"] == "completed"
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in rows for k in ("loss", "loss/mle", "loss/distill"))
    assert math.isfinite(record["metrics"]["val/loss"])


def test_lora_run_trains_and_saves_loadable_adapters(
    tmp_path, tiny_tokenizer, cache_dir, restore_determinism
):
    from uapt.train import execute

    folder = tmp_path / "base"
    base = build(model_cfg("llama"), tiny_tokenizer, cache_dir).eval()
    base.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    runs = tmp_path / "runs"
    execute(train_cfg(folder, "llama", runs, "model.lora.enabled=true", "model.lora.r=4"))
    record, run_dir = finished_run(runs)
    assert record["status"] == "completed"
    assert record["config"]["model"]["lora"]["enabled"] is True
    assert (run_dir / "model" / "adapter_config.json").exists()
    cfg = {"name": "t", "path": str(run_dir / "model"), "dtype": "float32"}
    trained = build(cfg, tiny_tokenizer, cache_dir)
    ids, mask = batch()
    # a few steps at lr 1e-3 move logits by far more than fp32 noise (~1e-6)
    assert not torch.allclose(logits_of(trained, ids, mask), logits_of(base, ids, mask), atol=1e-4)


# ----------------------------------------------------------------------------- settings
def test_auto_dtype_is_float32_on_cpu(tiny_tokenizer, cache_dir):
    from uapt.models import torch_dtype

    assert torch_dtype("auto", CPU) == torch.float32
    cfg = {**model_cfg("llama"), "dtype": "auto"}
    assert next(build(cfg, tiny_tokenizer, cache_dir).parameters()).dtype == torch.float32
    bf16 = build({**cfg, "dtype": "bfloat16"}, tiny_tokenizer, cache_dir)
    assert next(bf16.parameters()).dtype == torch.bfloat16


def test_tokenizer_without_template_gets_chatml_and_overrides_win(
    tmp_path, tiny_tokenizer, cache_dir
):
    from uapt.models import CHATML_TEMPLATE, load_tokenizer

    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    bare.save_pretrained(tmp_path)
    (tmp_path / "chat_template.jinja").unlink(missing_ok=True)
    tok = load_tokenizer({"name": "bare", "path": str(tmp_path)}, cache_dir)
    assert tok.chat_template == CHATML_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "2+2"}], tokenize=False)
    assert text == "<|im_start|>user\n2+2<|im_end|>\n"
    mine = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert (
        load_tokenizer(
            {"name": "bare", "path": str(tmp_path), "chat_template": mine}, cache_dir
        ).chat_template
        == mine
    )
