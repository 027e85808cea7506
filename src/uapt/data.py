"""The data room: load ► chat messages ► tokens, with labels only on assistant tokens.

Rows come from the synthetic task, a local .json/.jsonl/.parquet file or the Hugging Face Hub,
and are mapped to chat messages by `dataset.format` (qa | alpaca | sharegpt). Every
conversation is rendered with the tokenizer's own chat template and tokenised once; the labels
cover the content of every assistant turn plus the end-of-turn marker that closes it (e.g.
``<|im_end|>``), found by rendering prefixes of the conversation, so any template works.
Tokenised splits are cached under ``<cache_dir>/datasets/`` by a hash of their content.
See docs/data.md for the rules (truncation, skipping, splitting, caching).

Why this size: one pipeline read top to bottom in the order a row flows through it (config,
rows, messages, labels, cache, collate); each section is short and used by the next one only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from uapt import files
from uapt.errors import UserError
from uapt.schema import ConfigError
from uapt.sections.dataset import SYNTHETIC, DatasetConfig, check_local, is_local

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
ARITH_SEED = 0  # the eval suites' arith task uses seed 0: its test rows are disjoint from these
ENCODE_BATCH = 256  # conversations tokenised per call of the (Rust, batched) tokenizer
LABEL_RECIPE = "spans-v1"  # bump when tokenisation or labelling changes (invalidates the cache)
CACHE_FORMAT = "manifest-v1"  # bump when a cache entry's layout changes

# ShareGPT speaker names (lower-cased) -> chat roles. Anything else is an error.
ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",  # ShareGPT dumps also hold replies shared from these assistants
    "bard": "assistant",
}


class DataError(UserError):
    """Bad data: the message names the file (and line or row) or the source."""


def _config(node: Mapping[str, Any] | DatasetConfig) -> DatasetConfig:
    return DatasetConfig.parse(node)


# ----------------------------------------------------------------------------- rows
def _read_rows(cfg: DatasetConfig) -> Iterator[tuple[str, Any]]:
    """(where, row) pairs; `where` names the file and line/row for error messages."""
    source = cfg.source
    if source == SYNTHETIC:
        yield from _synthetic_rows(cfg)
    elif is_local(source):
        yield from _local_rows(check_local(source))
    else:
        yield from _hub_rows(cfg)


def _synthetic_rows(cfg: DatasetConfig) -> Iterator[tuple[str, Any]]:
    from uapt.arith import arith_rows

    n_val = _val_count(cfg.val_size, cfg.num_train)  # a fraction is of num_train here
    for i, row in enumerate(arith_rows(cfg.num_train + n_val, ARITH_SEED, "train")):
        yield f"synthetic arith row {i}", row


def _utf8(raw: bytes, path: Path, line: int | None = None) -> str:
    """`raw` decoded as UTF-8; DataError naming the file and line when it is not."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if line is None:
            line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); save the file as UTF-8"
        ) from None


def _local_rows(path: Path) -> Iterator[tuple[str, Any]]:
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = _utf8(raw, path, lineno)
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None
                yield f"{path}:{lineno}", row
    elif path.suffix == ".json":
        try:
            rows = json.loads(_utf8(path.read_bytes(), path))
        except json.JSONDecodeError as e:
            raise DataError(
                f"{path}:{e.lineno}: malformed JSON ({e.msg}, column {e.colno})"
            ) from None
        if not isinstance(rows, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(rows).__name__}")
        for i, row in enumerate(rows):
            yield f"{path} row {i}", row
    else:
        import pyarrow.parquet as pq

        for i, row in enumerate(pq.read_table(path).to_pylist()):
            yield f"{path} row {i}", row


def _hub_rows(cfg: DatasetConfig) -> Iterator[tuple[str, Any]]:
    import datasets

    source, subset, split = cfg.source, cfg.subset, cfg.split
    data_files = cfg.data_files
    try:
        rows = datasets.load_dataset(source, subset, split=split, data_files=data_files)
    except Exception as e:  # offline, unknown id, bad subset/split: say which key led there
        raise DataError(
            f"dataset.source={source!r} (subset={subset!r}, split={split!r}): could not load it "
            f"from the Hugging Face Hub: {type(e).__name__}: {e}"
        ) from e
    for i, row in enumerate(rows):
        yield f"{source} ({subset or 'default'}/{split}) row {i}", row


# ----------------------------------------------------------------------------- rows ► messages
Messages = list[dict[str, str]]


def _field(row: Any, key: str, where: str, option: str | None = None) -> str:
    if not isinstance(row, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if key not in row:
        via = f" (dataset.{option})" if option else ""
        raise DataError(f"{where}: missing field {key!r}{via}; the row has: {', '.join(row)}")
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _qa(row: Any, cfg: DatasetConfig, where: str) -> Messages:
    prompt = _field(row, cfg.prompt_field, where, "prompt_field")
    response = _field(row, cfg.response_field, where, "response_field")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _alpaca(row: Any, cfg: DatasetConfig, where: str) -> Messages:
    """User content = instruction, plus a blank line and the input when the input is not blank."""
    instruction = _field(row, "instruction", where)
    has_input = isinstance(row, Mapping) and row.get("input") is not None
    extra = _field(row, "input", where) if has_input else ""
    if extra.strip():
        instruction = f"{instruction}\n\n{extra}"
    output = _field(row, "output", where)
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]


def _sharegpt(row: Any, cfg: DatasetConfig, where: str) -> Messages:
    key = cfg.conversations_field
    if not isinstance(row, Mapping) or key not in row:
        keys = ", ".join(row) if isinstance(row, Mapping) else type(row).__name__
        raise DataError(
            f"{where}: missing field {key!r} (dataset.conversations_field); has: {keys}"
        )
    turns = row[key]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field {key!r} must be a list of turns")
    messages = []
    for j, turn in enumerate(turns):
        at = f"{where} turn {j}"
        if not isinstance(turn, Mapping):
            raise DataError(f"{at}: expected an object with 'from' and 'value'")
        speaker = turn.get("from", turn.get("role"))
        content = turn.get("value", turn.get("content"))
        if speaker is None or content is None:
            raise DataError(f"{at}: needs 'from' and 'value' (or 'role' and 'content')")
        role = ROLES.get(str(speaker).lower())
        if role is None:
            raise DataError(f"{at}: unknown role {speaker!r}; known: {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{at}: 'value' must be a string, got {type(content).__name__}")
        messages.append({"role": role, "content": content})
    return messages


CONVERTERS = {"qa": _qa, "alpaca": _alpaca, "sharegpt": _sharegpt}


def _problem(messages: Messages) -> str | None:
    """Why a conversation cannot be trained on (the skip counter's name), or None."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    if not any(m["role"] == "assistant" for m in body):
        return "no_assistant_turn"
    for k, m in enumerate(body):
        if m["role"] != ("user" if k % 2 == 0 else "assistant"):
            return "bad_turn_order"
    if any(not m["content"].strip() for m in body if m["role"] == "assistant"):
        return "empty_response"
    if any(not m["content"].strip() for m in body if m["role"] == "user"):
        return "empty_prompt"
    return None


def _finish(messages: Messages, system_prompt: str | None) -> Messages:
    while messages and messages[-1]["role"] != "assistant":  # nothing to learn after the last reply
        messages = messages[:-1]
    if system_prompt and messages and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}, *messages]
    return messages


def _conversations(cfg: DatasetConfig, seed: int) -> tuple[list[Messages], Counter]:
    """All usable conversations, shuffled, capped at max_samples; plus the skip counts."""
    convert = CONVERTERS[cfg.format]
    kept: list[Messages] = []
    skipped: Counter = Counter()
    for where, row in _read_rows(cfg):
        messages = _finish(convert(row, cfg, where), cfg.system_prompt)
        problem = _problem(messages)
        if problem:
            skipped[problem] += 1
            log.debug("%s: skipped (%s)", where, problem)
        else:
            kept.append(messages)
    order_seed = seed if cfg.shuffle_seed is None else cfg.shuffle_seed
    random.Random(order_seed).shuffle(kept)
    if cfg.max_samples is not None:
        kept = kept[: cfg.max_samples]
    return kept, skipped


def load_conversations(data_cfg: DatasetConfig, seed: int) -> list[Messages]:
    """Read the source and map rows to chat messages: [[{role, content}, ...], ...].

    Unusable rows (empty response, no assistant turn, ...) are dropped and logged; the order is
    shuffled with `dataset.shuffle_seed` (or `seed`) and cut at `dataset.max_samples`.
    """
    cfg = _config(data_cfg)
    conversations, skipped = _conversations(cfg, seed)
    _log_skipped(cfg, skipped)
    return conversations


def _val_count(val_size: int | float, n: int) -> int:
    """Rows held out: an int is a count, a fraction is of n rows (see docs/data.md)."""
    if isinstance(val_size, float):
        return round(val_size * n)
    return int(val_size)


# ----------------------------------------------------------------------------- messages ► labels
def _render(tokenizer: Any, messages: Messages, add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as e:  # jinja raises plain exceptions (e.g. "roles must alternate")
        first = messages[0]["content"][:60] if messages else ""
        raise DataError(
            f"the chat template of {tokenizer.name_or_path!r} failed on a conversation starting "
            f"{first!r}: {type(e).__name__}: {e}"
        ) from e


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _locate(text: str, content: str, start: int) -> tuple[int, int]:
    """Character span of `content` in `text` at or after `start` (templates may strip it)."""
    for piece in (content, content.strip()):
        pos = text.find(piece, start)
        if pos >= 0:
            return pos, pos + len(piece)
    raise DataError(
        f"the chat template does not render the assistant message {content[:60]!r} verbatim; "
        "uapt cannot tell which tokens to train on"
    )


_MARKER = re.compile(r"\s*\S+")


def _closer(after_turn: str, after_in_full: str) -> str:
    """The end-of-turn marker: what follows the content both when the turn ends the rendering
    and inside the full conversation, up to the first whitespace after it (e.g. "<|im_end|>")."""
    common = after_turn[: _common_prefix(after_turn, after_in_full)]
    match = _MARKER.match(common)
    return match.group(0) if match else ""


def assistant_spans(messages: Messages, tokenizer: Any) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and, per assistant turn, (content start, content end, turn end):
    characters [start, turn end) are the content plus its end-of-turn marker."""
    full = _render(tokenizer, messages)
    spans: list[tuple[int, int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = full if i == len(messages) - 1 else _render(tokenizer, messages[: i + 1])
        start, end = _locate(full, message["content"], max(cursor, _common_prefix(head, full)))
        _, turn_end = _locate(turn, message["content"], _common_prefix(head, turn))
        closer = _closer(turn[turn_end:], full[end:])
        spans.append((start, end, end + len(closer)))
        cursor = end + len(closer)
    return full, spans


def token_labels(
    ids: Sequence[int], offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int, int]]
) -> list[int]:
    """Labels for tokens with these character offsets: the id where the token is assistant text.

    Tokens are read as a partition of the text: token k covers [end of token k-1, end of k), so
    offsets trimmed of leading whitespace still cover it. A token is trained when it overlaps an
    assistant content span (a token straddling the content's start or end is trained whole), or
    lies entirely inside the end-of-turn marker; a zero-width token (the 2nd..nth piece of one
    character split over several tokens) follows the token before it.
    """
    ids_arr = np.asarray(ids, dtype=np.int64)
    ends = np.maximum.accumulate(np.asarray([end for _, end in offsets], dtype=np.int64))
    if ends.size == 0:
        return []
    starts = np.concatenate([[0], ends[:-1]])
    on = np.zeros(ends.size, dtype=bool)
    for c_start, c_end, t_end in spans:
        on |= (starts < c_end) & (ends > c_start)  # overlaps the content
        on |= (starts >= c_end) & (ends <= t_end) & (ends > starts)  # inside the marker
    # zero-width tokens take the value of the last token with width (forward fill)
    has_width = ends > starts
    last = np.maximum.accumulate(np.where(has_width, np.arange(ends.size), 0))
    on = np.where(has_width, on, on[last] & has_width[last])
    return np.where(on, ids_arr, IGNORE_INDEX).tolist()


def tokenize_conversations(
    conversations: Sequence[Messages], tokenizer: Any, max_length: int
) -> tuple[dict[str, list[list[int]]], Counter]:
    """input_ids and labels (right-truncated to max_length); samples left with no trained token
    are skipped and counted as no_trainable_token ("truncated" counts the ones that were cut)."""
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"tokenizer {tokenizer.name_or_path!r}: uapt needs a fast tokenizer")
    out: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    counts: Counter = Counter()
    for lo in range(0, len(conversations), ENCODE_BATCH):
        rendered = [assistant_spans(m, tokenizer) for m in conversations[lo : lo + ENCODE_BATCH]]
        texts = [text for text, _ in rendered]
        encoded = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        for (_, spans), ids, offsets in zip(
            rendered, encoded["input_ids"], encoded["offset_mapping"], strict=True
        ):
            if any(end == turn_end for _, end, turn_end in spans):
                counts["no_end_marker"] += 1
            labels = token_labels(ids, offsets, spans)
            if len(ids) > max_length:
                counts["truncated"] += 1
                ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE_INDEX for label in labels):
                counts["no_trainable_token"] += 1
                continue
            out["input_ids"].append(ids)
            out["labels"].append(labels)
    return out, counts


# ----------------------------------------------------------------------------- datasets + cache
def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Identity of what tokenisation depends on: vocabulary, merges, specials, chat template."""
    h = hashlib.sha256()
    h.update(str(getattr(tokenizer, "name_or_path", "")).encode())
    h.update(str(tokenizer.chat_template or "").encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _cache_key(parts: Mapping[str, Any]) -> str:
    blob = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _features():
    from datasets import Features, List, Value

    return Features({"input_ids": List(Value("int32")), "labels": List(Value("int32"))})


def _tokenize_splits(
    splits: Mapping[str, Sequence[Messages]], tokenizer: Any, max_length: int
) -> tuple[Any, dict[str, int]]:
    from datasets import Dataset, DatasetDict

    counts: Counter = Counter()
    built = {}
    for name, conversations in splits.items():
        columns, c = tokenize_conversations(conversations, tokenizer, max_length)
        counts.update(c)
        built[name] = Dataset.from_dict(columns, features=_features())
    return DatasetDict(built), dict(counts)


def _cached_splits(
    folder: Path | None, splits: Mapping[str, Sequence[Messages]], tokenizer: Any, max_length: int
) -> tuple[Any, dict[str, int]]:
    """Tokenise, or load what an earlier run with the same inputs tokenised. An entry is
    published whole (staging folder, manifest written last); one whose files no longer match
    their manifest is set aside, named in a warning, and rebuilt."""
    import datasets

    if folder is None:
        return _tokenize_splits(splits, tokenizer, max_length)
    if (folder / files.MANIFEST).exists():
        problem = files.manifest_problem(folder)
        if problem is None:
            log.info("tokenised data: cache hit %s", folder)
            counts = files.read_json(folder / "counts.json")
            return datasets.load_from_disk(str(folder / "splits")), counts
        aside = files.set_aside(folder, problem)
        log.warning(
            "tokenised-data cache %s is damaged (%s); moved to %s, rebuilding",
            folder,
            problem,
            aside,
        )
    dsets, counts = _tokenize_splits(splits, tokenizer, max_length)
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        with files.staging_dir(folder, replace=False) as tmp:  # a concurrent run may win: fine
            # one shard per split: an empty split saved as zero shards would not load back
            dsets.save_to_disk(str(tmp / "splits"), num_shards=dict.fromkeys(dsets, 1))
            files.write_json(tmp / "counts.json", counts)
            files.write_manifest(tmp)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return datasets.load_from_disk(str(folder / "splits")), counts


def build_datasets(
    data_cfg: DatasetConfig, tokenizer: Any, seed: int, cache_dir: str | Path | None
) -> tuple[Any, Any, dict[str, Any]]:
    """(train, val, stats): HF datasets with input_ids and labels (-100 off assistant tokens).

    stats = {"train": n, "val": n, "truncated": k, "skipped": {reason: k, ...}}; cache_dir=None
    turns the tokenisation cache off.
    """
    cfg = _config(data_cfg)
    conversations, skipped = _conversations(cfg, seed)
    # arith generates num_train rows plus the held-out ones; elsewhere a fraction is of all rows
    n_val = _val_count(cfg.val_size, cfg.num_train or len(conversations))
    if conversations and n_val >= len(conversations):
        raise ConfigError(
            f"dataset.val_size={cfg.val_size!r} holds out {n_val} of {len(conversations)} "
            f"conversations from {cfg.source}, leaving none to train on"
        )
    splits = {"train": conversations[n_val:], "val": conversations[:n_val]}
    folder = None
    if cache_dir is not None:
        key = _cache_key(
            {
                "recipe": LABEL_RECIPE,
                "format": CACHE_FORMAT,
                "max_length": cfg.max_length,
                "tokenizer": tokenizer_fingerprint(tokenizer),
                "content": _content_hash(splits),
            }
        )
        folder = Path(cache_dir).expanduser() / "datasets" / f"{cfg.name}-{key}"
    dsets, counts = _cached_splits(folder, splits, tokenizer, cfg.max_length)
    truncated = counts.pop("truncated", 0)
    if counts.pop("no_end_marker", 0):
        log.warning(
            "the chat template closes assistant turns with no end-of-turn marker: "
            "the model will not learn to stop"
        )
    skipped.update(counts)
    stats = {
        "train": len(dsets["train"]),
        "val": len(dsets["val"]),
        "truncated": truncated,
        "skipped": {"empty_response": 0, "no_trainable_token": 0, **skipped},
    }
    _log_skipped(cfg, skipped)
    if stats["train"] == 0:
        raise DataError(
            f"dataset.source={cfg.source!r}: no training sample left after filtering "
            f"(skipped: {dict(skipped) or 'none'}; dataset.max_length={cfg.max_length})"
        )
    log.info(
        "data %s: %d train, %d val, %d truncated to %d tokens",
        cfg.name,
        stats["train"],
        stats["val"],
        truncated,
        cfg.max_length,
    )
    return dsets["train"], dsets["val"], stats


def _content_hash(splits: Mapping[str, Sequence[Messages]]) -> str:
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(json.dumps([name, splits[name]], ensure_ascii=False).encode())
    return h.hexdigest()


def _log_skipped(cfg: DatasetConfig, skipped: Mapping[str, int]) -> None:
    if any(skipped.values()):
        detail = ", ".join(f"{k}={v}" for k, v in sorted(skipped.items()) if v)
        log.warning("data %s: skipped samples (%s)", cfg.name, detail)


# ----------------------------------------------------------------------------- batches
def collate(batch: Sequence[Mapping[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad on the right: input_ids with pad_id, labels with -100; attention_mask 1 on tokens."""
    if not batch:
        raise ValueError("collate: empty batch")
    width = max(len(row["input_ids"]) for row in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, row in enumerate(batch):
        n = len(row["input_ids"])
        ids[i, :n] = torch.as_tensor(row["input_ids"], dtype=torch.long)
        labels[i, :n] = torch.as_tensor(row["labels"], dtype=torch.long)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
