"""Model and tokenizer: a hub id, a local folder, or a random-init architecture for tests.

The student is a transformers causal LM, optionally wrapped with peft LoRA adapters
(`model.lora.enabled`). The teacher of self-distillation is the initial model, built only when
the objective needs it (`make_teacher`): a frozen copy of the weights for full fine-tuning, or the
student itself with its adapters disabled under LoRA (no second copy of the weights).
See docs/models.md.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from uapt import files
from uapt.errors import UserError
from uapt.schema import ConfigError
from uapt.sections.model import ARCHITECTURES, LoraConfig, ModelConfig, no_sdpa_message

log = logging.getLogger(__name__)

# ChatML, as SmolLM2 uses it; the default for tokenizers that carry no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TINY_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TINY_VOCAB = 512
TINY_RECIPE = "bytelevel-bpe-v1"  # bump when the tiny tokenizer's training changes

FINGERPRINT_IGNORES = ("name", "lora")  # a fresh LoRA adapter is the identity: same initial model


# ----------------------------------------------------------------------------- tokenizer
def _tiny_corpus() -> list[str]:
    """Text the tiny tokenizer learns its merges from: the synthetic task plus chat scaffolding."""
    from uapt.arith import arith_rows

    rows = arith_rows(3000, seed=0)
    return [f"user\n{r['question']}\nassistant\n{r['answer']}" for r in rows]


def tiny_tokenizer(cache_dir: str | Path) -> PreTrainedTokenizerBase:
    """A byte-level BPE tokenizer trained locally (deterministic, no download), cached on disk."""
    folder = Path(cache_dir).expanduser() / "tokenizers" / f"tiny-{TINY_RECIPE}"
    if (folder / "tokenizer.json").exists():
        try:
            return AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # a damaged file in a shared cache: rebuild it, say which
            aside = files.set_aside(folder, str(e))
            log.warning(
                "tiny tokenizer %s does not load (%s); moved to %s, rebuilding", folder, e, aside
            )
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
    with files.staging_dir(folder, replace=False) as tmp:  # a concurrent build may win: fine
        fast.save_pretrained(tmp)


def load_tokenizer(
    model: ModelConfig | Mapping[str, Any], cache_dir: str | Path
) -> PreTrainedTokenizerBase:
    """`model.tokenizer` (or `model.path`); `tiny`/none = uapt's tiny BPE; ChatML if no template."""
    model = ModelConfig.parse(model)
    source = model.tokenizer or model.path
    if source in (None, "tiny"):
        tok = tiny_tokenizer(cache_dir)
    else:
        key = "model.tokenizer" if model.tokenizer else "model.path"
        source = resolve_source(str(source), cache_dir, model.source)
        with _named_source(key, source):
            tok = AutoTokenizer.from_pretrained(source, trust_remote_code=model.trust_remote_code)
    if model.chat_template:
        tok.chat_template = model.chat_template
    elif not tok.chat_template:
        log.info("tokenizer %s has no chat template; using uapt's default ChatML template", source)
        tok.chat_template = CHATML_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def resolve_source(path: str, cache_dir: str | Path, source: str = "auto") -> str:
    """A local folder, or a hub id; SmolLM2's id resolves to its embedded copy when offline
    (`model.source`: auto | hub | embedded, see docs/embedded_model.md)."""
    if Path(path).expanduser().exists():
        return str(Path(path).expanduser())
    from uapt.smollm2 import resolve_model_source

    return resolve_model_source(path, cache_dir, source)


# ----------------------------------------------------------------------------- settings
def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto = bf16 on a GPU that has it (else fp32: fp16 weights need a loss scaler), fp32 on CPU."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name not in dtypes:
        raise ConfigError(f"model.dtype={name!r} is not one of: auto, {', '.join(dtypes)}")
    return dtypes[name]


def attn_implementation(model: ModelConfig) -> str | None:
    """What to pass to transformers: eager | sdpa, or None for `auto` (transformers' default)."""
    return None if model.attn_implementation == "auto" else model.attn_implementation


# ----------------------------------------------------------------------------- the student
def load_model(
    model_cfg: ModelConfig | Mapping[str, Any],
    tokenizer: PreTrainedTokenizerBase,
    cache_dir: str | Path,
    device: torch.device,
) -> torch.nn.Module:
    """The student: pretrained weights from `model.path`, else `model.arch` with random init;
    wrapped with LoRA adapters (a peft PeftModel, only adapters trainable) when enabled."""
    cfg = ModelConfig.parse(model_cfg)  # fail on bad options before loading gigabytes
    kwargs = {
        "dtype": torch_dtype(cfg.dtype, device),
        "attn_implementation": attn_implementation(cfg),
    }
    if cfg.path:
        source = resolve_source(cfg.path, cache_dir, cfg.source)
        with _named_source("model.path", source):
            model = _from_pretrained(source, kwargs, cfg.trust_remote_code, cache_dir)
    else:
        config = random_init_config(cfg, tokenizer)
        model = _checked_attn(lambda: AutoModelForCausalLM.from_config(config, **kwargs))
    model = model.to(device)
    return apply_lora(model, cfg.lora) if cfg.lora.enabled else model


class ModelSourceError(UserError):
    """A model or tokenizer that cannot be loaded from where the config points."""


@contextmanager
def _named_source(key: str, source: str) -> Iterator[None]:
    """Loading errors of transformers (no such folder, hub unreachable, not a model) as one
    message naming the config key, not a traceback."""
    try:
        yield
    except OSError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelSourceError(f"{key}={source!r}: cannot be loaded ({first})") from e


def _checked_attn(build):
    """Run a model constructor; an attention backend the class lacks becomes a ConfigError."""
    try:
        return build()
    except ValueError as e:
        if "does not support an attention implementation" in str(e):
            name = str(e).split(" does not support")[0].split()[-1]
            raise ConfigError(no_sdpa_message(name)) from None
        raise


def _from_pretrained(
    source: str, kwargs: Mapping[str, Any], remote: bool, cache_dir: str | Path
) -> torch.nn.Module:
    """A model folder or hub id; a peft adapter folder is merged into its base model."""
    folder = Path(source)
    if (folder / "adapter_config.json").exists() and not (folder / "config.json").exists():
        return _merged_adapter(folder, kwargs, remote, cache_dir)
    return _checked_attn(
        lambda: AutoModelForCausalLM.from_pretrained(source, trust_remote_code=remote, **kwargs)
    )


def _merged_adapter(
    folder: Path, kwargs: Mapping[str, Any], remote: bool, cache_dir: str | Path
) -> torch.nn.Module:
    """A saved LoRA run (`<run>/model` holds only adapters): base + adapters, merged."""
    from peft import PeftConfig, PeftModel

    base_id = PeftConfig.from_pretrained(str(folder)).base_model_name_or_path
    if not base_id:
        raise ConfigError(
            f"model.path={str(folder)!r} is a LoRA adapter folder that names no base model "
            "(a random-init base); load it with uapt-eval checkpoint=<folder> and its model config"
        )
    base = _from_pretrained(resolve_source(base_id, cache_dir), kwargs, remote, cache_dir)
    log.info("model.path %s: LoRA adapters on %s, merged into the weights", folder, base_id)
    return PeftModel.from_pretrained(base, str(folder)).merge_and_unload()


def apply_lora(model: torch.nn.Module, lora: LoraConfig) -> torch.nn.Module:
    """Wrap with peft LoRA; peft freezes everything but the adapters (all-linear skips lm_head)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    targets = lora.target_modules
    config = PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets if isinstance(targets, str) else list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # e.g. target modules not found in the model
        raise ConfigError(f"model.lora.target_modules={targets!r}: {e}") from None
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in peft_model.parameters())
    log.info("LoRA r=%d: %d of %d parameters trainable", lora.r, trainable, total)
    return peft_model


def random_init_config(model: ModelConfig, tokenizer: PreTrainedTokenizerBase):
    """The transformers config of `model.arch` with `model.config` overrides (vocab from the
    tokenizer unless overridden)."""
    arch = model.arch
    overrides = dict(model.config or {})
    overrides.setdefault("vocab_size", len(tokenizer))
    overrides.setdefault("pad_token_id", tokenizer.pad_token_id)
    overrides.setdefault("eos_token_id", tokenizer.eos_token_id)
    overrides.setdefault("bos_token_id", tokenizer.bos_token_id)
    try:
        return AutoConfig.for_model(ARCHITECTURES[arch], **overrides)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.config for arch {arch!r}: {e}") from None


def is_peft(model: Any) -> bool:
    """True for a peft-wrapped model (imports peft only when the model could be one)."""
    if not type(model).__module__.startswith("peft"):
        return False
    from peft import PeftModel

    return isinstance(model, PeftModel)


# ----------------------------------------------------------------------------- the teacher
def frozen_teacher(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen copy of the initial weights (call before the first optimizer step)."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


class AdaptersOff(torch.nn.Module):
    """The LoRA student with its adapters disabled: the initial model, without a copy of it.

    The student is held as a plain attribute, not a submodule, so this module has no parameters,
    buffers or state_dict of its own, and `.eval()` / `.train()` / `.to()` on it leave the student
    alone. Every call runs under no_grad in eval mode (dropout off) and restores the student's
    mode and adapters afterwards.
    """

    def __init__(self, student: torch.nn.Module) -> None:
        super().__init__()
        object.__setattr__(self, "student", student)  # bypass Module.__setattr__: no submodule

    @property
    def config(self) -> Any:
        return self.student.config

    def get_base_model(self) -> torch.nn.Module:
        """The transformers model (with LoRA layers inside; output_head reads its lm_head)."""
        return self.student.get_base_model()

    def get_output_embeddings(self) -> torch.nn.Module:
        return self.get_base_model().get_output_embeddings()

    @contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        """The student, in eval mode with adapters disabled and gradients off, for the block."""
        was_training = self.student.training
        self.student.eval()
        try:
            with torch.no_grad(), self.student.disable_adapter():
                yield self.student
        finally:
            self.student.train(was_training)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("use_cache", False)
        with self.active() as base:
            return base(*args, **kwargs)


def make_teacher(
    model: torch.nn.Module, model_cfg: ModelConfig | Mapping[str, Any]
) -> torch.nn.Module:
    """The frozen initial model for distillation / excess-loss selection.

    Full fine-tuning: a frozen deep copy (call before the first optimizer step). LoRA: the
    student with its adapters disabled (`AdaptersOff`), which stays the initial model however
    the adapters train, and costs no memory.
    """
    student = unwrap_ddp(model)
    lora = ModelConfig.parse(model_cfg).lora.enabled
    if lora and not is_peft(student):
        raise ValueError("make_teacher: model.lora.enabled is true but the model has no adapters")
    return AdaptersOff(student) if is_peft(student) else frozen_teacher(student)


# ----------------------------------------------------------------------------- hidden states
_DDP = torch.nn.parallel.DistributedDataParallel


def unwrap_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """The model a DistributedDataParallel wrapper runs (the model itself when unwrapped)."""
    return model.module if isinstance(model, _DDP) else model


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM under DDP, the teacher view and peft's wrappers."""
    while True:
        if isinstance(model, _DDP):
            model = unwrap_ddp(model)
        elif isinstance(model, AdaptersOff):
            model = model.student
        elif is_peft(model):
            model = model.get_base_model()
        else:
            return model


def decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module whose output is the final (normed) hidden states: LlamaModel, Gemma2Model..."""
    lm = causal_lm(model)
    found = lm.get_decoder() if hasattr(lm, "get_decoder") else None
    if found is None or found is lm:
        found = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    if not isinstance(found, torch.nn.Module) or found is lm:
        raise ValueError(f"hidden_states: no decoder module found in {type(lm).__name__}")
    return found


def hidden_states(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    packed: bool = False,
) -> torch.Tensor:
    """Final (normed) hidden states [B, T, H]: the input of the output layer, no logits computed.

    The model's own forward runs (so DDP's gradient hooks, peft's adapters and the teacher
    view's no_grad / adapters-off all apply) with `logits_to_keep` set to no position, and the
    decoder's output is taken with a forward hook. `packed`: see `packed_forward`.
    """
    lm = causal_lm(model)
    captured: list[torch.Tensor] = []

    def grab(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        captured.append(
            output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        )

    kwargs: dict[str, Any] = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(lm.forward).parameters:
        kwargs["logits_to_keep"] = torch.empty(0, dtype=torch.long, device=input_ids.device)

    def run(**inputs: Any) -> torch.Tensor:
        captured.clear()
        model(**inputs, **kwargs)
        if len(captured) != 1:
            raise RuntimeError(
                f"hidden_states: the decoder ran {len(captured)} times in one forward"
            )
        return captured[0]

    handle = decoder(lm).register_forward_hook(grab)
    try:
        if packed:
            return packed_forward(run, input_ids, attention_mask)
        return run(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()


def logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    packed: bool = False,
) -> torch.Tensor:
    """The model's logits [B, T, V] (no KV cache; `packed`: see `packed_forward`)."""

    def run(**inputs: Any) -> torch.Tensor:
        return model(**inputs, use_cache=False).logits  # transformers 5 builds a cache otherwise

    if packed:
        return packed_forward(run, input_ids, attention_mask)
    return run(input_ids=input_ids, attention_mask=attention_mask)


def packed_forward(
    run: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """Run a right-padded batch [B, T] as ONE sequence of its real tokens, no padding computed.

    The rows are concatenated ([1, N], N = the batch's real tokens) with position ids that
    restart at 0 for each row and no attention mask: transformers then builds a block-diagonal
    causal mask (masking_utils' packed-sequence format; flash-attention's varlen on GPU), so no
    token attends across rows. The output [1, N, D] is scattered back to [B, T, D] (zeros at
    padding), so everything downstream (selection per sequence, token means) sees the rows as
    it would unpacked.
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = attention_mask.bool()
    positions = (attention_mask.long().cumsum(1) - 1)[keep].unsqueeze(0)
    out = run(input_ids=input_ids[keep].unsqueeze(0), attention_mask=None, position_ids=positions)
    padded = out.new_zeros((*input_ids.shape, out.shape[-1]))
    padded[keep] = out[0]
    return padded


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks: modules of the classes transformers never splits across devices
    (`_no_split_modules`, e.g. LlamaDecoderLayer), else the children of `get_decoder().layers`."""
    lm = causal_lm(model)
    names = set(getattr(lm, "_no_split_modules", None) or ())
    layers = [m for m in lm.modules() if type(m).__name__ in names]
    if not layers and hasattr(lm, "get_decoder"):
        layers = list(getattr(lm.get_decoder(), "layers", None) or ())
    if not layers:
        raise ValueError(
            f"fsdp: found no decoder layers in {type(lm).__name__} (neither _no_split_modules "
            "classes nor get_decoder().layers); FSDP needs per-layer units to save memory"
        )
    return layers


def compile_layers(model: torch.nn.Module) -> None:
    """torch.compile each decoder layer in place (`Module.compile`: parameter names, hooks and
    checkpoints stay as they are). Dynamic shapes: every micro-batch has its own length."""
    for layer in decoder_layers(model):
        layer.compile(dynamic=True)


# ----------------------------------------------------------------------------- identity
def model_fingerprint(model_cfg: ModelConfig | Mapping[str, Any]) -> str:
    """Identity of the *initial* model, for caching its base scores (the name and a fresh LoRA
    adapter, which starts as the identity, do not change it)."""
    plain = ModelConfig.parse(model_cfg).as_dict()
    node = {k: v for k, v in plain.items() if k not in FINGERPRINT_IGNORES}
    blob = json.dumps(node, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
