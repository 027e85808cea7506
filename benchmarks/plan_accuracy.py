"""The plan's CPU figures, and its predicted training time against measured runs.

1. Peak: the rate of an fp32 matrix product (n x n by n x n, 2n^3 FLOPs; the fastest of 8 in a
   round) on the benchmark's threads: the `cpu` row's peak in uapt.devices.
2. MFU: SmolLM2-135M-Instruct's training step (uapt's Trainer.train_step, mle, packed rows of
   real GSM8K training data) as FLOPs per second over the peak, its FLOPs counted by the plan's
   own cost model (uapt.costs.train_cost) for exactly the rows of each timed step. Peak and step
   are timed interleaved (peak, step, peak, step, ...) and the MFU is taken per round.
3. Accuracy: whole `uapt-train` runs (the tiny model on arith, SmolLM2 on GSM8K rows), each
   planned with this run's peak and MFU (uapt.plan, plan.device=cpu) and timed from its record:
   the training loop's seconds, train_s - setup_s (uapt.train). The factor measured / predicted
   is reported per round; runs are interleaved (tiny, SmolLM2, tiny, SmolLM2).
4. The paper grid on H100s (no measurement: a projection). The plan of sweep=paper_grid with
   uapt's choices (objective.teacher=cached, trainer.packing=true, evaluation in process), and
   the naive choices priced from it with ratios measured by the other benchmarks (their stored
   last runs, docs/results/benchmarks/): padded batches x the packed/padded throughput ratio of
   packing.py, a live teacher x objective_overhead.py's live/cached run-level ratio on the runs
   that distil, a separate evaluation process + eval_inprocess.py's measured start-up seconds
   per run (lm-eval CLI minus in process).

    python benchmarks/plan_accuracy.py
    python benchmarks/plan_accuracy.py --quick --json /tmp/plan.json
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
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
    load_average,
    log,
    machine_info,
    parser,
    set_threads,
    setup_env,
    subprocess_env,
    table,
    uapt_trainer,
    write_json,
)

GSM8K = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
STORE = REPO / "docs" / "results" / "benchmarks"  # the other benchmarks' last full runs
SMOL_GSM8K = [
    "model=smollm2_135m",
    "dataset=gsm8k",
    f"dataset.source={GSM8K}",
    "dataset.val_size=8",
    "dataset.max_length=384",
    "trainer.batch_size=4",
    "trainer.micro_batch_size=4",
]
TINY_ARITH = [
    "model=tiny",
    "dataset=arith",
    "dataset.num_train=256",
    "dataset.val_size=16",
    "trainer.batch_size=8",
    "trainer.micro_batch_size=8",
    "trainer.lr=1e-3",
]
COMMON = ["logger=none", "eval=none", "trainer.save_model=false", "objective=mle"]
FULL = {
    "matmul_n": 1024,
    "mfu_rounds": 4,
    "mfu_warmup": 1,
    "runs": {
        "tiny": [*TINY_ARITH, "trainer.max_steps=60"],
        "smollm2_135m": [*SMOL_GSM8K, "trainer.max_steps=4"],
    },
    "run_rounds": 2,
}
QUICK = {
    "matmul_n": 256,
    "mfu_rounds": 1,
    "mfu_warmup": 0,
    "runs": {"tiny": [*TINY_ARITH, "trainer.max_steps=4"]},
    "run_rounds": 1,
}
QUICK_MFU_MODEL = ["model=tiny", "dataset=arith", "dataset.num_train=64", "dataset.val_size=8"]


def peak_tflops(n: int, products: int = 8) -> float:
    """The fastest of a few fp32 n x n matrix products (after one untimed), in TFLOP/s: a peak is
    the rate the CPU reaches, so a product slowed by other work on a shared machine is not it."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    fastest = float("inf")
    for _ in range(products):
        started = time.perf_counter()
        torch.mm(a, b)
        fastest = min(fastest, time.perf_counter() - started)
    return 2 * n**3 / fastest / 1e12


def step_flops(loop: Any, run: Any, shape: Any, rows: Any) -> float:
    """The plan's count of the FLOPs of the loop's next step (uapt.costs.train_cost)."""
    import dataclasses

    from uapt import costs

    one = dataclasses.replace(run.trainer, max_steps=loop.step + 1, val_every=0)
    cost = costs.train_cost(one, run.objective, shape, rows, run.seed, False, loop.step)
    return cost.flops["student"]


def measure_mfu(overrides: list[str], n: int, rounds: int, warmup: int) -> dict[str, Any]:
    """Peak and MFU, interleaved: a matrix product's rate, then one training step's."""
    from uapt import costs, plan

    cfg = compose([*overrides, *COMMON])
    run = plan.checked_run(cfg)
    loop, parts = uapt_trainer(cfg)
    shape = costs.model_shape(run.model, run.cache_dir, parts.tokenizer)
    rows = costs.tokenised_rows(run.dataset, parts.tokenizer, run.seed, run.cache_dir)
    for _ in range(warmup):
        loop.train_step()
    peaks, steps, mfus = [], [], []
    for r in range(rounds):
        peaks.append(peak_tflops(n))
        work = step_flops(loop, run, shape, rows)
        started = time.perf_counter()
        loop.train_step()
        took = time.perf_counter() - started
        steps.append(took)
        mfus.append(work / took / 1e12 / peaks[-1])
        log(
            f"plan_accuracy: round {r + 1}/{rounds}: peak {peaks[-1]:.4f} TFLOP/s, step {took:.2f} s, MFU {mfus[-1]:.3f}"
        )
    return {
        "model": run.model.name,
        "overrides": overrides,
        "matrix_n": n,
        "peak_tflops": Spread.of(peaks).as_dict(),
        "step_s": Spread.of(steps).as_dict(),
        "mfu": Spread.of(mfus).as_dict(),
        "matmul_params": shape.matmul_params,
    }


def predicted_seconds(overrides: list[str], peak: float, mfu: float) -> dict[str, Any]:
    """The plan of one run on `cpu` at this peak and MFU: its training seconds and FLOPs."""
    from uapt import plan, pricing
    from uapt.sections import PlanConfig

    run = plan.checked_run(compose(overrides))
    config = PlanConfig(enabled=True, device="cpu", mfu=min(1.0, mfu), peak_tflops=peak)
    costing = pricing.Costing(config)
    cost = costing.point(run, 0)
    # the record's train_s stops before the final validation loss (uapt.train.train)
    flops = cost.train.total - cost.train.flops.get("validation", 0.0)
    seconds = costing.rate(run).seconds(flops)
    return {"seconds": seconds, "flops": flops, "tokens": cost.train.tokens}


def measured_run(overrides: list[str]) -> dict[str, Any]:
    """One `uapt-train` run in a fresh runs_dir: its loop's seconds from the record."""
    with tempfile.TemporaryDirectory(prefix="uapt-bench-plan-") as tmp:
        cmd = [sys.executable, "-m", "uapt.train", *overrides, f"runs_dir={tmp}"]
        proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
        found = list(Path(tmp).glob("*/run.json"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
        timings = json.loads(found[0].read_text())["timings"]
    return {"loop_s": timings["train_s"] - timings["setup_s"], **timings}


def measured_factors() -> dict[str, Any]:
    """The ratios the naive choices are priced with, from the stored benchmark runs."""

    def stored(name: str) -> dict[str, Any]:
        return json.loads((STORE / f"{name}.json").read_text())["payload"]

    packing = {
        r["objective"]: r for r in stored("packing")["packing"] if r["model"] == "smollm2_135m"
    }
    overhead = next(
        r for r in stored("objective_overhead")["results"] if r["model"] == "smollm2_135m"
    )
    ratios = overhead["run_level"]["ratios"]
    evaluation = stored("eval_inprocess")["results"][0]["seconds"]
    median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    return {
        "padded_over_packed": {
            "plain": packing["mle"]["ratio"]["median"],
            "distil": packing["masked_mle_distill"]["ratio"]["median"],
            "source": "packing.py: packed/padded assistant tokens/s, SmolLM2-135M-Instruct, "
            f"GSM8K rows, micro-batch 8 ({packing['mle']['pad_frac']['padded']:.0%} padding)",
        },
        "live_over_cached": {
            "value": ratios["live"]["median"] / ratios["cached"]["median"],
            "source": "objective_overhead.py: run-level masked_mle_distill/mle, live "
            f"{ratios['live']['median']:.3g} over cached {ratios['cached']['median']:.3g}, SmolLM2",
        },
        "process_s": {
            "value": median(evaluation["cli"]) - median(evaluation["in_process"]),
            "source": "eval_inprocess.py: lm-eval CLI minus in-process seconds, SmolLM2 on CPU",
        },
    }


def paper_grid_projection() -> dict[str, Any]:
    """GPU-hours of sweep=paper_grid on h100 with uapt's choices, and priced naively."""
    import yaml

    from uapt import plan, pricing
    from uapt.sections import PlanConfig

    params = yaml.safe_load((REPO / "sweeps" / "paper_grid.yaml").read_text())["hydra"]["sweeper"][
        "params"
    ]
    grid = [dict(zip(params, combo, strict=True)) for combo in _product(params)]
    costing = pricing.Costing(PlanConfig(enabled=True, device="h100", mfu=None, peak_tflops=None))
    factors = measured_factors()
    priced, naive_hours = [], 0.0
    with pricing.quiet_data_logs():
        for point in grid:
            overrides = [
                "sweep=paper_grid",
                "objective.teacher=cached",
                *(f"{k}={v}" for k, v in point.items()),
            ]
            run = plan.checked_run(compose(overrides))
            cost = costing.point(run, 0)
            priced.append((run, cost, 1))
            speed = costing.rate(run)
            train_h = speed.seconds(cost.train.total) / 3600
            distils = run.objective.distill_weight > 0
            pack = factors["padded_over_packed"]["distil" if distils else "plain"]
            teacher = factors["live_over_cached"]["value"] if distils else 1.0
            eval_h = speed.seconds(cost.eval_flops) / 3600 + factors["process_s"]["value"] / 3600
            naive_hours += train_h * pack * teacher + eval_h
    sums = costing.totals(priced)
    naive_hours += sums.hours["base"]
    uapt_hours = sum(sums.hours.values())
    return {
        "points": len(grid),
        "device": "h100",
        "uapt_hours": {**sums.hours, "total": uapt_hours},
        "naive_hours": naive_hours,
        "ratio_naive_over_uapt": naive_hours / uapt_hours,
        "training_tokens": sums.tokens,
        "factors": factors,
        "estimates": {rule: what for rule, what in costing.estimates.items()},
        "mfu": costing.rate(priced[0][0]).mfu,
    }


def _product(params: dict[str, str]) -> list[tuple[str, ...]]:
    from itertools import product

    return list(product(*(str(v).split(",") for v in params.values())))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser(__doc__.split("\n")[0]).parse_args(argv)
    setup_env()
    set_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    before = load_average()
    mfu_model = QUICK_MFU_MODEL if args.quick else SMOL_GSM8K
    mfu = measure_mfu(
        mfu_model, sizes["matmul_n"], args.rounds or sizes["mfu_rounds"], sizes["mfu_warmup"]
    )
    peak, utilisation = mfu["peak_tflops"]["median"], mfu["mfu"]["median"]
    runs: dict[str, dict[str, Any]] = {}
    for r in range(sizes["run_rounds"]):
        for name, overrides in sizes["runs"].items():
            full = [*overrides, *COMMON]
            log(f"plan_accuracy: run round {r + 1}, {name}")
            got = measured_run(full)
            entry = runs.setdefault(
                name,
                {
                    "overrides": full,
                    "predicted": predicted_seconds(full, peak, utilisation),
                    "loop_s": [],
                },
            )
            entry["loop_s"].append(got["loop_s"])
    for entry in runs.values():
        factors = [s / entry["predicted"]["seconds"] for s in entry["loop_s"]]
        entry["factor_measured_over_predicted"] = Spread.of(factors).as_dict()
    payload = {
        "benchmark": "plan_accuracy",
        "quick": args.quick,
        "machine": machine_info("cpu"),
        "cpu": mfu,
        "runs": runs,
        "paper_grid": paper_grid_projection(),
        "load_average_after": load_average(),
    }
    payload["contention"] = contention_note(before, payload["load_average_after"])
    print(render(payload))
    write_json(args.json, payload)
    return payload


def render(payload: dict[str, Any]) -> str:
    cpu = payload["cpu"]
    lines = [
        f"cpu peak (fp32 {cpu['matrix_n']}^2 matrix product): {fmt_spread(cpu['peak_tflops'])} TFLOP/s",
        f"MFU of {cpu['model']}'s training step: {fmt_spread(cpu['mfu'])} (step {fmt_spread(cpu['step_s'])} s)",
    ]
    rows = [
        [
            name,
            f"{e['predicted']['seconds']:.3g}",
            fmt_spread(Spread.of(e["loop_s"]).as_dict()),
            fmt_spread(e["factor_measured_over_predicted"]),
        ]
        for name, e in payload["runs"].items()
    ]
    lines.append(table(["run", "predicted s", "measured loop s", "measured / predicted"], rows))
    lines += render_paper_grid(payload["paper_grid"])
    if payload["contention"]:
        lines.append(payload["contention"])
    return "\n".join(lines)


def render_paper_grid(p: dict[str, Any]) -> list[str]:
    hours, f = p["uapt_hours"], p["factors"]
    rows = [
        [
            "training (packed, cached teacher)",
            f"{hours['train']:.4g}",
            f"x {f['padded_over_packed']['plain']:.3g} (mle) / {f['padded_over_packed']['distil']:.3g} (distil): {f['padded_over_packed']['source']}",
        ],
        [
            "live teacher on the distilling runs",
            "",
            f"x {f['live_over_cached']['value']:.3g}: {f['live_over_cached']['source']}",
        ],
        [
            "teacher cache fill (once per model x row)",
            f"{hours['fill']:.4g}",
            "none (a live teacher has no cache)",
        ],
        [
            "evaluation",
            f"{hours['eval']:.4g}",
            f"+ {f['process_s']['value']:.0f} s per run: {f['process_s']['source']}",
        ],
        ["base-model evaluation (once per model x suite)", f"{hours['base']:.4g}", "the same"],
        [
            "total",
            f"{hours['total']:.4g}",
            f"naive {p['naive_hours']:.4g} GPU-hours: {p['ratio_naive_over_uapt']:.3g}x uapt's",
        ],
    ]
    return [
        f"paper grid ({p['points']} runs) on {p['device']}, MFU {p['mfu']:g} (assumed), {p['training_tokens'] / 1e9:.3g}G training tokens:",
        table(["part", "uapt GPU-hours", "naive: factor (measured by)"], rows),
    ]


if __name__ == "__main__":
    main()
