"""One command that checks uapt's CUDA paths and measures them (issue 16).

Sections, in this order, each timed and written to the JSON record as soon as it ends:
  parity      (parity.py) chunked vs naive loss (values, kept sets, gradients) in fp32 and bf16
              for the named objectives of conf/objective/, at Gemma-2-2b's head (vocab 256,000,
              hidden 2,304, final-logit softcap 30)
  loss_memory (memory.py) extra peak memory and time of one loss forward + backward at
              Gemma-2-2b's head (bf16 weights), 2,048 and 8,192 tokens: benchmarks/loss_memory.py's
              naive and chunked methods and its measurement, CE and CE+KL, with Liger-Kernel's fused
              linear cross-entropy and fused linear JSD (beta 0: forward KL) beside them where
              liger_kernel imports (CUDA only)
  train_step  (train_step.py) `uapt-train` runs of Llama-3.2-1B's architecture with random
              weights (no download), bf16, sequence 2,048: tokens/s and peak memory of mle,
              masked_mle and masked_mle_distill with a live and with a cached teacher, step-time
              ratios to mle, and uapt's mle against transformers.Trainer (as
              benchmarks/trainer_throughput.py sets it up) on the same rows and batch shapes
  e2e         (runs.py) one `uapt-train` run end to end (tiny model, eval=embedded with a small
              limit, W&B offline)
  ddp         (runs.py) a two-rank run where the machine has two GPUs
What could not be measured (a package missing, one GPU, the time budget) is named as such in
the tables and the JSON, never left out. CUDA memory is torch.cuda.max_memory_allocated; on a
CPU the same sections run with CPU fallbacks (peak RSS, a wall clock) at --quick sizes. The
sizes, the run's state and the packages it found: check.py; the command: cli.py; the tables:
benchmarks/gpu_report.py.

Only public entry points of uapt are used (Objective, OutputHead, models.load_tokenizer /
load_model, and `python -m uapt.train`), so the check follows the package and not its internals.

    python benchmarks/gpu_check --json runs/benchmarks/gpu_check.json   # CUDA (make gpu-check)
    python benchmarks/gpu_check --device cpu --quick --json /tmp/g.json  # smoke sizes (tests)
    python benchmarks/gpu_check --render <record.json>   # the record as Markdown
    python benchmarks/gpu_check --doc <record.json>      # into docs/performance.md ("GPU")

The full run is sized for about 5 minutes on one H200 (an estimate from the work it does: it has
not run on a GPU yet). It starts no item after --deadline-s (300 s by default) nor one with less
than 30 s left, and kills a run at the deadline, so it ends within seconds of it. A machine
without a package index gets the packages it lacks as wheels, fetched here by `make gpu-wheels`
(benchmarks/gpu_requirements.txt: cp312, manylinux x86-64), installed there by the one command
in docs/performance.md ("GPU").
"""

import sys
from pathlib import Path

# The other benchmarks' modules (common, gpu_report, loss_memory, trainer_throughput) and this
# checkout's uapt, installed or not (on a device machine it is not): the subprocesses get the
# same first entry on their path (runs.child_env).
_BENCHMARKS = Path(__file__).resolve().parents[1]
for _path in (_BENCHMARKS.parent / "src", _BENCHMARKS):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
