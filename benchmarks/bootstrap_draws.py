"""Paired bootstrap intervals: what one table cell's interval costs, uapt's draws against a loop.

`uapt.bootstrap.paired_samples` draws all 10,000 replicates of "cell minus baseline" at once
(numpy, blocks of sample indices or one multinomial per seed). Measured against the textbook
algorithm written as a loop over draws (each draw resamples the seeds, then each drawn seed's
samples, with numpy inside the draw), on the same outcomes, interleaved after warm-up, at the
sizes of the paper's tables: GSM8K's test set (1319 samples, 0/1 outcomes) and TruthfulQA MC2's
(817, a probability per sample), three seeds. Both give the same interval up to Monte Carlo
error (reported). Target: the loop / uapt >= 10 (tests/test_bootstrap.py checks, without a
clock, that no Python loop over draws or samples runs).

    python benchmarks/bootstrap_draws.py
    python benchmarks/bootstrap_draws.py --quick --json /tmp/bootstrap.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    Spread,
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

from uapt.bootstrap import (
    Settings,
    TaskSamples,
    paired_samples,
    percentile_interval,
    rng_for,
)

TARGET = 10.0
SEEDS = 3
CASES = {"GSM8K (1319, 0/1)": (1319, False), "TruthfulQA MC2 (817, probabilities)": (817, True)}
FULL = {"draws": 10_000, "warmup": 1, "rounds": 3}
QUICK = {"draws": 1_000, "warmup": 1, "rounds": 2}


def outcomes(size: int, continuous: bool) -> list[list[TaskSamples]]:
    """Three seeds of one task's per-sample outcomes for a cell and its baseline."""
    rng = np.random.default_rng(0)
    seeds = []
    for _ in range(SEEDS):
        a, b = rng.random(size), rng.random(size)
        if not continuous:
            a, b = (a < 0.5) * 1.0, (b < 0.4) * 1.0
        num = np.stack([a, b])[:, None, :]
        seeds.append([TaskSamples(num, np.ones_like(num))])
    return seeds


def loop_over_draws(
    seeds: list[list[TaskSamples]], scale: float, draws: int, rng: np.random.Generator
) -> np.ndarray:
    """The two-level paired bootstrap, one draw at a time."""
    n = len(seeds)
    reps = np.empty(draws)
    for d in range(draws):
        slots = []
        for s in rng.integers(0, n, size=n):
            total, paths = 0.0, 0
            for task in seeds[s]:
                idx = rng.integers(0, task.size, size=task.size)
                ratios = task.num[..., idx].sum(axis=-1) / task.den[..., idx].sum(axis=-1)
                total += float((ratios[0] - ratios[1]).sum())
                paths += task.paths
            slots.append(total / paths)
        reps[d] = scale * float(np.mean(slots))
    return reps


def measure(name: str, size: int, continuous: bool, sizes: dict[str, int]) -> dict[str, Any]:
    seeds, settings = outcomes(size, continuous), Settings(draws=sizes["draws"])
    intervals: dict[str, tuple[float, float]] = {}

    def uapt() -> None:
        got = paired_samples(seeds, 100.0, settings, rng_for(0, name))
        intervals["uapt"] = (got.lo, got.hi)

    def loop() -> None:
        reps = loop_over_draws(seeds, 100.0, settings.draws, rng_for(0, name))
        intervals["loop"] = percentile_interval(reps, settings.level)

    times = interleave({"uapt": uapt, "loop": loop}, sizes["rounds"], sizes["warmup"])
    return {
        "case": name,
        "samples": size,
        "seeds": SEEDS,
        "draws": settings.draws,
        "warmup": sizes["warmup"],
        "rounds": sizes["rounds"],
        "seconds": times,
        "interval": intervals,
        "ratio": ratio_summary(times["loop"], times["uapt"], TARGET, True),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    setup_env()
    set_threads(args.threads)
    sizes = dict(QUICK if args.quick else FULL)
    sizes["rounds"] = args.rounds or sizes["rounds"]
    load_before = load_average()
    results = []
    for name, (size, continuous) in CASES.items():
        log(f"bootstrap_draws: {name}, {sizes['draws']} draws, {sizes['rounds']} rounds")
        results.append(measure(name, size, continuous, sizes))
    payload = {
        "benchmark": "bootstrap_draws",
        "quick": args.quick,
        "machine": machine_info("cpu"),
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
            r["case"],
            r["draws"],
            fmt_spread(Spread.of(r["seconds"]["uapt"]).as_dict()),
            fmt_spread(Spread.of(r["seconds"]["loop"]).as_dict()),
            fmt_spread(r["ratio"]),
            " vs ".join(f"[{lo:.2f}, {hi:.2f}]" for lo, hi in r["interval"].values()),
        ]
        for r in payload["results"]
    ]
    headers = ["outcomes", "draws", "uapt s", "loop s", "loop / uapt", "interval uapt vs loop"]
    lines = [table(headers, rows)]
    if payload["contention"]:
        lines.append(payload["contention"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
