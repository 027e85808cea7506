"""Greedy generation for lm-eval's `generate_until`, with today's outputs, at the hardware's pace.

lm-eval's HFLM hands each batch of prompts to `model.generate`, which runs every row until the
last one stops: a row that met its stop sequence (or its end-of-turn token) at token 40 is still
computed, and thrown away, up to token 256. Its key/value cache also grows by concatenation, so
every decoding step copies the whole cache once more. `UaptLM._model_generate` replaces that call
for plain greedy decoding (the only kind uapt's suites use) by `greedy_generate`:

- the prompts' real tokens run through the layers packed, without padding; attention runs in
  the left-padded batch's layout with its mask and positions (`packed_sdpa`), so every token
  gets the numbers `model.generate`'s prefill gives it;
- a row leaves the batch once its output text is final: it emitted an end-of-sequence token, or
  its decoded text holds a stop sequence (lm-eval cuts the text there, so later tokens cannot
  change it). The batch is compacted when that saves more than the copy costs (`should_compact`);
- keys and values are written in place into buffers sized for the whole generation
  (`InPlaceLayer`), never concatenated.

A row's tokens depend only on its own inputs as long as every matrix product computes each row
as a product of the whole batch does: BLAS picks its kernel, and with it the order of the sums,
by the number of rows, so a batch only shrinks to sizes `ExactSizes` found exact for the model's
layers. On CPU the outputs are then bitwise those of `model.generate` (tests/test_generate.py
checks it; on GPU a kernel choice may still flip a near tie). `fast_path_blocker` says when the
loop would not reproduce `model.generate` (sampling, logits processors, a stop sequence
overlapping a special token, ...): then lm-eval's own path runs, and the reason is logged.
"""

from __future__ import annotations

import contextvars
import functools
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from transformers import AttentionInterface
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import create_causal_mask

from uapt.sections.eval import GENERATORS

log = logging.getLogger("uapt.evaluation")

# generate() keywords the loop honours; any other keyword sends a batch to model.generate.
GREEDY_KWARGS = {"attention_mask", "do_sample", "temperature"}

# GenerationConfig fields that do not change greedy decoding (anything else set on the model's
# generation config, e.g. repetition_penalty or min_new_tokens, sends a batch to model.generate).
NEUTRAL_GENERATION_FIELDS = {
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "decoder_start_token_id",
    "max_length",
    "max_new_tokens",
    "do_sample",
    "use_cache",
    "transformers_version",
    "_from_model_config",
    "temperature",  # sampling only
    "top_k",
    "top_p",
    "output_attentions",  # what else generate() returns (lm-eval asks for ids only)
    "output_hidden_states",
    "output_scores",
    "output_logits",
}


@dataclass(frozen=True)
class Packing:
    """Where a packed prefill's tokens sit in the left-padded batch model.generate would run."""

    rows: torch.Tensor  # each real token's batch row
    cols: torch.Tensor  # and its column
    batch: int
    length: int  # the padded prompt length


_PACKING: contextvars.ContextVar[Packing | None] = contextvars.ContextVar("packing", default=None)
PACKED_SDPA = "uapt_packed_sdpa"


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, Any]:
    """transformers' SDPA attention for a packed prefill: the real tokens' queries [1, heads,
    tokens, dim] go back to their places in the left-padded batch (pads: zeros), attention runs
    there as in model.generate's prefill (the keys and values come from InPlaceLayer in that
    layout, the mask is the padded batch's), and the real tokens' outputs come back packed. A
    query row's result depends only on its own values and the unmasked keys, so every real token
    gets the numbers the padded batch gives it; the layers around attention skip the pads."""
    packing = _PACKING.get()
    assert packing is not None, "packed_sdpa outside a packed prefill"
    padded = query.new_zeros(packing.batch, query.shape[1], packing.length, query.shape[-1])
    padded[packing.rows, :, packing.cols] = query[0].transpose(0, 1)
    out, weights = sdpa_attention_forward(module, padded, key, value, attention_mask, **kwargs)
    return out[packing.rows, packing.cols].unsqueeze(0), weights


AttentionInterface.register(PACKED_SDPA, packed_sdpa)


class InPlaceLayer(DynamicLayer):
    """One layer's keys and values in buffers [rows, heads, capacity, dim] allocated once; each
    update writes its columns in place and returns views of the filled part (DynamicLayer copies
    the whole cache into a new tensor at every step). During a packed prefill (`Packing`) the
    real tokens' keys and values go to their places in the left-padded batch; pads stay zero."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.rows = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        packing = _PACKING.get()
        self.rows = key_states.shape[0] if packing is None else packing.batch
        heads = key_states.shape[1]
        self.key_buffer = key_states.new_zeros(
            self.rows, heads, self.capacity, key_states.shape[-1]
        )
        self.value_buffer = value_states.new_zeros(
            self.rows, heads, self.capacity, value_states.shape[-1]
        )
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        packing = _PACKING.get()
        if packing is not None:  # [1, heads, tokens, dim] -> their (row, column) places
            rows, cols = packing.rows, packing.cols
            self.key_buffer[rows, :, cols] = key_states[0].transpose(0, 1)
            self.value_buffer[rows, :, cols] = value_states[0].transpose(0, 1)
            self.length = packing.length
        else:
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise RuntimeError(f"InPlaceLayer: {end} positions exceed capacity {self.capacity}")
            self.key_buffer[: self.rows, :, self.length : end] = key_states
            self.value_buffer[: self.rows, :, self.length : end] = value_states
            self.length = end
        self._views()
        return self.keys, self.values

    def _views(self) -> None:
        self.keys = self.key_buffer[: self.rows, :, : self.length]
        self.values = self.value_buffer[: self.rows, :, : self.length]

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep these rows (indices into the current ones), moved to the front of the buffers."""
        for buffer in (self.key_buffer, self.value_buffer):
            buffer[: len(rows), :, : self.length] = buffer[rows, :, : self.length]
        self.rows = len(rows)
        self._views()

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_max_length(self) -> int:
        return self.capacity


class InPlaceCache(Cache):
    """A model's cache made of InPlaceLayers, one per decoder layer."""

    def __init__(self, num_layers: int, capacity: int) -> None:
        super().__init__(layers=[InPlaceLayer(capacity) for _ in range(num_layers)])

    def keep_rows(self, rows: torch.Tensor) -> None:
        for layer in self.layers:
            layer.keep_rows(rows)


def should_compact(finished: int, rows: int, remaining_steps: int) -> bool:
    """Whether dropping `finished` of `rows` batch rows pays: the row-steps it saves over the
    remaining steps must exceed the rows it copies (moving a row's cache costs about what one
    decoding step of it costs: both read its keys and values once)."""
    return finished > 0 and finished * remaining_steps > rows - finished


class ExactSizes:
    """The batch sizes at which every linear layer of `model` computes each row bitwise as it
    does in a product of `full` rows.

    BLAS picks its kernel by the shapes: on oneDNN/MKL (measured) a product of 1-3 rows rounds
    differently from the same rows in a bigger product, and with 2 threads so do 5-7 and 9-11.
    Which sizes are exact is probed, once per process and shape, by multiplying random rows both
    ways (kernel choice depends on shapes, not values).
    """

    def __init__(self, model: Any, full: int) -> None:
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        self.shapes = tuple(
            sorted({(m.in_features, m.out_features, m.bias is not None) for m in linears})
        )
        weight = next(model.parameters())
        self.dtype, self.device, self.full = weight.dtype, weight.device, full

    def exact(self, rows: int) -> bool:
        threads = torch.get_num_threads()
        key = (self.dtype, str(self.device), threads, self.full)
        return all(rows in _exact_row_counts(shape, *key) for shape in self.shapes)

    def at_least(self, rows: int, ceiling: int) -> int:
        """The smallest exact size in [rows, ceiling] (ceiling itself when none is smaller)."""
        return next((n for n in range(rows, ceiling) if self.exact(n)), ceiling)


@functools.cache
def _exact_row_counts(
    shape: tuple[int, int, bool], dtype: torch.dtype, device: str, threads: int, full: int
) -> frozenset[int]:
    """The row counts n <= full at which a linear layer of this shape computes its rows bitwise
    as in a product of `full` rows (at this many threads: the split across threads matters too)."""
    in_features, out_features, bias = shape
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(full, in_features, generator=gen, device=device).to(dtype)
    w = torch.randn(out_features, in_features, generator=gen, device=device).to(dtype)
    b = torch.randn(out_features, generator=gen, device=device).to(dtype) if bias else None
    with torch.no_grad():
        whole = torch.nn.functional.linear(x, w, b)
        return frozenset(
            n
            for n in range(1, full + 1)
            if torch.equal(torch.nn.functional.linear(x[:n].clone(), w, b), whole[:n])
        )


class StopTexts:
    """Which rows' output text is final because it holds a stop sequence.

    lm-eval decodes a row's generated tokens without special tokens and cuts the text at the first
    stop sequence, so once the decoded text holds one, later tokens cannot change what is kept
    (decoding is prefix-stable: fast_path_blocker checks it). Each row's text is decoded
    incrementally (the tokenizers library's DecodeStream: a few microseconds a token); a hit is
    confirmed on the whole text decoded as lm-eval decodes it, so the stream only ever decides
    when to look, never what is found.
    """

    def __init__(self, tokenizer: Any, stops: Iterable[str]) -> None:
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.backend = getattr(tokenizer, "backend_tokenizer", None)
        self.keep = max((len(s) for s in self.stops), default=1) - 1  # tail that can start a hit
        self.streams: dict[int, Any] = {}
        self.tails: dict[int, str] = {}

    def reached(self, row: int, token: int, tokens: Sequence[int]) -> bool:
        """Whether row `row`, whose generated tokens are now `tokens` (ending with `token`),
        holds a stop sequence."""
        if not self.stops:
            return False
        if self.backend is None:  # a Python tokenizer: decode the whole text every step
            return self.confirmed(tokens)
        if row not in self.streams:
            from tokenizers.decoders import DecodeStream

            self.streams[row] = DecodeStream(skip_special_tokens=True)
        chunk = self.streams[row].step(self.backend, token)
        if not chunk:
            return False
        text = self.tails.get(row, "") + chunk  # a new hit ends in this chunk
        self.tails[row] = text[len(text) - self.keep :] if self.keep else ""
        return any(stop in text for stop in self.stops) and self.confirmed(tokens)

    def confirmed(self, tokens: Sequence[int]) -> bool:
        text = self.tokenizer.decode(list(tokens), skip_special_tokens=True)
        return any(stop in text for stop in self.stops)


@torch.no_grad()
def greedy_generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: Iterable[int],
    pad_id: int,
    stop: StopTexts | None = None,
) -> torch.Tensor:
    """Greedy continuation of a left-padded batch, as model.generate computes it: [rows, prompt +
    generated] token ids, each row padded with `pad_id` after its end-of-sequence token or once
    its text holds a stop sequence (model.generate pads after an end-of-sequence token)."""
    rows, prompt_len = input_ids.shape
    config = model.config.get_text_config(decoder=True)
    cache = InPlaceCache(config.num_hidden_layers, prompt_len + max_new_tokens)
    eos = torch.tensor(sorted(set(eos_ids)), dtype=input_ids.dtype, device=input_ids.device)
    out = torch.full((rows, max_new_tokens), pad_id, dtype=input_ids.dtype, device=input_ids.device)
    mask = attention_mask.to(torch.long)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as model.generate makes them
    origin = torch.arange(rows, device=input_ids.device)  # each batch row's row in `out`
    done = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    sizes = ExactSizes(model, rows)
    generated: list[list[int]] = [[] for _ in range(rows)]
    logits = _prefill(model, input_ids, mask, positions, cache)
    for step in range(max_new_tokens):
        next_ids = logits[:, -1].to(dtype=torch.float32).argmax(dim=-1)
        live = ~done
        out[origin[live], step] = next_ids[live]
        done |= live & torch.isin(next_ids, eos)
        if stop is not None and stop.stops:
            done |= _stopped(stop, live, origin, next_ids, generated)
        remaining = max_new_tokens - step - 1
        if remaining == 0 or bool(done.all()):
            return torch.cat([input_ids, out[:, : step + 1]], dim=1)
        keep = _rows_to_keep(done, sizes, remaining)
        if keep is not None:
            cache.keep_rows(keep)
            origin, done, next_ids = origin[keep], done[keep], next_ids[keep]
            mask, positions = mask[keep], positions[keep]
        mask = torch.cat([mask, mask.new_ones(len(origin), 1)], dim=1)
        positions = positions[:, -1:] + 1
        logits = _forward(model, next_ids[:, None], mask, positions, cache)
    return torch.cat([input_ids, out], dim=1)


def _forward(
    model: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: InPlaceCache,
) -> torch.Tensor:
    """The next-token logits, as model.generate asks for them (only the last position's)."""
    return model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        cache=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits


def _prefill(
    model: Any,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    positions: torch.Tensor,
    cache: InPlaceCache,
) -> torch.Tensor:
    """The prompts' last-position logits [rows, 1, vocab]. With padding and SDPA attention the
    prompts run packed (only real tokens through the layers, `packed_sdpa`), else as a batch."""
    config = model.config
    real = mask.bool()
    if bool(real.all()) or config._attn_implementation != "sdpa":
        return _forward(model, input_ids, mask, positions, cache)
    rows, length = input_ids.shape
    padded_mask = create_causal_mask(  # what the model builds for the padded batch
        config=config,
        inputs_embeds=torch.empty(rows, length, 0, dtype=model.dtype, device=input_ids.device),
        attention_mask=mask,
        cache=cache,
        position_ids=positions,
    )
    if padded_mask is None:
        return _forward(model, input_ids, mask, positions, cache)
    where = real.nonzero(as_tuple=True)
    last = real.sum(-1).cumsum(0) - 1  # each row's last token in the packed sequence
    token = _PACKING.set(Packing(where[0], where[1], rows, length))
    config._attn_implementation = PACKED_SDPA
    try:
        logits = model(
            input_ids=input_ids[real][None],
            attention_mask=padded_mask,
            position_ids=positions[real][None],
            cache=cache,
            use_cache=True,
            logits_to_keep=last,
        ).logits
    finally:
        config._attn_implementation = "sdpa"
        _PACKING.reset(token)
    return logits[0][:, None]


def _stopped(
    stop: StopTexts,
    live: torch.Tensor,
    origin: torch.Tensor,
    next_ids: torch.Tensor,
    generated: list[list[int]],
) -> torch.Tensor:
    """The batch rows whose text now holds a stop sequence (among the live ones)."""
    hit = torch.zeros_like(live)
    ids, rows = next_ids.tolist(), origin.tolist()
    for i in live.nonzero().flatten().tolist():
        tokens = generated[rows[i]]
        tokens.append(ids[i])
        hit[i] = stop.reached(rows[i], ids[i], tokens)
    return hit


def _rows_to_keep(done: torch.Tensor, sizes: ExactSizes, remaining: int) -> torch.Tensor | None:
    """The batch rows to go on with, when dropping finished ones pays (None: keep them all): the
    unfinished rows, topped up with finished ones to a size computed exactly (ExactSizes)."""
    rows, live = len(done), int((~done).sum())
    if not should_compact(rows - live, rows, remaining):
        return None
    size = sizes.at_least(live, rows)
    if size == rows or not should_compact(rows - size, rows, remaining):
        return None
    unfinished, finished = (~done).nonzero().flatten(), done.nonzero().flatten()
    return torch.sort(torch.cat([unfinished, finished[: size - live]])).values


# A greedy choice that float rounding can flip: SmolLM2-135M's logits (|logit| up to ~45) recomputed
# in other batch shapes differ by up to 3e-5 (measured), so a top-2 gap over 1e-3 (30x that) is
# not a rounding effect.
NEAR_TIE = 1e-3


@torch.no_grad()
def divergence(
    model: Any, prompt: Sequence[int], reference: Sequence[int], other: Sequence[int]
) -> tuple[int, float] | None:
    """Where the greedy continuation `other` of `prompt` first departs from `reference`, and the
    reference's margin there: the logit of its token minus that of the other's, computed on
    prompt + reference[:index] alone. None when neither departs from the other."""
    index = next(
        (i for i, (a, b) in enumerate(zip(reference, other, strict=False)) if a != b), None
    )
    if index is None:
        return None
    device = next(model.parameters()).device
    ids = torch.tensor([[*prompt, *reference[:index]]], device=device)
    logits = model(input_ids=ids).logits[0, -1].to(torch.float32)
    return index, float(logits[reference[index]] - logits[other[index]])


def difference(
    model: Any, prompt: Sequence[int], reference: Sequence[int], other: Sequence[int]
) -> dict[str, Any] | None:
    """Where `other` first departs from `reference` ("token"), the reference's margin there and
    whether that margin is a near tie (|margin| <= NEAR_TIE); None when they do not depart."""
    found = divergence(model, prompt, reference, other)
    if found is None:
        return None
    index, margin = found
    return {"token": index, "margin": margin, "near_tie": abs(margin) <= NEAR_TIE}


def special_texts(tokenizer: Any) -> dict[int, str]:
    """Every special token's id and text (those decoding with skip_special_tokens drops)."""
    found = {int(i): str(t.content) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    for text in tokenizer.all_special_tokens:
        found.setdefault(int(tokenizer.convert_tokens_to_ids(text)), text)
    return found


def overlaps(a: str, b: str) -> bool:
    """Whether an occurrence of `a` can share characters with an adjacent or enclosing `b`."""
    if a in b or b in a:
        return True
    return any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))


def fast_path_blocker(
    model: Any, tokenizer: Any, stops: Sequence[str], kwargs: Mapping[str, Any]
) -> str | None:
    """Why greedy_generate would not reproduce model.generate for this batch (None: it would)."""
    unknown = sorted(set(kwargs) - GREEDY_KWARGS)
    if unknown:
        return f"generation keywords {unknown}"
    if kwargs.get("do_sample") or (
        kwargs.get("do_sample") is None and float(kwargs.get("temperature") or 0.0) > 0
    ):
        return "sampling"
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        extra = sorted(set(generation.to_diff_dict()) - NEUTRAL_GENERATION_FIELDS)
        if extra:
            return f"the model's generation config sets {extra}"
    config = model.config.get_text_config(decoder=True)
    kinds = set(getattr(config, "layer_types", None) or ["full_attention"])
    if kinds != {"full_attention"} or config.is_encoder_decoder:
        return f"layer types {sorted(kinds)}"
    if getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return "the tokenizer cleans up spaces when decoding (decoded text is not prefix-stable)"
    specials = special_texts(tokenizer)
    if pad_token_id(model, tokenizer) not in specials:
        return "no special pad token (the text of a pad would follow a finished row)"
    eos_texts = {specials.get(i) for i in eos_token_ids(model, tokenizer)}
    for stop in stops:
        for text in specials.values():
            if stop and text != stop and overlaps(stop, text):
                return f"the stop sequence {stop!r} overlaps the special token {text!r}"
        if stop in specials.values() and stop not in eos_texts:
            return f"the stop sequence {stop!r} is a special token that does not end generation"
    return None


def eos_token_ids(model: Any, tokenizer: Any) -> list[int]:
    """The ids model.generate ends a row at: the generation config's, else the tokenizer's."""
    generation = getattr(model, "generation_config", None)
    ids = getattr(generation, "eos_token_id", None)
    if ids is None:
        ids = tokenizer.eos_token_id
    if ids is None:
        return []
    return [int(i) for i in ([ids] if isinstance(ids, int) else ids)]


def pad_token_id(model: Any, tokenizer: Any) -> int | None:
    """What model.generate pads finished rows with when lm-eval calls it: the tokenizer's pad
    token, else the first end-of-sequence id."""
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    eos = eos_token_ids(model, tokenizer)
    return eos[0] if eos else None


class UaptLM(HFLM):
    """lm-eval's HFLM with `greedy_generate` in place of model.generate where it gives the same
    outputs (`generator="fast"`); lm-eval still batches, decodes, cuts at stop sequences and
    scores. `generator="hf"` is lm-eval's HFLM unchanged."""

    def __init__(self, *args: Any, generator: str = "fast", **kwargs: Any) -> None:
        if generator not in GENERATORS:
            raise ValueError(f"generator={generator!r}: choose from {', '.join(GENERATORS)}")
        super().__init__(*args, **kwargs)
        self.generator = generator
        self.fallbacks: dict[str, int] = {}  # why batches went to model.generate, and how many

    def _model_generate(
        self, context: torch.Tensor, max_length: int, stop: list[str], **generation_kwargs: Any
    ) -> torch.Tensor:
        blocker = self._blocker(stop, generation_kwargs)
        if blocker is not None:
            return super()._model_generate(context, max_length, stop, **generation_kwargs)
        mask = generation_kwargs.get("attention_mask")
        if mask is None:
            mask = torch.ones_like(context)
        pad = pad_token_id(self.model, self.tokenizer)
        assert pad is not None  # fast_path_blocker checked it
        return greedy_generate(
            self.model,
            context,
            mask,
            max_new_tokens=max_length - context.shape[1],
            eos_ids=eos_token_ids(self.model, self.tokenizer),
            pad_id=pad,
            stop=StopTexts(self.tokenizer, stop),
        )

    def _blocker(self, stop: list[str], kwargs: Mapping[str, Any]) -> str | None:
        """Why this batch goes to model.generate (None: it does not); logged once per reason."""
        if self.generator == "hf":
            return "eval.generate=hf"
        if self.backend != "causal" or self.think_end_token is not None:
            blocker = "not a causal LM without thinking tokens"
        else:
            blocker = fast_path_blocker(self.model, self.tokenizer, stop, kwargs)
        if blocker is not None:
            if blocker not in self.fallbacks:
                log.warning("eval: lm-eval's model.generate for this task: %s", blocker)
            self.fallbacks[blocker] = self.fallbacks.get(blocker, 0) + 1
        return blocker
