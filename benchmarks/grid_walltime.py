"""Wall time of a whole small grid: 4 objectives x 2 seeds on the tiny model, `uapt-train -m`.

Each grid is one `uapt-train -m ...` subprocess into a fresh runs_dir, timed from start to exit
(interpreter, imports, every run's setup, training, validation, saving, the sweep summary).
Variants: the live teacher (the frozen copy runs forward at every step), and the cached teacher
(`objective.teacher=cached`) when the config has that option. Grids are interleaved (live,
cached, live, cached, ...). Every run of every grid must end `completed`.

    python benchmarks/grid_walltime.py
    python benchmarks/grid_walltime.py --quick --json /tmp/grid.json
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
    contention_note,
    default_device,
    fmt_spread,
    load_average,
    log,
    machine_info,
    option_available,
    parser,
    set_threads,
    setup_env,
    subprocess_env,
    table,
    write_json,
)

OBJECTIVES = ("mle", "masked_mle", "self_distill", "masked_mle_distill")
CACHED_OVERRIDE = "objective.teacher=cached"
FULL = {"objectives": OBJECTIVES, "seeds": (0, 1), "extra": [], "rounds": 2}
QUICK = {
    "objectives": ("mle", "masked_mle_distill"),
    "seeds": (0,),
    "extra": [
        "dataset.num_train=64",
        "dataset.val_size=16",
        "trainer.batch_size=4",
        "trainer.micro_batch_size=4",
        "trainer.max_steps=2",
    ],
    "rounds": 1,
}


def train_command() -> list[str]:
    """`uapt-train` of this interpreter's environment (or the module, where no script is)."""
    script = Path(sys.executable).parent / "uapt-train"
    return [str(script)] if script.exists() else [sys.executable, "-m", "uapt.train"]


def grid_args(sizes: dict[str, Any], runs_dir: Path, variant: list[str]) -> list[str]:
    return [
        "-m",
        "model=tiny",
        "dataset=arith",
        "logger=none",
        f"objective={','.join(sizes['objectives'])}",
        f"seed={','.join(map(str, sizes['seeds']))}",
        f"runs_dir={runs_dir}",
        *sizes["extra"],
        *variant,
    ]


def run_grid(sizes: dict[str, Any], variant: list[str]) -> dict[str, Any]:
    """One grid into a fresh runs_dir: wall seconds and the runs' own timings."""
    with tempfile.TemporaryDirectory(prefix="uapt-bench-grid-") as tmp:
        runs_dir = Path(tmp) / "runs"
        cmd = [*train_command(), *grid_args(sizes, runs_dir, variant)]
        started = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=3600
        )
        wall = time.perf_counter() - started
        records = [json.loads(p.read_text()) for p in sorted(runs_dir.glob("*/run.json"))]
    expected = len(sizes["objectives"]) * len(sizes["seeds"])
    statuses = [r["status"] for r in records]
    if proc.returncode != 0 or statuses.count("completed") != expected:
        raise RuntimeError(
            f"grid {' '.join(cmd)} exited {proc.returncode} with {statuses} "
            f"(expected {expected} completed):\n{proc.stderr[-4000:]}"
        )
    timings = [r.get("timings", {}) for r in records]
    return {
        "wall_s": wall,
        "runs": expected,
        "setup_s": sum(t.get("setup_s", 0.0) for t in timings),
        "train_s": sum(t.get("train_s", 0.0) for t in timings),
        "command": " ".join(cmd),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n")[0])
    args = p.parse_args(argv)
    setup_env()
    set_threads(args.threads)  # also OMP_NUM_THREADS of the uapt-train subprocesses
    sizes = QUICK if args.quick else FULL
    rounds = args.rounds or sizes["rounds"]
    cached_ok, why = option_available(
        ["model=tiny", "objective=masked_mle_distill", "logger=none", CACHED_OVERRIDE]
    )
    variants = {"live": []}
    if cached_ok:
        variants["cached"] = [CACHED_OVERRIDE]
    load_before = load_average()
    grids: dict[str, list[dict[str, Any]]] = {name: [] for name in variants}
    for r in range(rounds):
        for name, variant in variants.items():
            log(f"grid_walltime: round {r + 1}/{rounds}, {name} teacher")
            grids[name].append(run_grid(sizes, variant))
    wall = {name: [g["wall_s"] for g in runs] for name, runs in grids.items()}
    result: dict[str, Any] = {
        "objectives": list(sizes["objectives"]),
        "seeds": list(sizes["seeds"]),
        "overrides": sizes["extra"],
        "rounds": rounds,
        "grids": grids,
        "wall_s": {name: Spread.of(values).as_dict() for name, values in wall.items()},
    }
    if cached_ok:
        paired = [a / b for a, b in zip(wall["cached"], wall["live"], strict=True)]
        result["ratio_cached_over_live"] = Spread.of(paired).as_dict()
    payload = {
        "benchmark": "grid_walltime",
        "quick": args.quick,
        "machine": machine_info(default_device()),
        "load_average_after": load_average(),
        "cached_teacher": {"available": cached_ok, "why_not": why or None},
        "results": [result],
    }
    payload["contention"] = contention_note(load_before, payload["load_average_after"])
    print(render(payload))
    write_json(args.json, payload)
    return payload


def render(payload: dict[str, Any]) -> str:
    r = payload["results"][0]
    n = len(r["objectives"]) * len(r["seeds"])
    rows = [
        [name, n, fmt_spread(s), Spread.of([g["train_s"] for g in r["grids"][name]]).median]
        for name, s in r["wall_s"].items()
    ]
    lines = [table(["teacher", "runs", "grid wall s", "sum of runs' train_s"], rows)]
    if "ratio_cached_over_live" in r:
        lines.append(f"cached / live wall time: {fmt_spread(r['ratio_cached_over_live'])}")
    else:
        why = payload["cached_teacher"]["why_not"]
        lines.append(f"cached teacher: not available ({why})")
    if payload["contention"]:
        lines.append(payload["contention"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
