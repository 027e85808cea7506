"""uapt's own forward-only task: the teacher-forced NLL of reference responses, sample by sample.

    - name: gsm8k_nll                 # a task of a suite (conf/eval/<suite>.yaml)
      task: nll
      data_files: ../shared/data/gsm8k/test.jsonl
      prompt_field: question
      response_field: answer
      limit: 256                      # the file's first rows
      max_length: 384                 # tokens of a rendered row, cut from the right

Every row (a prompt and its reference response) is rendered with the tokenizer's chat template
and labelled exactly as a training row is (uapt.data: the assistant's tokens and the end-of-turn
marker that closes them), so on held-out rows of the training task this is the training loss on
data no run saw, and on another task's reference responses it measures how much of that
distribution a run kept. It needs no generation and has no floor.

A sample's outcome is its mean NLL per labelled token (nats); the task's `nll` is the mean of the
outcomes over samples (each response weighs the same, whatever its length), so the table's paired
bootstrap resamples responses (uapt.evaluation.outcomes). Lower is better.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from uapt.data import IGNORE_INDEX, DataError, tokenize_conversations
from uapt.sections.eval import TaskSpec

log = logging.getLogger("uapt.evaluation")

METRIC = "nll"
VERSION = "uapt-nll-1"  # bump when what a sample's value means changes
DEFAULT_FIELDS = ("prompt", "response")
DEFAULT_MAX_LENGTH = 1024
TOKENS_PER_BATCH = 4096  # logits of one forward: 4096 x vocab floats (about 800 MB at 49k)

Row = tuple[int, list[int], list[int]]  # (doc id, input ids, labels)


def read_rows(spec: TaskSpec) -> list[tuple[int, str, str]]:
    """(doc id, prompt, response) for the task's rows: the file's first `limit` rows; the doc id
    is the row's index in the file."""
    path = Path(spec.data_files)
    prompt_key = spec.prompt_field or DEFAULT_FIELDS[0]
    response_key = spec.response_field or DEFAULT_FIELDS[1]
    raw = list(_records(path))
    keep = _limit(len(raw), spec.limit)
    rows = []
    for doc_id, (where, record) in enumerate(raw[:keep]):
        fields = []
        for key, option in ((prompt_key, "prompt_field"), (response_key, "response_field")):
            value = record.get(key) if isinstance(record, dict) else None
            if not isinstance(value, str) or not value.strip():
                has = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(
                    f"{where}: {spec.name} needs a non-empty string field {key!r} "
                    f"(eval.tasks[].{option}); the row has: {has}"
                )
            fields.append(value)
        rows.append((doc_id, *fields))
    return rows


def _records(path: Path) -> Iterator[tuple[str, Any]]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records")
        yield from ((f"{path} row {i}", row) for i, row in enumerate(data))
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON line ({e.msg})") from None


def _limit(n: int, limit: int | float | None) -> int:
    """lm-eval's rule: an int is a count, a float a fraction of the rows (rounded up)."""
    if limit is None:
        return n
    return min(n, math.ceil(n * limit) if isinstance(limit, float) else int(limit))


def encode(
    rows: Sequence[tuple[int, str, str]],
    tokenizer: Any,
    max_length: int,
    system: str | None = None,
) -> list[Row]:
    """Each row as the training data would tokenise it (chat template, labels on the response,
    the suite's system instruction first when it has one). A row whose prompt fills max_length
    has no response token to score: it is left out, as training leaves it out, and named in a
    warning (the same rows for every model with this tokenizer, so comparisons stay paired)."""
    out = []
    head = [{"role": "system", "content": system}] if system else []
    for doc_id, prompt, response in rows:
        messages = [
            *head,
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
        columns, _ = tokenize_conversations([messages], tokenizer, max_length)
        if columns["input_ids"]:
            out.append((doc_id, columns["input_ids"][0], columns["labels"][0]))
    left_out = [doc_id for doc_id, _, _ in rows if doc_id not in {r[0] for r in out}]
    if left_out:
        log.warning(
            "nll: %d of %d rows have no response token within max_length=%d tokens and are "
            "left out (doc ids %s)",
            len(left_out),
            len(rows),
            max_length,
            ", ".join(map(str, left_out[:10])) + (", ..." if len(left_out) > 10 else ""),
        )
    return out


def batches(rows: Sequence[Row], tokens: int = TOKENS_PER_BATCH) -> Iterator[list[Row]]:
    """Rows longest first, grouped so that a batch's padded size stays within `tokens`."""
    ordered = sorted(rows, key=lambda r: (-len(r[1]), r[0]))
    batch: list[Row] = []
    for row in ordered:
        if batch and len(batch[0][1]) * (len(batch) + 1) > tokens:
            yield batch
            batch = []
        batch.append(row)
    if batch:
        yield batch


@torch.no_grad()
def sample_nll(model: torch.nn.Module, rows: Sequence[Row], pad_id: int, device: Any) -> dict:
    """{doc id: mean NLL per labelled token} of every row, in batches padded on the right.

    The model runs to its final hidden states only; the output layer (uapt.objectives.head, with
    any logit softcapping) is applied to the labelled positions alone, CHUNK at a time: full
    [batch, time, vocab] logits would be most of the memory traffic (measured: benchmarks/
    nll_task.py)."""
    from uapt.models import hidden_states
    from uapt.objectives.head import output_head

    was_training = model.training
    model.eval()
    head = output_head(model)
    out: dict[int, float] = {}
    try:
        for batch in batches(rows):
            ids, labels, mask = _padded(batch, pad_id)
            hidden = hidden_states(model, ids.to(device), mask.to(device))
            target = labels[:, 1:].to(device)  # the state at t predicts the label at t + 1
            keep = target != IGNORE_INDEX
            token_nll = _token_nll(head, hidden[:, :-1][keep], target[keep])
            row_of = keep.nonzero()[:, 0]
            totals = torch.zeros(len(batch), dtype=token_nll.dtype, device=token_nll.device)
            totals.index_add_(0, row_of, token_nll)
            counts = keep.sum(1)
            for (doc_id, _, _), total, count in zip(
                batch, totals.tolist(), counts.tolist(), strict=True
            ):
                out[doc_id] = total / count
    finally:
        model.train(was_training)
    return out


CHUNK = 1024  # labelled positions whose logits are held at once


def _token_nll(head: Any, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log p(target) per position from hidden states [N, H], CHUNK positions at a time."""
    parts = []
    for lo in range(0, len(target), CHUNK):
        logits = head.logits(hidden[lo : lo + CHUNK])
        picked = logits.gather(1, target[lo : lo + CHUNK, None])[:, 0]
        parts.append(torch.logsumexp(logits, dim=1) - picked)
    return torch.cat(parts) if parts else hidden.new_zeros(0)


def _padded(batch: Sequence[Row], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = len(batch[0][1])
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (_, row_ids, row_labels) in enumerate(batch):
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        labels[i, : len(row_labels)] = torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return ids, labels, mask


def evaluate(
    spec: TaskSpec,
    model: torch.nn.Module,
    tokenizer: Any,
    device: Any,
    system: str | None = None,
) -> dict[str, Any]:
    """The task on a model: {"scores", "outcomes", "n_samples"} in the shapes evaluate_lm keeps
    for lm-eval's tasks (scores {"nll", "nll_stderr"}; one outcome line per sample)."""
    max_length = spec.max_length or DEFAULT_MAX_LENGTH
    read = read_rows(spec)
    rows = encode(read, tokenizer, max_length, system)
    if not rows:
        raise DataError(
            f"{spec.data_files}: none of the {len(read)} rows of task {spec.name} has a response "
            f"token within max_length={max_length} tokens (eval.tasks[].max_length)"
        )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    values = sample_nll(model, rows, pad_id, device)
    ordered = [values[doc_id] for doc_id, _, _ in rows]
    n = len(ordered)
    mean = sum(ordered) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in ordered) / (n - 1)) if n > 1 else math.nan
    stderr = sd / math.sqrt(n) if n > 1 else None
    lines = [
        {"task": spec.name, "metric": METRIC, "doc_id": doc_id, "value": values[doc_id]}
        for doc_id, _, _ in rows
    ]
    return {
        "scores": {METRIC: mean, f"{METRIC}_stderr": stderr},
        "outcomes": lines,
        "n_samples": {"original": len(read), "effective": n},
    }
