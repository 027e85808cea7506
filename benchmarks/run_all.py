"""Run every benchmark and write docs/performance.md (machine, versions, raw figures, ratios vs
targets, how to reproduce).

Each benchmark runs as its own subprocess (its own memory, threads and torch flags) and writes
its raw figures as JSON to --out-dir; the document is rendered from those files. A benchmark
that fails is reported in the document and makes the exit status non-zero; the others still run.

    python benchmarks/run_all.py                         # everything (~15 min on 2 busy cores)
    python benchmarks/run_all.py --quick --doc /tmp/performance.md   # smoke sizes
    python benchmarks/run_all.py --only trainer_throughput,eval_inprocess
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_report
from common import REPO, fmt_spread, publishable, subprocess_env, table

HERE = Path(__file__).resolve().parent
DOC = REPO / "docs" / "performance.md"
OUT_DIR = REPO / "runs" / "benchmarks"


@dataclass(frozen=True)
class Benchmark:
    name: str
    script: str
    full: tuple[str, ...] = ()
    quick: tuple[str, ...] = ("--quick",)


BENCHMARKS = (
    Benchmark("objective_overhead", "objective_overhead.py"),
    Benchmark("trainer_throughput", "trainer_throughput.py"),
    Benchmark("eval_inprocess", "eval_inprocess.py"),
    Benchmark("eval_generation", "eval_generation.py"),
    Benchmark("grid_walltime", "grid_walltime.py"),
    Benchmark("teacher_topk_gap", "teacher_topk_gap.py"),
    Benchmark("global_selection", "global_selection.py"),
    Benchmark("packing", "packing.py"),
    Benchmark("bootstrap_draws", "bootstrap_draws.py"),
    Benchmark("nll_task", "nll_task.py"),
    Benchmark("plan_accuracy", "plan_accuracy.py"),  # after the ratios its projection reads
    # Owned by its own author. Run here at SmolLM2's head size (vocab 49152, hidden 576) and
    # 1024 tokens: its 256k-vocab default needs > 8 GB free on CPU and minutes per method.
    Benchmark(
        "loss_memory",
        "loss_memory.py",
        full=("--vocab", "49152", "--hidden", "576", "--tokens", "1024", "--threads", "1"),
        quick=("--small", "--threads", "1"),
    ),
)


@dataclass
class Outcome:
    benchmark: Benchmark
    command: list[str]
    seconds: float
    returncode: int
    stdout: str
    stderr_tail: str
    payload: dict[str, Any] | None = field(default=None)
    measured_at: str = ""  # UTC, when the benchmark ran
    machine_lines: list[str] = field(default_factory=list)  # where it ran, as the page shows it


# Every benchmark's last full run, kept in the repository: the page is rendered from these, so a
# benchmark re-run alone (--only) replaces its own figures and keeps everyone else's.
STORE = REPO / "docs" / "results" / "benchmarks"


def save(o: Outcome) -> None:
    STORE.mkdir(parents=True, exist_ok=True)
    record = {k: v for k, v in o.__dict__.items() if k != "benchmark"}
    (STORE / f"{o.benchmark.name}.json").write_text(json.dumps(record, indent=1) + "\n")


def stored(bench: Benchmark) -> Outcome | None:
    path = STORE / f"{bench.name}.json"
    if not path.exists():
        return None
    return Outcome(bench, **json.loads(path.read_text()))


def run(bench: Benchmark, quick: bool, out_dir: Path) -> Outcome:
    json_path = out_dir / f"{bench.name}.json"
    json_path.unlink(missing_ok=True)
    args = bench.quick if quick else bench.full
    cmd = [sys.executable, str(HERE / bench.script), *args, "--json", str(json_path)]
    print(f"== {bench.name}: {' '.join(cmd[1:])}", flush=True)
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True)
    seconds = time.perf_counter() - started
    print(proc.stdout, flush=True)
    payload = json.loads(json_path.read_text()) if json_path.exists() else None
    if proc.returncode != 0:
        print(proc.stderr[-3000:], file=sys.stderr, flush=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    machine = _machine_lines((payload or {}).get("machine", {}))
    return Outcome(  # kept in the repository and shown on the page: no path of this machine
        bench,
        publishable(cmd),
        seconds,
        proc.returncode,
        publishable(proc.stdout),
        publishable(proc.stderr[-3000:]),
        publishable(payload),
        when,
        machine,
    )


# ----------------------------------------------------------------------------- summary rows
Row = list[Any]


def _verdict(ratio: dict[str, Any]) -> str:
    return "met" if ratio["met"] else "**not met**"


def rows_objective_overhead(p: dict[str, Any]) -> list[Row]:
    rows = []
    for r in p["results"]:
        live = r["ratio_live"]
        rows.append(
            [
                f"masked_mle_distill / mle step time, live teacher ({r['model']})",
                fmt_spread(live),
                f"<= {live['target']}",
                _verdict(live),
            ]
        )
        for name, ratio in (r.get("run_level") or {}).get("ratios", {}).items():
            rows.append(
                [
                    f"masked_mle_distill / mle, {name} teacher, run level ({r['model']})",
                    fmt_spread(ratio),
                    f"<= {ratio['target']}",
                    _verdict(ratio),
                ]
            )
    cached = p["cached_teacher"]
    if not cached["available"]:
        rows.append(
            [
                "masked_mle_distill / mle step time, cached teacher",
                "not available",
                "<= 1.1",
                "not measured: no `objective.teacher=cached` option in conf/ "
                f"({cached['why_not']})",
            ]
        )
    return rows


def rows_trainer_throughput(p: dict[str, Any]) -> list[Row]:
    return [
        [
            f"uapt / transformers.Trainer tokens/s, mle ({r['model']}, batch {r['batch_size']})",
            fmt_spread(r["ratio"]),
            f">= {r['ratio']['target']}",
            _verdict(r["ratio"]),
        ]
        for r in p["results"]
    ]


def rows_eval_inprocess(p: dict[str, Any]) -> list[Row]:
    rows = []
    for r in p["results"]:
        agree = "scores agree" if r["scores"]["agree"] else "**scores differ**"
        if "generations" in r:
            same = r["generations"]["agree"]
            agree += ", outputs agree" if same else ", **outputs differ**"
        rows.append(
            [
                f"lm-eval CLI / in-process wall time ({r['model']}, arith limit {r['task']['limit']})",
                fmt_spread(r["ratio_cli_over_in_process"]),
                "(no target)",
                f"{agree}; cold in-process call: {r['ratio_cli_over_in_process_cold']:.3g}x",
            ]
        )
    return rows


def rows_eval_generation(p: dict[str, Any]) -> list[Row]:
    (r,) = p["results"]
    total = r["total"]
    same = (
        "outputs equal"
        if not total["differing_samples"]
        else f"{total['differing_samples']} outputs differ"
        + (" (near ties)" if total["all_differences_near_ties"] else " (**not near ties**)")
    )
    fast = total["samples_per_s"]["fast"]["median"]
    return [
        [
            f"generated samples/s, eval.generate=fast / today's model.generate ({r['model']}, "
            f"eval={r['suite']}, batch {r['batch_size']})",
            fmt_spread(total["ratio_fast_over_today"]),
            f">= {total['ratio_fast_over_today']['target']}",
            f"{_verdict(total['ratio_fast_over_today'])}; {same}",
        ],
        [
            f"the same / a plain model.generate loop ({r['model']})",
            fmt_spread(total["ratio_fast_over_plain"]),
            "(no target)",
            f"compute bound {total['bound_samples_per_s']:.3g} samples/s, measured {fast:.3g}",
        ],
    ]


def rows_grid_walltime(p: dict[str, Any]) -> list[Row]:
    r = p["results"][0]
    n = len(r["objectives"]) * len(r["seeds"])
    rows = [
        [
            f"grid wall time, {n} tiny runs, {name} teacher (s)",
            fmt_spread(s),
            "(no target)",
            "",
        ]
        for name, s in r["wall_s"].items()
    ]
    if "ratio_cached_over_live" in r:
        rows.append(
            ["grid wall time cached / live", fmt_spread(r["ratio_cached_over_live"]), "< 1", ""]
        )
    else:
        rows.append(["grid wall time cached / live", "not available", "< 1", "no cached teacher"])
    return rows


def rows_teacher_topk_gap(p: dict[str, Any]) -> list[Row]:
    return [
        [
            f"cached top-{r['k']} KL / exact KL ({p['model']}, {p['tokens']} tokens)",
            f"{r['ratio']:.3f} (gradient cosine {r['grad_cosine']:.3f})",
            "(reported)",
            "",
        ]
        for r in p["results"]
    ]


def rows_loss_memory(p: dict[str, Any]) -> list[Row]:
    try:
        from loss_memory import TARGETS
    except Exception:  # its author may rename things: show the ratios without targets
        TARGETS = {}
    rows = []
    for key, value in (p.get("ratios") or {}).items():
        target = TARGETS.get(key)
        rows.append(
            [
                f"loss {key}",
                f"{value:.3g}",
                "(no target)" if target is None else f"<= {target:.3g}",
                "" if target is None else ("met" if value <= target else "**not met**"),
            ]
        )
    return rows


def rows_global_selection(p: dict[str, Any]) -> list[Row]:
    return [
        [
            f"scope=batch over the global batch / within micro-batches, {r['objective']} "
            f"({r['model']}, {r['micro_batch_size']} x 2 rows)",
            fmt_spread(r["ratio"]),
            "(no target)",
            "",
        ]
        for r in p["results"]
    ]


def rows_packing(p: dict[str, Any]) -> list[Row]:
    rows = []
    for r in p["packing"]:
        rows.append(
            [
                f"assistant tokens/s packed / padded, {r['objective']} ({r['model']}, "
                f"micro-batch {r['micro_batch_size']}, padding {r['pad_frac']['padded']:.0%})",
                fmt_spread(r["ratio"]),
                f">= {r['ratio']['target']}",
                _verdict(r["ratio"]),
            ]
        )
        if r.get("ratio_budget"):
            rows.append(
                [
                    f"the same, packed + token budget {r['token_budget']} ({r['model']})",
                    fmt_spread(r["ratio_budget"]),
                    "(no target)",
                    "",
                ]
            )
    for c in p["compile"]:
        rows.append(
            [
                f"step time compiled / eager ({c['model']}; compiling: {c['compile_s']:.0f} s once)",
                fmt_spread(c["ratio"]),
                f"<= {c['ratio']['target']}",
                _verdict(c["ratio"]),
            ]
        )
    return rows


def rows_bootstrap_draws(p: dict[str, Any]) -> list[Row]:
    return [
        [
            f"bootstrap interval, loop over draws / uapt ({r['case']}, {r['seeds']} seeds)",
            fmt_spread(r["ratio"]),
            f">= {r['ratio']['target']}",
            _verdict(r["ratio"]),
        ]
        for r in p["results"]
    ]


def rows_plan_accuracy(p: dict[str, Any]) -> list[Row]:
    cpu = p["cpu"]
    rows = [
        [
            "cpu peak, fp32 matrix product, one thread (TFLOP/s)",
            fmt_spread(cpu["peak_tflops"]),
            "(measured)",
            "",
        ],
        [f"MFU of {cpu['model']}'s training step on cpu", fmt_spread(cpu["mfu"]), "(measured)", ""],
    ]
    for name, run in p["runs"].items():
        factor = run["factor_measured_over_predicted"]
        rows.append(
            [
                f"measured / planned training time, {name} on cpu",
                fmt_spread(factor),
                "(reported)",
                "",
            ]
        )
    grid = p["paper_grid"]
    rows.append(
        [
            f"paper grid on h100, naive / uapt's choices (GPU-hours {grid['naive_hours']:.0f} / "
            f"{grid['uapt_hours']['total']:.0f}, projected)",
            f"{grid['ratio_naive_over_uapt']:.3g}",
            "(no target)",
            "",
        ]
    )
    return rows


def rows_nll_task(p: dict[str, Any]) -> list[Row]:
    return [
        [
            f"nll task samples/s, chunked labelled positions / full logits ({p['samples']} IFEval "
            f"GPT-4 responses, {p['model']})",
            fmt_spread(p["speedup"]),
            f">= {p['speedup']['target']}",
            _verdict(p["speedup"]) + f"; largest difference {p['max_abs_difference']:.1e} nats",
        ]
    ]


SUMMARIES: dict[str, Callable[[dict[str, Any]], list[Row]]] = {
    "nll_task": rows_nll_task,
    "plan_accuracy": rows_plan_accuracy,
    "bootstrap_draws": rows_bootstrap_draws,
    "packing": rows_packing,
    "global_selection": rows_global_selection,
    "objective_overhead": rows_objective_overhead,
    "trainer_throughput": rows_trainer_throughput,
    "eval_inprocess": rows_eval_inprocess,
    "eval_generation": rows_eval_generation,
    "grid_walltime": rows_grid_walltime,
    "loss_memory": rows_loss_memory,
    "teacher_topk_gap": rows_teacher_topk_gap,
}


# ----------------------------------------------------------------------------- the document
INTRO = """\
# Performance

Measured by `python benchmarks/run_all.py`, which runs every benchmark in `benchmarks/` and
rewrites this page from their JSON output. The text above "Results" is kept in
`benchmarks/run_all.py` (INTRO); everything below it is generated. The figures of "Results" are
from CPUs; the "GPU" section at the end is rendered from the last record of
`benchmarks/gpu_check/` (`docs/results/gpu_check.json`) and names its machine and date.

How the figures are taken:

- **Ratios, side by side.** Each benchmark measures both sides of its ratio in the same process
  (or the same run of subprocesses), on the same model, data and batches. Repetitions are
  interleaved A, B, A, B, ... after warm-up, the ratio is taken per round (paired) and reported
  as its median with the range over rounds: `median [min-max]`. Absolute times depend on the
  machine; the ratios are what the targets are about.
- **One thread.** Benchmarks pin torch (and the OpenMP/MKL threads of their subprocesses) to one
  thread (`--threads`). On a CPU shared with other work, two OpenMP threads spin-wait on each
  other whenever one is descheduled: a tiny model's step was measured 10-70x slower with 2
  threads than with 1 on 2 busy cores. Both sides of every ratio run with the same setting.
- **Noise.** The load average before and after is recorded; "contended" notes mean other work
  shared the CPUs during the run, so single figures can be off by tens of percent: read the
  ranges.

The benchmarks:

| benchmark | what | target (issue 8) |
|---|---|---|
| `objective_overhead.py` | optimizer-step time of `masked_mle_distill` / `mle`, uapt's `Trainer.train_step`, tiny model and SmolLM2-135M-Instruct | live teacher <= 1.40 (ideal ~4/3: one extra forward on a ~3-forward step); cached teacher <= 1.10 |
| `trainer_throughput.py` | plain-MLE tokens/s of uapt's loop / `transformers.Trainer`, same weights, rows, collate, batch, AdamW, fp32 | >= 1.0 |
| `eval_inprocess.py` | wall time of `lm-eval run` on a saved model (subprocess, includes start-up, task index and model load) / `uapt.evaluation.run_suite` on the in-memory model, same task (arith); scores and generations must agree | none (how much in-process saves) |
| `eval_generation.py` | generated samples/s of `eval=repro_real` (lm-eval's gsm8k and ifeval on the real files, SmolLM2-135M-Instruct, batch 32): uapt's greedy loop (`eval.generate=fast`) / today's path (lm-eval's `model.generate`, `eval.generate=hf`) / a plain `model.generate` loop; the compute-bound estimate beside them; per-sample outputs compared, differences checked for near ties | fast / today >= 2 (issue 26) |
| `grid_walltime.py` | wall time of `uapt-train -m` over 4 objectives x 2 seeds on the tiny model, live vs cached teacher | cached < live |
| `loss_memory.py` | extra peak memory and time of the loss, naive full logits vs uapt's chunked path (owned separately; run here at SmolLM2's head size, 1024 tokens) | see its docstring |
| `global_selection.py` | optimizer-step time of `scope=batch` over the whole global batch (a no-grad scoring pass first, since the batch is split into 2 micro-batches) / groups each micro-batch holds whole (selected in the forward), select nll and rho1's excess, tiny and SmolLM2 | none (the cost of the choice; ideal ~1.33 for nll, ~1.25 for excess) |
| `packing.py` | assistant tokens/s of packed / padded micro-batches (and packed split by a token budget), SmolLM2-135M-Instruct on real GSM8K rows, micro-batch 8, mle and masked_mle_distill; step time of `trainer.compile=true` / eager, tiny and SmolLM2 | packed >= 1.3; compiled <= 0.8 |
| `nll_task.py` | samples/s of the `nll` eval task (per-sample NLL of reference responses), the output layer on labelled positions only in chunks (uapt) / the model's full [batch, time, vocab] logits, SmolLM2-135M-Instruct on the first 32 IFEval GPT-4 responses; the largest per-sample difference beside | >= 1.3 |
| `bootstrap_draws.py` | time of one table cell's paired bootstrap interval (3 seeds, 10,000 draws), a loop over draws / `uapt.bootstrap.paired_samples`, at GSM8K's and TruthfulQA MC2's test sizes; the two intervals agree up to Monte Carlo error | >= 10 |
| `plan_accuracy.py` | the plan's CPU figures (an fp32 matrix product's peak, SmolLM2's training-step MFU on GSM8K rows), its planned training time against whole `uapt-train` runs (tiny on arith, SmolLM2 on GSM8K rows), and the paper grid's projected GPU-hours on H100 with uapt's choices against naive ones priced by the ratios above ([docs/plan.md](plan.md)) | none (report the factors) |
| `teacher_topk_gap.py` | `objective.teacher=cached`: per-token KL over the teacher's top-k + rest buckets vs the exact KL, and the cosine of their gradients, SmolLM2-135M-Instruct (teacher) vs itself after 4 MLE steps (student) on 32 real GSM8K training rows, k in {16, 64, 256} | none (report the gap; see docs/models.md) |

Two targets are out of reach by construction, whatever the machine:

- **Cached teacher on the tiny model (<= 1.10).** A cached teacher removes the teacher's forward
  pass, nothing else. On the tiny model that forward is a small part of the step: the objective's
  own work on the vocabulary (the selection pass that scores every token before any loss term,
  and the KL) dominates, so masked_mle_distill / mle stays near the live figure. On SmolLM2, where
  the teacher's forward is the cost, the cached ratio is about 1.0.
- **Chunked CE+KL memory <= 1/8 of naive with a trained head.** Both losses hand autograd one
  gradient of the output layer's weight, a [V, H] temporary that autograd then adds into the
  pre-allocated `.grad` (`grad_tmp_mb` in loss_memory's output). The chunked path builds it in
  place, chunk by chunk, but cannot skip it without writing `.grad` itself, which would bypass
  DDP's gradient hooks. At Gemma-2's head (256k x 2,304, fp32) that temporary alone is 2.4 GB,
  about a fifth of what the naive loss adds at 2,048 tokens, so the ratio cannot reach 1/8. With
  a frozen head (LoRA) it vanishes: `loss_memory.py --frozen-head`.

Packing and compile (`packing.py`):

- **Padding.** A micro-batch is padded to its longest row. On the real GSM8K rows with SmolLM2's
  chat template, micro-batches of 8 are about 40 % padding, all of it computed and thrown away.
  `trainer.packing=true` (the default) runs a micro-batch's rows as one sequence with position ids
  restarting per row: no padding is computed (the `pad_frac` of every logged step is 0). On SDPA
  models attention runs row by row (`uapt.packing.rows_attention`), because transformers' own
  packed format builds one block-diagonal mask over the whole sequence, whose attention cost
  (N² for N packed tokens instead of the sum of each row's T²) would eat the saving on a CPU. The
  numbers are the padded ones (tests/test_packing.py, tests/test_invariance.py).
- **Compile.** `trainer.compile=true` compiles each decoder layer with torch.compile (dynamic
  shapes). On CPU it compiles once in 30-45 s and then steps within noise of eager (the figures
  below): the step's time is in the matrix products, which eager already runs through oneDNN,
  and what Inductor fuses around them (norms, activations, rotary embeddings) is a small share at
  these sizes. So `trainer.compile=auto` leaves it off on CPU; on CUDA it is untested (no GPU was lent)
  and `auto` leaves it off there too until it is measured.

The plan (`plan_accuracy.py`, [docs/plan.md](plan.md)):

- **CPU figures.** The `cpu` device's peak and MFU in `uapt.devices` are this benchmark's medians.
  Peak and training step run interleaved, so on a shared machine contention lowers the measured
  peak as it slows the step: the MFU reads high and the peak low, and their product is the rate a
  run gets here, which is what a plan's time uses.
- **Accuracy.** Each whole run is planned with the peak and MFU of the same benchmark run, then
  its training loop is timed from its record: measured / planned is the plan's error on CPU.
  SmolLM2 steps are matrix products, as the MFU's own step is; the tiny model's steps are so
  small that per-step work the FLOP count does not see (Python, the optimizer, logging) weighs
  more, so its factor is larger.
- **Paper grid.** A projection, not a measurement: the plan of `sweep=paper_grid` on H100 at the
  assumed GPU MFU, with uapt's choices, and the naive choices priced from it by the ratios other
  benchmarks measured (their stored last runs, named in the table).

Reproduce: `python benchmarks/run_all.py` (about 15 minutes on 2 busy cores), or one benchmark:
`python benchmarks/<name>.py [--quick] [--json out.json] [--rounds N] [--threads N]`.
`--quick` runs smoke-test sizes (tests/test_benchmarks.py runs them and checks the JSON).
"""


def render_doc(outcomes: list[Outcome | None], quick: bool) -> str:
    """The page: every benchmark's last run (None: not measured yet), each with its own date
    and machine, then the GPU record."""
    lines = [INTRO, "## Results", ""]
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines.append(
        f"Rendered {when}{' from a --quick run (smoke sizes, not figures)' if quick else ''} "
        "from each benchmark's last full run (`docs/results/benchmarks/<name>.json`); each "
        "section says when and on which machine it ran."
    )
    lines += ["", "### Summary", ""]
    rows: list[Row] = []
    for bench, o in zip(BENCHMARKS, outcomes, strict=True):
        if o is None:
            rows.append([bench.name, "not measured yet", "", ""])
        elif o.payload is None:
            rows.append([bench.name, "**failed**", "", f"exit status {o.returncode}"])
        else:
            rows += SUMMARIES[bench.name](o.payload)
    lines += [table(["measure", "ratio: median [min-max]", "target", "verdict"], rows), ""]
    for o in outcomes:
        if o is not None:
            lines += _section(o)
    gpu = gpu_report.saved_section()  # kept across CPU runs: it has its own record and date
    if gpu:
        lines += [gpu]
    return "\n".join(lines).rstrip() + "\n"


def _machine_lines(machine: dict[str, Any]) -> list[str]:
    versions = machine.get("versions", {})
    return [
        f"CPU: {machine.get('cpu_model')}, {machine.get('cores')} cores; "
        f"torch threads {machine.get('torch_threads')}; device {machine.get('device')}"
        + (f" ({machine['gpu']})" if machine.get("gpu") else ""),
        f"Python {machine.get('python')} on {machine.get('platform')}",
        ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]


def _section(o: Outcome) -> list[str]:
    args = o.command[2:-2]  # between the script and its --json
    cmd = " ".join(["python", f"benchmarks/{o.benchmark.script}", *args])
    lines = [
        f"### {o.benchmark.name}",
        "",
        f"`{cmd}` — {o.seconds:.0f} s, exit status {o.returncode}; measured {o.measured_at}.",
        "",
        *(f"- {line}" for line in o.machine_lines),
        "",
        "```text",
        o.stdout.strip() or "(no output)",
        "```",
        "",
    ]
    if o.returncode != 0:
        lines += ["Error output (tail):", "", "```text", o.stderr_tail.strip(), "```", ""]
    if o.payload is not None:
        raw = f"results/benchmarks/{o.benchmark.name}.json"  # relative to docs/performance.md
        lines += [f"Raw figures of its last full run: [docs/{raw}]({raw}).", ""]
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke sizes (touches neither docs/)")
    p.add_argument("--only", default=None, help="comma-separated benchmark names")
    p.add_argument("--out-dir", type=Path, default=OUT_DIR, help="JSON output folder")
    p.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="document to write (default docs/performance.md; none with --quick)",
    )
    p.add_argument(
        "--render-only",
        action="store_true",
        help="run nothing: rewrite the document from every benchmark's stored last run",
    )
    args = p.parse_args(argv)
    if args.render_only:
        (args.doc or DOC).write_text(render_doc([stored(b) for b in BENCHMARKS], False))
        print(f"wrote {args.doc or DOC}")
        return 0
    names = [b.name for b in BENCHMARKS]
    chosen = args.only.split(",") if args.only else names
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        p.error(f"--only: unknown {unknown}; choose from {', '.join(names)}")
    doc = args.doc or (None if args.quick else DOC)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    outcomes = {b.name: run(b, args.quick, args.out_dir) for b in BENCHMARKS if b.name in chosen}
    if not args.quick:
        for o in outcomes.values():
            save(o)
    if doc is not None:
        every = [outcomes.get(b.name) or stored(b) for b in BENCHMARKS]
        doc.parent.mkdir(parents=True, exist_ok=True)
        doc.write_text(render_doc(every, args.quick))
        print(f"wrote {doc}")
    failed = [o.benchmark.name for o in outcomes.values() if o.returncode != 0 or o.payload is None]
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
