"""What a run will cost before it runs: its tokens, FLOPs and device time (the plan's cost model).

FLOPs follow PaLM's accounting (Chowdhery et al. 2022, appendix B), the one MFU is defined by: a
token of a row of T tokens costs 2N + 4·L·A·T forward and three times that trained (6N + 12·L·A·T:
forward, gradients of activations and of weights), with N the parameters a token multiplies
(every weight matrix and the output head, not the input embedding's lookup), L layers and A the
width of the attention (heads × head dim). Under LoRA the frozen weights get no gradient: twice
the forward. The training rows and their lengths come from the tokenised data (uapt.data, cached
as a run caches it) read in the run's own order (uapt.batches.BatchStream), so padding, micro-
batches and selections that span them are what the run will do; where the tokenizer or the data
cannot be had (offline), an estimate says so and gives its rule. Device time is FLOPs / (peak ×
MFU) with the device's peak and an MFU from DEVICES. docs/plan.md says what each figure means.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uapt import smollm2
from uapt.batches import BatchStream, selection_spans
from uapt.errors import UserError
from uapt.sections import DatasetConfig, ModelConfig, ObjectiveSpec

log = logging.getLogger("uapt")

CHARS_PER_TOKEN = 4  # rule of thumb for English BPE text (OpenAI's tokenizer guide: ~4 characters)
TOKENS_PER_MESSAGE = 4  # a chat template's role markers around each message (ChatML: 4-5)


# ----------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class ModelShape:
    """What a token costs: N (parameters a token multiplies), layers and attention width."""

    params: int  # every parameter
    matmul_params: int  # N: all but the input embedding, with the output head (tied or not)
    layers: int
    attn_width: int  # heads x head dim: the width of Q, K and V per token
    source: str  # where the architecture came from

    def forward(self, length: int) -> float:
        """Forward FLOPs of one row of `length` tokens (attention within the row)."""
        return 2 * self.matmul_params * length + 4 * self.layers * self.attn_width * length**2


# Architectures of the configured hub models (their config.json on the Hub), for sizing them
# offline; a model found on disk (the HF cache, the embedded SmolLM2, a folder) is read instead.
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True,
    ),
    "google/gemma-2-2b": dict(
        model_type="gemma2", hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
        num_attention_heads=8, num_key_value_heads=4, head_dim=256, vocab_size=256000,
        tie_word_embeddings=True,
    ),
    "meta-llama/Llama-3.2-1B": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        tie_word_embeddings=True,
    ),
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
        tie_word_embeddings=False,
    ),
    "microsoft/Phi-3.5-mini-instruct": dict(
        model_type="phi3", hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
        tie_word_embeddings=False,
    ),
    "microsoft/phi-2": dict(
        model_type="phi", hidden_size=2560, intermediate_size=10240, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=51200,
        tie_word_embeddings=False,
    ),
}  # fmt: skip


def offline_source(path: str, cache_dir: str | Path, source: str) -> str | None:
    """Where `path` (model.path or model.tokenizer) can be read as a run would resolve it, without
    building anything (uapt.models.resolve_source would convert the embedded SmolLM2); None when
    nowhere here."""
    if Path(path).expanduser().exists():
        return str(Path(path).expanduser())
    if path not in smollm2.EMBEDDED or source == "hub":
        return None if smollm2.hub_offline() else path
    if source == "auto" and not smollm2.hub_offline() and smollm2.hub_reachable(path):
        return path
    snapshot = smollm2.cached_snapshot(path) if source == "auto" else None
    if snapshot is not None:
        return str(snapshot)
    folder = smollm2.embedded_folder(cache_dir)
    return str(folder) if smollm2.is_complete(folder) else None


def load_tokenizer(model: ModelConfig, cache_dir: str | Path) -> Any:
    """The run's tokenizer, or UserError when it cannot be had without building a model."""
    from uapt import models

    source = model.tokenizer or model.path
    if (
        source not in (None, "tiny")
        and offline_source(str(source), cache_dir, model.source) is None
    ):
        raise UserError("not available here (offline, not cached)")
    return models.load_tokenizer(model, cache_dir)


def model_shape(model: ModelConfig, cache_dir: str | Path, tokenizer: Any | None) -> ModelShape:
    """The model's shape from its architecture config, instantiated on the meta device (no
    weights): a local folder or cached copy, the random-init config, or KNOWN_ARCHITECTURES."""
    from transformers import AutoConfig

    from uapt.models import random_init_config

    if not model.path:
        if tokenizer is None:
            raise UserError("the random-init model's vocabulary needs its tokenizer")
        return _shape(random_init_config(model, tokenizer), f"random init of arch {model.arch}")
    where = offline_source(model.path, cache_dir, model.source)
    if where is not None:
        try:
            return _shape(AutoConfig.from_pretrained(where), f"config.json of {where}")
        except OSError:
            pass  # a hub id that does not answer: the table below
    known = KNOWN_ARCHITECTURES.get(model.path)
    if known is None:
        raise UserError(f"model.path={model.path!r}: its config.json is not available here")
    values = dict(known)
    config = AutoConfig.for_model(values.pop("model_type"), **values)
    return _shape(config, f"uapt's table (config.json of {model.path} on the Hub)")


@functools.lru_cache(maxsize=32)
def _meta_counts(config_json: str) -> tuple[int, int]:
    """(all parameters, input embedding parameters) of a config, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in net.parameters())
    return total, net.get_input_embeddings().weight.numel()


def _shape(config: Any, source: str) -> ModelShape:
    total, embedding = _meta_counts(json.dumps(config.to_dict(), sort_keys=True, default=str))
    text = getattr(config, "get_text_config", lambda: config)()
    tied = bool(getattr(text, "tie_word_embeddings", False))
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    matmul = total - embedding + (embedding if tied else 0)  # a tied head still multiplies
    return ModelShape(total, matmul, text.num_hidden_layers, heads * head_dim, source)


# ----------------------------------------------------------------------------- the data
@dataclass
class Rows:
    """Token lengths of a run's training and validation rows, in the tokenised data's order."""

    train: list[int]
    val: list[int]
    keys: list[str] | None = None  # per training then validation row: the teacher cache's key
    estimate: str | None = None  # the rule, when the lengths are not the tokenised data's


def tokenised_rows(dataset: DatasetConfig, tokenizer: Any, seed: int, cache_dir: str) -> Rows:
    """The lengths a run will train on: uapt.data.build_datasets, cached as a run caches it."""
    from uapt.data import build_datasets
    from uapt.teacher_cache import row_key

    train, val, _ = build_datasets(dataset, tokenizer, seed, cache_dir)
    keys = [
        row_key(i, lab)
        for split in (train, val)
        for i, lab in zip(split["input_ids"], split["labels"], strict=True)
    ]
    return Rows([len(i) for i in train["input_ids"]], [len(i) for i in val["input_ids"]], keys)


def estimated_rows(dataset: DatasetConfig, seed: int, why: str, reads: int) -> Rows:
    """Lengths without the tokenizer: the rows' characters / CHARS_PER_TOKEN plus
    TOKENS_PER_MESSAGE per message, capped at max_length; without the data: every row
    max_length tokens (an upper bound), `reads` distinct rows (as many as the run reads)."""
    from uapt.data import load_conversations

    cap = dataset.max_length
    try:
        conversations = load_conversations(dataset, seed)
    except UserError:
        rule = f"{why}, and without the data: every row max_length={cap} tokens"
        val = [cap] * _val_rows(dataset, reads)
        return Rows([cap] * reads, val, None, rule + " (an upper bound)")
    lengths = [
        min(
            cap, sum(math.ceil(len(m["content"]) / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE for m in c)
        )
        for c in conversations
    ]
    n_val = _val_rows(dataset, len(lengths))
    rule = f"{why}: tokens = characters/{CHARS_PER_TOKEN} + {TOKENS_PER_MESSAGE} per message"
    return Rows(lengths[n_val:] or [cap], lengths[:n_val], None, rule)


def _val_rows(dataset: DatasetConfig, n: int) -> int:
    size = dataset.val_size
    return round(size * (dataset.num_train or n)) if isinstance(size, float) else int(size)


# ----------------------------------------------------------------------------- training
class _LengthRows(Sequence):
    """Rows as BatchStream reads them, holding only a length (and their index)."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.lengths = lengths

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": range(self.lengths[i]), "index": i}


@dataclass
class TrainCost:
    """FLOPs of the steps still to run, by part, and what they read."""

    steps: int = 0
    tokens: int = 0  # real tokens of the rows trained on
    computed: int = 0  # positions run (padding included)
    flops: dict[str, float] = field(default_factory=dict)
    rows_read: set[int] = field(default_factory=set)  # training row indices (teacher cache fill)

    def add(self, part: str, flops: float) -> None:
        self.flops[part] = self.flops.get(part, 0.0) + flops

    @property
    def total(self) -> float:
        return sum(self.flops.values())


def _micro_cost(shape: ModelShape, lengths: Sequence[int], packed: bool) -> tuple[int, float]:
    """(positions run, forward FLOPs) of one micro-batch: each row alone (packed, attention
    within each row) or padded to its longest row."""
    if packed:
        return sum(lengths), sum(shape.forward(t) for t in lengths)
    width = max(lengths)
    return len(lengths) * width, len(lengths) * shape.forward(width)


def teacher_in_scoring(spec: ObjectiveSpec) -> bool:
    """Whether a scoring pass (a selection over more rows, the probe) runs the live teacher too:
    uapt.loop.forward_scores reads it for distillation or for select=excess."""
    return spec.distill_weight > 0 or (spec.mask_ratio > 0 and spec.select == "excess")


@dataclass
class Walk:
    """The steps a run reads, as its BatchStream lays them out: per step its forward FLOPs over
    every micro-batch of every rank and its layout (row indices per rank and micro-batch)."""

    forwards: list[float]
    layouts: list[list[list[list[int]]]]
    tokens: int
    computed: int
    rows_read: set[int]


def walk(trainer: Any, shape: ModelShape, rows: Rows, seed: int, start_step: int = 0) -> Walk:
    """Steps start_step..max_steps-1 of the run's data order (uapt.batches.BatchStream)."""
    world = trainer.nproc
    stream = BatchStream(
        _LengthRows(rows.train),
        trainer.micro_batch_size,
        seed,
        0,
        world_size=world,
        accumulation=trainer.accumulation(world),
        max_tokens=trainer.max_tokens_per_micro_batch,
        packed=trainer.packing,
    )
    found = Walk([], [], 0, 0, set())
    for step in range(start_step, trainer.max_steps):
        batch = stream.step_rows(step)
        layout = stream.layout(batch)
        forward = 0.0
        for micro in (m for rank in layout for m in rank):
            lengths = [len(batch[j]["input_ids"]) for j in micro]
            computed, flops = _micro_cost(shape, lengths, trainer.packing)
            found.computed += computed
            forward += flops
        found.forwards.append(forward)
        found.layouts.append(layout)
        found.tokens += sum(len(r["input_ids"]) for r in batch)
        found.rows_read.update(r["index"] for r in batch)
    return found


def train_cost(
    trainer: Any,
    spec: ObjectiveSpec,
    shape: ModelShape,
    rows: Rows,
    seed: int,
    lora: bool,
    start_step: int = 0,
    steps: Walk | None = None,
) -> TrainCost:
    """Steps start_step..max_steps-1 (`steps`: their walk, when already made), their validation
    losses and curriculum probes (uapt.loop.run_loop, log_step), by part: the student's training,
    the live teacher's forward, the scoring pass of a selection that spans micro-batches."""
    steps = steps or walk(trainer, shape, rows, seed, start_step)
    train_factor = 2 if lora else 3  # LoRA: no weight gradients of the frozen weights
    live = spec.needs_teacher and spec.teacher == "live"
    scoring_passes = 1 + (live and teacher_in_scoring(spec))  # the student, and the teacher
    cost = TrainCost(len(steps.forwards), steps.tokens, steps.computed, {}, steps.rows_read)
    cost.add("student", train_factor * sum(steps.forwards))
    for forward, layout in zip(steps.forwards, steps.layouts, strict=True):
        spans = spec.select != "random" and selection_spans(spec, layout)
        if spans:  # a no-grad scoring pass over the global batch first (uapt.batches)
            cost.add("scoring", scoring_passes * forward)
        excess_here = spec.mask_ratio > 0 and spec.select == "excess" and not spans
        if live and (spec.distill_weight > 0 or excess_here):
            cost.add("teacher", forward)
    _add_probes_and_validation(cost, trainer, spec, shape, rows, scoring_passes, start_step)
    return cost


def _add_probes_and_validation(
    cost: TrainCost,
    trainer: Any,
    spec: ObjectiveSpec,
    shape: ModelShape,
    rows: Rows,
    scoring_passes: int,
    start_step: int,
) -> None:
    logged = [
        s
        for s in range(start_step + 1, trainer.max_steps + 1)
        if s % trainer.log_every == 0 or s == trainer.max_steps
    ]
    size = trainer.micro_batch_size
    probe = rows.val[: trainer.batch_size]
    if spec.mask_ratio > 0 and spec.select != "random" and probe:  # the kept-set probe
        per_probe = sum(
            _micro_cost(shape, probe[i : i + size], trainer.packing)[1]
            for i in range(0, len(probe), size)
        )
        cost.add("probe", len(logged) * per_probe * scoring_passes)
    every = trainer.val_every
    validations = 1 + sum(1 for s in logged if every and s % every == 0 and s < trainer.max_steps)
    batches = range(0, len(rows.val), size)
    if trainer.val_batches:
        batches = batches[: trainer.val_batches]
    per_validation = sum(_micro_cost(shape, rows.val[i : i + size], False)[1] for i in batches)
    cost.add("validation", validations * per_validation)


def cache_fill_flops(shape: ModelShape, lengths: Mapping[Any, int]) -> float:
    """The cached teacher's fill: one forward per distinct row (uapt.teacher_cache)."""
    return sum(shape.forward(t) for t in lengths.values())


# ----------------------------------------------------------------------------- evaluation
@dataclass(frozen=True)
class TaskCost:
    """One eval task's work: `requests` forwards per sample over `prompt` tokens, plus `new`
    tokens each (generated one at a time, or scored with the prompt)."""

    name: str
    kind: str  # a key of TASK_KINDS
    samples: int
    requests: int  # forwards per sample (multiple choice: one per choice)
    prompt: float  # mean tokens of a request's prompt (few-shot examples included)
    new: float  # generated tokens (upper bound: max_gen_toks) or the scored continuation
    estimate: str | None = None


def _scored(task: TaskCost, shape: ModelShape) -> float:
    """Prompt and continuation in one forward per request (loglikelihood, multiple choice)."""
    return task.samples * task.requests * shape.forward(round(task.prompt + task.new))


def _generated(task: TaskCost, shape: ModelShape) -> float:
    """The prompt once, then one token at a time over the growing context (a KV cache)."""
    prompt = shape.forward(round(task.prompt))
    new = task.new * (
        2 * shape.matmul_params + 4 * shape.layers * shape.attn_width * (task.prompt + task.new / 2)
    )
    return task.samples * task.requests * (prompt + new)


# How FLOPs follow from a task's tokens, by task kind; a new kind registers its function here.
TASK_KINDS: dict[str, Callable[[TaskCost, ModelShape], float]] = {
    "generate_until": _generated,
    "loglikelihood": _scored,
    "multiple_choice": _scored,
    "nll": _scored,  # a forward-only per-sample NLL: one forward over prompt + response
}


def eval_flops(tasks: Sequence[TaskCost], shape: ModelShape) -> float:
    return sum(TASK_KINDS[t.kind](t, shape) for t in tasks)


@dataclass(frozen=True)
class KnownTask:
    """What a sample of an lm-eval task costs, for planning without its data: the split it
    scores (size published with the dataset), and token means that are estimates (rough sizes of
    the formatted texts, not measured here: the data is on the Hub)."""

    kind: str
    samples: int
    question: int  # tokens of what a sample asks (with its formatting)
    example: int  # tokens of one few-shot example (question and answer)
    choices: float  # requests per sample (multiple choice: its choices)
    continuation: int  # tokens of a scored choice
    fewshot: int  # lm-eval's default few-shot count
    gen: int  # lm-eval's max_gen_toks (generation tasks)


KNOWN_TASKS: dict[str, KnownTask] = {
    "ifeval": KnownTask("generate_until", 541, 80, 0, 1, 0, 0, 1280),
    "gsm8k": KnownTask("generate_until", 1319, 70, 200, 1, 0, 5, 256),
    "arc_easy": KnownTask("multiple_choice", 2376, 35, 40, 4, 5, 0, 0),
    "arc_challenge": KnownTask("multiple_choice", 1172, 40, 45, 4, 6, 0, 0),
    "hellaswag": KnownTask("multiple_choice", 10042, 75, 110, 4, 30, 0, 0),
    "mmlu": KnownTask("multiple_choice", 14042, 90, 90, 4, 1, 0, 0),
    "truthfulqa_mc2": KnownTask("multiple_choice", 817, 270, 0, 7, 15, 0, 0),
    "winogrande": KnownTask("multiple_choice", 1267, 25, 30, 2, 8, 0, 0),
}
DEFAULT_GEN = 256  # lm-eval's HFLM max_gen_toks when a task sets none


def token_counts(texts: Sequence[str], tokenizer: Any | None) -> list[float]:
    """Tokens of each text: the tokenizer's, else characters / CHARS_PER_TOKEN."""
    if not texts:
        return []
    if tokenizer is None:
        return [math.ceil(len(t) / CHARS_PER_TOKEN) for t in texts]
    return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _samples(total: int, limit: int | float | None) -> int:
    if limit is None:
        return total
    return min(total, limit) if isinstance(limit, int) else math.ceil(total * limit)


def _jsonl(path: str) -> list[dict[str, Any]]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def task_cost(spec: Any, tokenizer: Any | None, system: str | None = None) -> TaskCost | None:
    """The cost of one eval task (a checked uapt.sections.eval.TaskSpec); None when uapt
    cannot tell (a task it has no figures for). `system`: the suite's system instruction."""
    how = None if tokenizer is not None else f"tokens = characters/{CHARS_PER_TOKEN}"
    if spec.is_nll:
        return nll_cost(spec, tokenizer, system)
    if spec.task == "arith":
        from uapt.arith import arith_rows

        texts = [r["question"] for r in arith_rows(spec.size or 64, spec.seed, "test")]
        gen = spec.max_gen_toks or DEFAULT_GEN
        return _generation(spec, texts, 0, gen, tokenizer, how)
    if spec.task == "ifeval_embedded":
        from uapt.ifeval import ifeval_prompts

        texts = [r["prompt"] for r in ifeval_prompts(spec.size or 48, spec.seed)]
        return _generation(spec, texts, 0, spec.max_gen_toks or 1280, tokenizer, how)
    known = KNOWN_TASKS.get(spec.task)
    if known is None:
        return None
    files = spec.data_files if isinstance(spec.data_files, Mapping) else {}
    fewshot = known.fewshot if spec.num_fewshot is None else spec.num_fewshot
    gen = spec.max_gen_toks or known.gen
    if spec.task in ("gsm8k", "ifeval") and files:  # the real rows, from local files
        field_name = "question" if spec.task == "gsm8k" else "prompt"
        test = _jsonl(files.get("test") or files["train"])
        shots = _jsonl(files["train"])[:64] if fewshot else []
        example = _mean(token_counts([r["question"] + r["answer"] for r in shots], tokenizer))
        return _generation(
            spec, [r[field_name] for r in test], fewshot * example, gen, tokenizer, how
        )
    rule = "uapt's figures for the task (sample count of its split; token means estimated)"
    prompt = known.question + fewshot * known.example
    new = gen if known.kind == "generate_until" else known.continuation
    requests = max(1, round(known.choices))
    return TaskCost(
        spec.name, known.kind, _samples(known.samples, spec.limit), requests, prompt, new, rule
    )


def nll_cost(spec: Any, tokenizer: Any | None, system: str | None) -> TaskCost:
    """uapt's nll task: one forward per row over its prompt and reference response, the rows
    read and tokenised as the task reads them (uapt.evaluation.nll); without the tokenizer,
    characters / 4 plus the chat template's markers, capped at the task's max_length."""
    from uapt.data import IGNORE_INDEX
    from uapt.evaluation import nll

    rows = nll.read_rows(spec)
    max_length = spec.max_length or nll.DEFAULT_MAX_LENGTH
    if tokenizer is not None:
        encoded = nll.encode(rows, tokenizer, max_length, system)
        scored = [sum(label != IGNORE_INDEX for label in labels) for _, _, labels in encoded]
        prompt = [len(ids) - n for (_, ids, _), n in zip(encoded, scored, strict=True)]
        return TaskCost(spec.name, "nll", len(encoded), 1, _mean(prompt), _mean(scored))
    head = [system] if system else []
    prompt, scored = [], []
    for _, question, answer in rows:
        asked = sum(token_counts([*head, question], None)) + TOKENS_PER_MESSAGE * (len(head) + 1)
        answered = token_counts([answer], None)[0] + TOKENS_PER_MESSAGE
        if asked < max_length:  # else no response token fits: the task leaves the row out
            prompt.append(asked)
            scored.append(min(answered, max_length - asked))
    rule = (
        f"tokens = characters/{CHARS_PER_TOKEN} + {TOKENS_PER_MESSAGE} per message, "
        "capped at max_length"
    )
    return TaskCost(spec.name, "nll", len(prompt), 1, _mean(prompt), _mean(scored), rule)


def _generation(
    spec: Any, texts: Sequence[str], shots: float, gen: int, tokenizer: Any, how: str | None
) -> TaskCost:
    prompt = _mean(token_counts(texts, tokenizer)) + shots
    n = _samples(len(texts), spec.limit)
    return TaskCost(spec.name, "generate_until", n, 1, prompt, gen, how)
