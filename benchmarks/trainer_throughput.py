"""Plain-MLE training throughput: uapt's loop vs transformers.Trainer on the same model and data.

Both sides train the same initial weights (uapt.train.build, seeded) on the same batches: the
transformers side reads the rows of uapt's data stream in uapt's order (sequential sampler) and
pads them with uapt's own `collate`. Same batch size, AdamW (torch's, `optim=adamw_torch`), same
lr / betas / weight decay / clipping, fp32, no evaluation, no saving, logging off,
dataloader_num_workers=0, report_to none.

Timing is interleaved by blocks of K steps: uapt K steps, transformers K steps (one
`Trainer.train()` over the block's rows), uapt, transformers, ... after a warm-up block each.
A step's time is the time between consecutive ends of steps (data loading, forward, backward,
clipping, optimizer, bookkeeping), so the first step of a block (transformers builds its
dataloader there) is not counted, on both sides. Target: uapt tokens/s >= 1.0x transformers.

    python benchmarks/trainer_throughput.py                  # tiny + SmolLM2-135M-Instruct
    python benchmarks/trainer_throughput.py --quick --json /tmp/throughput.json
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Spread,
    compose,
    contention_note,
    fmt_spread,
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

TARGET = 1.0
# Sizes per model: (overrides, steps per block, timed rounds).
FULL = {
    "tiny": ([], 12, 6),
    "smollm2_135m": (["trainer.batch_size=4", "trainer.micro_batch_size=4"], 2, 5),
}
QUICK = {
    "tiny": (
        [
            "dataset.num_train=64",
            "dataset.val_size=16",
            "trainer.batch_size=4",
            "trainer.micro_batch_size=4",
        ],
        3,
        2,
    ),
}


def run_overrides(model: str, extra: list[str]) -> list[str]:
    return [f"model={model}", "dataset=arith", "objective=mle", "logger=none", *extra]


def uapt_loop(cfg: dict[str, Any]):
    """uapt's Trainer with its pieces (common.uapt_trainer), without gradient accumulation."""
    trainer, parts = uapt_trainer(cfg)
    if trainer.config.accumulation(1) != 1:
        raise ValueError("trainer_throughput compares without gradient accumulation")
    return trainer, parts


def stream_rows(stream, batches: range) -> list[dict[str, list[int]]]:
    """The rows of uapt's micro-batches, unpadded, in uapt's order (collate pads on the right)."""
    rows = []
    for k in batches:
        batch = stream.micro_batch(k)
        for ids, labels, mask in zip(
            batch["input_ids"], batch["labels"], batch["attention_mask"], strict=True
        ):
            n = int(mask.sum())
            rows.append({"input_ids": ids[:n].tolist(), "labels": labels[:n].tolist()})
    return rows


class StepClock:
    """A transformers callback noting the time at the end of every optimizer step (on CUDA once
    the step's kernels are done)."""

    def __new__(cls, device):
        import torch
        from transformers import TrainerCallback

        class _Clock(TrainerCallback):
            def __init__(self) -> None:
                self.ends: list[float] = []

            def on_step_end(self, args, state, control, **kwargs):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                self.ends.append(time.perf_counter())

        return _Clock()


def hf_trainer(cfg: dict[str, Any], model, pad_id: int, steps: int, out_dir: str, device):
    """transformers.Trainer with uapt's optimisation settings (cfg["trainer"]: AdamW, lr, betas,
    decay, clipping, warm-up, cosine, bf16 autocast for trainer.precision=bf16), rows padded by
    uapt's collate, no eval, saving or logging; the data is set per block (train_dataset)."""
    from transformers import PrinterCallback, Trainer, TrainingArguments

    from uapt.data import collate

    t = cfg["trainer"]
    args = TrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=t["micro_batch_size"],
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=t["lr"],
        weight_decay=t["weight_decay"],
        adam_beta1=t["betas"][0],
        adam_beta2=t["betas"][1],
        max_grad_norm=t["grad_clip"],
        warmup_steps=t["warmup_steps"],
        lr_scheduler_type="cosine",
        optim="adamw_torch",
        bf16=t["precision"] == "bf16",
        fp16=False,
        eval_strategy="no",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
        train_sampling_strategy="sequential",
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=device.type == "cpu",
        seed=cfg["seed"],
    )
    clock = StepClock(device)
    trainer = Trainer(
        model=model,
        args=args,
        data_collator=lambda rows: collate(rows, pad_id),
        callbacks=[clock],
    )
    trainer.remove_callback(PrinterCallback)  # it prints train()'s summary to stdout
    return trainer, clock


def measure(model_name: str, extra: list[str], block: int, rounds: int) -> dict[str, Any]:
    cfg = compose(run_overrides(model_name, extra))
    loop, _ = uapt_loop(cfg)
    _, hf_parts = uapt_loop(cfg)  # same seed: the same initial weights, a separate copy
    pad = hf_parts.tokenizer.pad_token_id
    n = cfg["trainer"]["micro_batch_size"]
    with tempfile.TemporaryDirectory(prefix="uapt-bench-hf-") as out_dir:
        trainer, clock = hf_trainer(cfg, hf_parts.model, pad, block, out_dir, loop.device)
        times: dict[str, list[float]] = {"uapt": [], "transformers": []}
        tokens: list[int] = []
        for r in range(rounds + 1):  # block 0 is the warm-up of both sides
            batches = range(r * block, (r + 1) * block)
            rows = stream_rows(loop.stream, batches)
            ends = [time.perf_counter()]
            for _ in batches:
                loop.train_step()
                ends.append(time.perf_counter())
            uapt_s = ends[-1] - ends[1]  # steps 2..K of the block
            clock.ends.clear()
            trainer.train_dataset = rows
            trainer.train()
            if len(clock.ends) != block:
                raise RuntimeError(f"transformers ran {len(clock.ends)} steps, expected {block}")
            if r:
                times["uapt"].append(uapt_s)
                times["transformers"].append(clock.ends[-1] - clock.ends[0])
                tokens.append(_tokens(rows[n:]))  # the rows of steps 2..K
    tps = {
        side: [tok / s for tok, s in zip(tokens, values, strict=True)]
        for side, values in times.items()
    }
    return {
        "model": model_name,
        "device": str(loop.device),
        "overrides": extra,
        "batch_size": n,
        "steps_per_block": block,
        "timed_steps_per_block": block - 1,
        "rounds": rounds,
        "tokens_per_block": tokens,
        "block_s": times,
        "tokens_per_s": tps,
        "ratio": ratio_summary(tps["uapt"], tps["transformers"], TARGET, True),
    }


def _tokens(rows: list[dict[str, list[int]]]) -> int:
    return sum(len(r["input_ids"]) for r in rows)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--models", default=None, help="comma-separated model configs")
    p.add_argument("--block", type=int, default=None, help="steps per block (>= 2)")
    args = p.parse_args(argv)
    if args.block is not None and args.block < 2:
        p.error("--block: at least 2 (the first step of a block is not timed)")
    setup_env()
    set_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    models = args.models.split(",") if args.models else list(sizes)
    load_before = load_average()
    results = []
    for model in models:
        extra, block, rounds = sizes.get(model, FULL.get(model, ([], 3, 3)))
        rounds, block = args.rounds or rounds, args.block or block
        log(f"trainer_throughput: {model}, {rounds} rounds of {block}-step blocks per side")
        results.append(measure(model, extra, block, rounds))
    payload = {
        "benchmark": "trainer_throughput",
        "quick": args.quick,
        "machine": machine_info(results[-1]["device"]),
        "load_average_after": load_average(),
        "results": results,
    }
    payload["contention"] = contention_note(load_before, payload["load_average_after"])
    print(render(payload))
    write_json(args.json, payload)
    return payload


def render(payload: dict[str, Any]) -> str:
    rows = [
        [
            r["model"],
            fmt_spread(Spread.of(r["tokens_per_s"]["uapt"]).as_dict()),
            fmt_spread(Spread.of(r["tokens_per_s"]["transformers"]).as_dict()),
            fmt_spread(r["ratio"]),
            f">= {TARGET}",
            r["ratio"]["met"],
        ]
        for r in payload["results"]
    ]
    headers = ["model", "uapt tokens/s", "transformers tokens/s", "ratio", "target", ""]
    lines = [table(headers, rows)]
    if payload["contention"]:
        lines.append(payload["contention"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
