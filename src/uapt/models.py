"""Model and tokenizer: a hub id, a local folder, or a random-init architecture for tests.

The teacher of self-distillation is a frozen copy of the initial weights, built only when the
objective needs it (with LoRA it is the same model with its adapters disabled: no second copy).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# ChatML, as SmolLM2 uses it; the default for tokenizers that carry no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = 512
TINY_RECIPE = "bytelevel-bpe-v1"  # bump when the tiny tokenizer's training changes

ARCHITECTURES = {"llama": "llama", "gemma2": "gemma2", "phi3": "phi3"}


def _tiny_corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from: the synthetic task plus chat scaffolding."""
    from uapt.arith import arith_rows

    rows = arith_rows(3000, seed=0)
    return [f"user\n{r['question']}\nassistant\n{r['answer']}" for r in rows]


def tiny_tokenizer(cache_dir: str | Path) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained locally (deterministic, no download), cached on disk."""
    folder = Path(cache_dir).expanduser() / "tokenizers" / f"tiny-{TINY_RECIPE}"
    if not (folder / "tokenizer.json").exists():
        _train_tiny_tokenizer(folder)
    return AutoTokenizer.from_pretrained(folder)


def _train_tiny_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        special_tokens=TINY_SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=folder.name + "."))
    fast.save_pretrained(tmp)
    try:  # atomic publish; a concurrent process may have won the race, which is fine
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(model_cfg: Mapping[str, Any], cache_dir: str | Path) -> PreTrainedTokenizerBase:
    source = model_cfg.get("tokenizer") or model_cfg.get("path")
    if source in (None, "tiny"):
        tok = tiny_tokenizer(cache_dir)
    else:
        source = resolve_source(str(source), cache_dir)
        tok = AutoTokenizer.from_pretrained(
            source, trust_remote_code=bool(model_cfg.get("trust_remote_code", False))
        )
    if model_cfg.get("chat_template"):
        tok.chat_template = model_cfg["chat_template"]
    elif not tok.chat_template:
        log.info("tokenizer %s has no chat template; using uapt's default ChatML template", source)
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_source(path: str, cache_dir: str | Path) -> str:
    """A hub id or local folder; hub ids with an offline fallback (SmolLM2) resolve to it offline."""
    if Path(path).expanduser().exists():
        return str(Path(path).expanduser())
    try:
        from uapt.smollm2 import resolve_model_source
    except ImportError:  # the embedded fallback is optional for other hub ids
        return path
    return resolve_model_source(path, cache_dir)


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(
    model_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase, cache_dir: str | Path,
    device: torch.device,
) -> torch.nn.Module:
    """The student: pretrained weights from `model.path`, else `model.arch` with random init."""
    dtype = torch_dtype(model_cfg.get("dtype", "auto"), device)
    attn = model_cfg.get("attn_implementation") or "sdpa"
    remote = bool(model_cfg.get("trust_remote_code", False))
    if model_cfg.get("path"):
        source = resolve_source(str(model_cfg["path"]), cache_dir)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn, trust_remote_code=remote
        )
    else:
        model = AutoModelForCausalLM.from_config(
            random_init_config(model_cfg, tokenizer), dtype=dtype, attn_implementation=attn
        )
    return model.to(device)


def random_init_config(model_cfg: Mapping[str, Any], tokenizer: PreTrainedTokenizerBase):
    arch = model_cfg.get("arch", "llama")
    if arch not in ARCHITECTURES:
        raise ValueError(f"model.arch={arch!r} is not one of: {', '.join(ARCHITECTURES)}")
    overrides = dict(model_cfg.get("config") or {})
    overrides.setdefault("vocab_size", len(tokenizer))
    overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
    return AutoConfig.for_model(ARCHITECTURES[arch], **overrides)


def frozen_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the initial weights (call before the first optimizer step)."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


def model_fingerprint(model_cfg: Mapping[str, Any]) -> str:
    """Identity of the *initial* model, for caching its base scores."""
    blob = json.dumps(dict(model_cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
