"""The nll eval task: per-sample NLL through the output layer on labelled positions only, in
chunks (uapt.evaluation.nll), against the full-logits path it replaced (the model's own forward,
[batch, time, vocab] logits, cross-entropy over them), on the same rows and batches.

Measured: seconds per task on SmolLM2-135M-Instruct over the first IFEval GPT-4 responses (long
rows: the study's out-of-distribution NLL), interleaved after warm-up; the largest per-sample
difference between the two paths is reported beside. (Measured once against a float64
log-softmax of one row: the chunked path within 1.3e-7 nats, the full-logits path's batched
cross-entropy over a strided class dimension 1.4e-4 off; the chunked path gives every row the
same value in any batch.) Target: the chunked path at least 1.3x the full-logits samples/s.

    python benchmarks/nll_task.py                  # 32 responses, 3 rounds
    python benchmarks/nll_task.py --quick --json /tmp/nll.json   # tiny model, 8 responses
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    REPO,
    Spread,
    compose,
    contention_note,
    fmt_spread,
    interleave,
    load_average,
    log,
    machine_info,
    parser,
    ratio_summary,
    set_threads,
    setup_env,
    table,
    write_json,
)

DATA = REPO.parent / "shared" / "data" / "ifeval" / "gpt4_responses.jsonl"
TARGET = 1.3


@torch.no_grad()
def full_logits_nll(model: Any, rows: list, pad_id: int) -> dict[int, float]:
    """The replaced path: the model's logits for every position, cross-entropy over them."""
    from uapt.data import IGNORE_INDEX
    from uapt.evaluation import nll

    out = {}
    for batch in nll.batches(rows):
        ids, labels, mask = nll._padded(batch, pad_id)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        target = labels[:, 1:]
        token_nll = F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), target, reduction="none"
        )
        counts = (target != IGNORE_INDEX).sum(1)
        for (doc_id, _, _), total, count in zip(batch, token_nll.sum(1), counts, strict=True):
            out[doc_id] = float(total) / int(count)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=None, help="responses (default 32, quick 8)")
    args = p.parse_args(argv)
    setup_env()
    set_threads(args.threads)
    from uapt.evaluation import nll
    from uapt.models import load_model, load_tokenizer
    from uapt.sections import ModelConfig, TaskSpec

    samples = args.samples or (8 if args.quick else 32)
    rounds = args.rounds or (1 if args.quick else 3)
    cfg = compose([f"model={'tiny' if args.quick else 'smollm2_135m'}"])  # quick: a smoke test
    model_cfg = ModelConfig.parse(cfg["model"])
    tokenizer = load_tokenizer(model_cfg, cfg["cache_dir"])
    model = load_model(model_cfg, tokenizer, cfg["cache_dir"], torch.device("cpu")).eval()
    spec = TaskSpec.parse(
        {
            "name": "ifeval_nll",
            "task": "nll",
            "data_files": str(DATA),
            "limit": samples,
            "max_length": 512,
        },
        "eval.tasks[0]",
    )
    rows = nll.encode(nll.read_rows(spec), tokenizer, 512)
    pad = tokenizer.pad_token_id
    tokens = sum(len(ids) for _, ids, _ in rows)
    log(f"nll_task: {samples} responses ({tokens} tokens), 1 warm-up + {rounds} rounds")
    load_before = load_average()
    runners = {
        "chunked": lambda: nll.sample_nll(model, rows, pad, "cpu"),
        "full_logits": lambda: full_logits_nll(model, rows, pad),
    }
    times = interleave(runners, rounds, warmup=1)
    a, b = runners["chunked"](), runners["full_logits"]()
    gap = max(abs(a[k] - b[k]) for k in a)
    speedup = ratio_summary(times["full_logits"], times["chunked"], TARGET, True)
    payload = {
        "benchmark": "nll_task",
        "model": model_cfg.name,
        "quick": args.quick,
        "machine": machine_info("cpu"),
        "samples": samples,
        "tokens": tokens,
        "seconds": times,
        "max_abs_difference": gap,
        "speedup": speedup,
        "load_average_after": load_average(),
    }
    payload["contention"] = contention_note(load_before, payload["load_average_after"])
    print(render(payload))
    write_json(args.json, payload)
    return payload


def render(payload: dict[str, Any]) -> str:
    n = payload["samples"]
    rows = [
        [
            name,
            fmt_spread(Spread.of(payload["seconds"][name]).as_dict()),
            f"{n / Spread.of(payload['seconds'][name]).median:.2f}",
        ]
        for name in ("full_logits", "chunked")
    ]
    lines = [
        table(["path", "seconds per task", "samples/s"], rows),
        f"chunked / full-logits samples/s: {fmt_spread(payload['speedup'])} "
        f"(target >= {TARGET}: {'met' if payload['speedup']['met'] else 'not met'}); largest "
        f"per-sample difference {payload['max_abs_difference']:.2e} nats",
    ]
    if payload["contention"]:
        lines.append(payload["contention"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
