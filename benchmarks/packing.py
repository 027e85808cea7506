"""Useful tokens per second: packed vs padded micro-batches, token-budget batching, compiled step.

Same model (the same initial weights), same rows, uapt's own `Trainer.train_step`, steps
interleaved A, B, A, B, ... after warm-up; ratios per round (paired).

- **Packing.** A micro-batch is padded to its longest row, and the model computes the padding and
  throws it away. `trainer.packing=true` runs the rows as one sequence without it (the numbers are
  the same: tests/test_packing.py). Measured: assistant tokens/s (the tokens trained on) packed /
  padded, SmolLM2-135M-Instruct on real GSM8K rows (../shared/data or UAPT_DATA), micro-batch 8,
  mle and masked_mle_distill; target >= 1.3. Reported beside it: the padding fraction of the
  padded run, and packed + `trainer.max_tokens_per_micro_batch` (the same global batch split by a
  token budget).
- **Compile.** `trainer.compile=true` (torch.compile of each decoder layer) vs eager, step time
  after the compile (its one-off cost reported apart), tiny model and SmolLM2 on the same rows,
  packed; target <= 0.8.

    python benchmarks/packing.py                    # SmolLM2 (+ tiny for compile)
    python benchmarks/packing.py --quick --json /tmp/packing.json
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

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
    uapt_trainer,
    write_json,
)

PACKING_TARGET = 1.3
COMPILE_TARGET = 0.8
OBJECTIVES = ("mle", "masked_mle_distill")


def data_dir() -> Path:
    return Path(os.environ.get("UAPT_DATA") or REPO.parent / "shared" / "data")


def gsm8k_overrides(model: str) -> list[str]:
    source = data_dir() / "gsm8k" / "train.jsonl"
    if model == "tiny":  # the tiny tokenizer splits GSM8K text into many more tokens
        return ["dataset=arith", "dataset.num_train=256", "dataset.val_size=16"]
    return [
        "dataset=gsm8k",
        f"dataset.source={source}",
        "dataset.val_size=16",
        "dataset.max_length=384",
    ]


def loop_for(model: str, objective: str, extra: list[str]):
    cfg = compose(
        [
            f"model={model}",
            *gsm8k_overrides(model),
            "logger=none",
            f"objective={objective}",
            "trainer.batch_size=8",
            "trainer.micro_batch_size=8",
            "trainer.lr=1e-5",
            *extra,
        ]
    )
    return uapt_trainer(cfg, parallel=True)[0]  # parallelize applies trainer.compile


def measure_packing(model: str, warmup: int, rounds: int, budget: int | None) -> list[dict]:
    results = []
    for objective in OBJECTIVES:
        variants = {
            "padded": ["trainer.packing=false", "trainer.compile=false"],
            "packed": ["trainer.packing=true", "trainer.compile=false"],
        }
        if budget:
            variants["packed_budget"] = [
                *variants["packed"],
                f"trainer.max_tokens_per_micro_batch={budget}",
            ]
        loops = {name: loop_for(model, objective, extra) for name, extra in variants.items()}
        metrics: dict[str, list[dict[str, float]]] = {name: [] for name in loops}
        times = interleave(
            {name: _recorder(loops[name], metrics[name]) for name in loops}, rounds, warmup
        )
        speed = {
            name: [m["assistant_tokens_per_s"] for m in rows[warmup:]]
            for name, rows in metrics.items()
        }
        results.append(
            {
                "model": model,
                "objective": objective,
                "micro_batch_size": 8,
                "token_budget": budget,
                "warmup_steps": warmup,
                "rounds": rounds,
                "step_s": times,
                "assistant_tokens_per_s": speed,
                "pad_frac": {
                    name: statistics.mean(m["pad_frac"] for m in rows[warmup:])
                    for name, rows in metrics.items()
                },
                "micro_batches_per_step": {
                    name: len(loops[name].stream.layout(loops[name].stream.step_rows(0))[0])
                    for name in loops
                },
                "loss_max_rel_diff": _loss_diff(metrics),
                "ratio": ratio_summary(speed["packed"], speed["padded"], PACKING_TARGET, True),
                "ratio_budget": (
                    ratio_summary(speed["packed_budget"], speed["padded"], None, True)
                    if budget
                    else None
                ),
            }
        )
    return results


def _recorder(loop: Any, rows: list[dict[str, float]]):
    return lambda: rows.append(loop.train_step())


def _loss_diff(metrics: dict[str, list[dict[str, float]]]) -> float:
    """Largest relative difference of the step losses to the padded run's (the same numbers)."""
    base = [m["loss"] for m in metrics["padded"]]
    return max(
        abs(m["loss"] - b) / abs(b)
        for rows in metrics.values()
        for m, b in zip(rows, base, strict=True)
    )


def measure_compile(model: str, warmup: int, rounds: int) -> dict[str, Any]:
    loops, setup = {}, {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        started = time.perf_counter()
        loops[name] = loop_for(model, "mle", ["trainer.packing=true", f"trainer.compile={flag}"])
        setup[name] = time.perf_counter() - started
    first, losses = {}, {name: [] for name in loops}
    for name, loop in loops.items():  # the first step compiles (dynamic shapes: once)
        started = time.perf_counter()
        losses[name].append(loop.train_step()["loss"])
        first[name] = time.perf_counter() - started

    def stepper(name: str):
        return lambda: losses[name].append(loops[name].train_step()["loss"])

    times = interleave({name: stepper(name) for name in loops}, rounds, warmup)
    return {
        "model": model,
        "warmup_steps": warmup + 1,
        "rounds": rounds,
        "first_step_s": first,
        "compile_s": first["compiled"] - first["eager"],
        "step_s": times,
        # the same steps eager and compiled: kernels fused differently, the same numbers
        "loss_max_rel_diff": max(
            abs(c - e) / abs(e) for c, e in zip(losses["compiled"], losses["eager"], strict=True)
        ),
        "ratio": ratio_summary(times["compiled"], times["eager"], COMPILE_TARGET, False),
    }


FULL = {
    "packing": ("smollm2_135m", 1, 4, 1600),
    "compile": [("tiny", 2, 10), ("smollm2_135m", 1, 3)],
}
QUICK = {"packing": ("tiny", 1, 2, 600), "compile": [("tiny", 1, 2)]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--no-compile", action="store_true", help="skip the compile measurement")
    args = p.parse_args(argv)
    setup_env()
    set_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    load_before = load_average()
    model, warmup, rounds, budget = sizes["packing"]
    log(f"packing: {model}, {warmup} warm-up + {args.rounds or rounds} rounds per variant")
    packing = measure_packing(model, warmup, args.rounds or rounds, budget)
    compiled = []
    if not args.no_compile:
        for model, warmup, rounds in sizes["compile"]:
            log(f"compile: {model}, {warmup} warm-up + {args.rounds or rounds} rounds")
            compiled.append(measure_compile(model, warmup, args.rounds or rounds))
    payload = {
        "benchmark": "packing",
        "quick": args.quick,
        "machine": machine_info("cpu"),
        "load_average_after": load_average(),
        "packing": packing,
        "compile": compiled,
    }
    payload["contention"] = contention_note(load_before, payload["load_average_after"])
    print(render(payload))
    write_json(args.json, payload)
    return payload


def render(payload: dict[str, Any]) -> str:
    rows = []
    for r in payload["packing"]:
        speed = r["assistant_tokens_per_s"]
        rows.append(
            [
                r["model"],
                r["objective"],
                f"{r['pad_frac']['padded']:.0%}",
                fmt_spread(Spread.of(speed["padded"]).as_dict()),
                fmt_spread(Spread.of(speed["packed"]).as_dict()),
                fmt_spread(r["ratio"]),
                fmt_spread(r["ratio_budget"]) if r["ratio_budget"] else "—",
            ]
        )
    headers = [
        "model",
        "objective",
        "padding (padded)",
        "padded asst tok/s",
        "packed asst tok/s",
        "packed / padded",
        "packed + budget / padded",
    ]
    lines = [table(headers, rows)]
    crows = [
        [
            c["model"],
            f"{c['compile_s']:.0f} s",
            fmt_spread(Spread.of(c["step_s"]["eager"]).as_dict()),
            fmt_spread(Spread.of(c["step_s"]["compiled"]).as_dict()),
            fmt_spread(c["ratio"]),
        ]
        for c in payload["compile"]
    ]
    if crows:
        lines.append(
            table(
                ["model", "compile (once)", "eager step s", "compiled step s", "compiled / eager"],
                crows,
            )
        )
    if payload["contention"]:
        lines.append(payload["contention"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
