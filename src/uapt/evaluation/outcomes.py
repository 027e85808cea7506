"""Per-sample evaluation outcomes: what a table needs to tell an effect from noise.

Every evaluation of a run leaves `<run>/eval_outcomes.jsonl`: one line per (task, metric,
sample) with the sample's outcome as lm-eval scored it,

    {"task": "arith", "metric": "exact_match,strict-match", "doc_id": 17, "value": 1.0}
    {"task": "ifeval", "metric": "inst_level_strict_acc", "doc_id": 3, "value": [1.0, 0.0]}

a number, or a list for metrics that score several items per sample (IFEval's instruction-level
accuracy). The metric over a set of samples is `aggregate`: the mean of the numbers, or of all
the lists' items pooled (lm-eval's own aggregation for both). Only metrics whose aggregate over
all samples reproduces lm-eval's reported value are kept (others, e.g. perplexity or BLEU, are
not means of per-sample numbers); the table bootstraps over these samples.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from uapt import files

FILE = "eval_outcomes.jsonl"
BASE_FILE = "eval_base_outcomes.jsonl"  # the base model's, on the same samples (a table's `base`)
Value = float | list[float]


def _as_value(raw: Any) -> Value | None:
    if isinstance(raw, bool | int | float):
        return float(raw)
    if isinstance(raw, list | tuple) and all(isinstance(x, bool | int | float) for x in raw):
        return [float(x) for x in raw]
    return None


def aggregate(values: Iterable[Value]) -> float | None:
    """The metric over samples: mean of numbers, or pooled mean of list items."""
    total = count = 0.0
    for v in values:
        if isinstance(v, list):
            total, count = total + sum(v), count + len(v)
        else:
            total, count = total + v, count + 1
    return total / count if count else None


def from_samples(
    samples: Mapping[str, Sequence[Mapping[str, Any]]],
    scores: Mapping[str, Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[str]]:
    """Outcome lines from lm-eval's logged samples, and the "task/metric" names dropped because
    their per-sample values do not aggregate to lm-eval's score."""
    lines: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for task, rows in samples.items():
        for row in rows:
            filt = row.get("filter", "none")
            for metric in row.get("metrics", []):
                value = _as_value(row.get(metric))
                if value is None:
                    continue
                name = metric if filt == "none" else f"{metric},{filt}"
                lines[task, name].append(
                    {"task": task, "metric": name, "doc_id": row.get("doc_id"), "value": value}
                )
    kept, dropped = [], []
    for (task, name), group in lines.items():
        reported = (scores.get(task) or {}).get(name)
        mean = aggregate(line["value"] for line in group)
        if reported is not None and mean is not None and math.isclose(mean, reported, abs_tol=1e-9):
            kept.extend(group)
        else:
            dropped.append(f"{task}/{name}")
    return kept, sorted(dropped)


def write(folder: Path, lines: Sequence[Mapping[str, Any]], name: str = FILE) -> None:
    files.write_text(Path(folder) / name, "".join(json.dumps(line) + "\n" for line in lines))


def read_lines(folder: Path, name: str = FILE) -> list[dict[str, Any]] | None:
    """The outcome lines of `<folder>/<name>` as written; None when there is no such file
    (records made before outcomes were kept). A damaged file raises DamagedFile."""
    path = Path(folder) / name
    if not path.exists():
        return None
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise files.DamagedFile(path, f"not UTF-8 (byte {e.start})") from None
    lines = []
    for lineno, line in enumerate(text.splitlines(), 1):
        try:
            row = json.loads(line)
            lines.append({k: row[k] for k in ("task", "metric", "doc_id", "value")})
        except (ValueError, KeyError, TypeError):
            raise files.DamagedFile(path, f"line {lineno} is not an outcome") from None
    return lines


def read(folder: Path, name: str = FILE) -> dict[tuple[str, str], dict[Any, Value]] | None:
    """{(task, metric): {doc_id: value}} of a run folder's outcomes (the run's own, or with
    name=BASE_FILE the base model's); None when there is no such file. A damaged file raises
    DamagedFile."""
    lines = read_lines(folder, name)
    if lines is None:
        return None
    out: dict[tuple[str, str], dict[Any, Value]] = defaultdict(dict)
    for row in lines:
        out[row["task"], row["metric"]][row["doc_id"]] = row["value"]
    return dict(out)
