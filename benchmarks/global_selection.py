"""Selection over the global batch: what the scoring pass costs when a group spans micro-batches.

`objective.scope=batch` ranks tokens over the whole global batch (`scope_size: null`). When the
global batch is split into micro-batches (or ranks), every token must be scored before any
micro-batch's loss: the loop runs one no-grad forward per micro-batch first (uapt.batches).
Measured here: optimizer-step time with that pass ("global": scope_size null) over the same step
with groups that each micro-batch holds whole ("in forward": scope_size = micro-batch size, no
extra pass), same batches, same accumulation (2 micro-batches per step), uapt's
`Trainer.train_step` interleaved after warm-up. Ideal cost: one forward on a step of about three
forward-equivalents, ~1.33x for select=nll; for rho1 (select=excess) the teacher's forward moves
into the scoring pass, so ~1.25x. No target: the figure is what the choice costs.

    python benchmarks/global_selection.py                  # tiny + SmolLM2-135M-Instruct
    python benchmarks/global_selection.py --quick --json /tmp/selection.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
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

OBJECTIVES = {
    "masked_mle (select nll)": ["objective=masked_mle", "objective.scope=batch"],
    "rho1 (select excess)": ["objective=rho1"],
}
# Sizes per model: (global batch, warm-up steps, timed rounds); micro-batch = half the batch.
FULL = {"tiny": (8, 2, 12), "smollm2_135m": (8, 1, 4)}
QUICK = {"tiny": (4, 1, 2)}


def loop_for(model: str, objective: list[str], batch: int, scope_size: int | None):
    size = "null" if scope_size is None else str(scope_size)
    cfg = compose(
        [
            f"model={model}",
            "dataset=arith",
            "logger=none",
            *objective,
            f"objective.scope_size={size}",
            f"trainer.batch_size={batch}",
            f"trainer.micro_batch_size={batch // 2}",
        ]
    )
    return uapt_trainer(cfg)[0]


def measure(model: str, batch: int, warmup: int, rounds: int) -> tuple[list[dict], str]:
    results, device = [], "cpu"
    for name, objective in OBJECTIVES.items():
        loops = {
            "global": loop_for(model, objective, batch, None),
            "in_forward": loop_for(model, objective, batch, batch // 2),
        }
        device = str(loops["global"].device)
        times = interleave({k: loop.train_step for k, loop in loops.items()}, rounds, warmup)
        results.append(
            {
                "model": model,
                "objective": name,
                "batch_size": batch,
                "micro_batch_size": batch // 2,
                "warmup_steps": warmup,
                "rounds": rounds,
                "step_s": times,
                "ratio": ratio_summary(times["global"], times["in_forward"], None, False),
            }
        )
    return results, device


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--models", default=None, help="comma-separated model configs")
    args = p.parse_args(argv)
    setup_env()
    set_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    models = args.models.split(",") if args.models else list(sizes)
    load_before = load_average()
    results, device = [], "cpu"
    for model in models:
        batch, warmup, rounds = sizes.get(model, FULL.get(model, (8, 1, 3)))
        rounds = args.rounds or rounds
        log(f"global_selection: {model}, {warmup} warm-up + {rounds} rounds of train_step")
        found, device = measure(model, batch, warmup, rounds)
        results += found
    payload = {
        "benchmark": "global_selection",
        "quick": args.quick,
        "machine": machine_info(device),
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
            r["objective"],
            fmt_spread(Spread.of(r["step_s"]["in_forward"]).as_dict()),
            fmt_spread(Spread.of(r["step_s"]["global"]).as_dict()),
            fmt_spread(r["ratio"]),
        ]
        for r in payload["results"]
    ]
    headers = ["model", "objective", "in-forward step s", "global step s", "global / in-forward"]
    lines = [table(headers, rows)]
    if payload["contention"]:
        lines.append(payload["contention"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
