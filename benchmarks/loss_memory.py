"""Extra peak memory and time of the loss: naive full logits vs uapt's chunked path.

Methods, measured side by side in one invocation on the same sizes:
  naive_ce_kl    torch as usually written: full [T, V] student and teacher logits,
                 F.cross_entropy + F.kl_div (forward KL, token mean), loss.backward()
  naive_ce       the same without the teacher (plain F.cross_entropy)
  chunked_ce_kl  token_loss_chunked, objective self_distill (rho 0, lambda 1, distill_on all):
                 the same loss as naive_ce_kl, never holding [T, V] logits
  chunked_ce     token_loss_chunked with distill_weight 0 (the same loss as naive_ce)
  chunked_paper  token_loss_chunked, the paper's masked_mle_distill (rho 0.5, lambda 1,
                 distill_on unselected): score pass + fused pass
Each method's loss value is printed: the naive and chunked pairs must agree.

What "extra peak memory" means: the peak during the loss's forward + backward minus what was
held just before it, i.e. the output weight [V, H], the frozen teacher copy [V, H], the weight's
gradient buffer (pre-allocated, as after the first step of training), hidden states and labels.
- CUDA: torch.cuda.max_memory_allocated() - memory_allocated() before (methods run in turn in
  this process, after one warm-up run each; exact, allocator-level).
- CPU: every method runs in a fresh subprocess with MALLOC_MMAP_THRESHOLD_=65536, so every
  tensor of 64 KiB or more is its own mmap and is returned to the OS when freed: the resident
  set (RSS) then tracks live tensor memory. The subprocess builds its inputs, resets the
  kernel's RSS high-water mark (writing 5 to /proc/self/clear_refs, Linux >= 4.0), runs the
  loss once and reports VmHWM - VmRSS(before). No sampling, so no missed spikes. --rounds
  repeats every method in turn (min time, max memory), as other processes disturb timings. Where
  clear_refs is not writable it falls back to a psutil thread sampling RSS every millisecond
  (a lower bound: said so in the output). Time on CPU is that same single run (plus --repeat
  runs, min taken).
When the head is trained, both paths allocate one [V, H] weight-gradient temporary on top of
the grad buffer (autograd returns the gradient, then accumulates it): that floor is printed as
grad_tmp_mb. --frozen-head measures the LoRA setting (head not trained), where it vanishes.

Targets (issue 8): chunked_ce_kl extra memory <= 1/8 of naive_ce_kl and <= 1.3x chunked_ce;
chunked_ce_kl time <= 1.2x naive_ce_kl.

  python benchmarks/loss_memory.py                       # vocab 256000, hidden 2304, 2048 tokens
  python benchmarks/loss_memory.py --small --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

METHODS = ("naive_ce_kl", "naive_ce", "chunked_ce_kl", "chunked_ce", "chunked_paper")
OBJECTIVES = {
    "chunked_ce_kl": dict(mask_ratio=0.0, distill_weight=1.0, distill_on="all"),
    "chunked_ce": dict(mask_ratio=0.0, distill_weight=0.0),
    "chunked_paper": dict(mask_ratio=0.5, distill_weight=1.0, distill_on="unselected"),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=256000)
    p.add_argument("--hidden", type=int, default=2304)
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument(
        "--chunk-size", type=int, default=1024, help="tokens per chunk (objective.chunk_size)"
    )
    p.add_argument(
        "--dtype", choices=sorted(DTYPES), default="fp32", help="weights and hidden states"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--frozen-head", action="store_true", help="head not trained (LoRA setting)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per method (min is kept)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="CPU: run every method this many times, interleaved, in fresh processes "
        "(min time and max memory kept; evens out load from other processes)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before measuring (CPU)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (torch.set_num_threads; 0: torch's default). On a loaded machine 1 "
        "avoids OpenMP stalls that punish the chunked path's many small kernels",
    )
    p.add_argument(
        "--small", action="store_true", help="CI size: vocab 8192, hidden 256, 512 tokens"
    )
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.small:
        args.vocab, args.hidden, args.tokens = 8192, 256, 512
        args.chunk_size = min(args.chunk_size, 128)
    unknown = set(args.methods.split(",")) - set(METHODS)
    if unknown:
        p.error(f"--methods: unknown {sorted(unknown)}; choose from {', '.join(METHODS)}")
    return args


# ------------------------------------------------------------------------------------------
# Inputs and the methods
# ------------------------------------------------------------------------------------------


def make_inputs(args: argparse.Namespace) -> dict[str, Any]:
    """Weights, teacher copy, grad buffer, hidden states and labels: the memory held before."""
    g = torch.Generator(device=args.device).manual_seed(0)
    dtype, dev = DTYPES[args.dtype], args.device
    std = args.hidden**-0.5
    weight = torch.randn(args.vocab, args.hidden, generator=g, device=dev, dtype=dtype) * std
    teacher_weight = weight + 0.1 * std * torch.randn(
        weight.shape, generator=g, device=dev, dtype=dtype
    )
    weight.requires_grad_(not args.frozen_head)
    if not args.frozen_head:
        weight.grad = torch.zeros_like(weight)
    hidden = torch.randn(1, args.tokens, args.hidden, generator=g, device=dev, dtype=dtype)
    hidden = (hidden * 4).requires_grad_(True)
    teacher_hidden = hidden.detach() + torch.randn(
        hidden.shape, generator=g, device=dev, dtype=dtype
    )
    labels = torch.randint(0, args.vocab, (1, args.tokens), generator=g, device=dev)
    labels[:, : args.tokens // 8] = -100  # a prompt
    return dict(
        weight=weight,
        teacher_weight=teacher_weight,
        hidden=hidden,
        teacher_hidden=teacher_hidden,
        labels=labels,
    )


def naive(inputs: dict[str, Any], with_kl: bool) -> torch.Tensor:
    """Full logits, as most training code does it."""
    h, w, labels = inputs["hidden"][0], inputs["weight"], inputs["labels"][0]
    logits = F.linear(h, w).float()[:-1]
    targets = labels[1:]
    loss = F.cross_entropy(logits, targets, ignore_index=-100)
    if with_kl:
        with torch.no_grad():
            t_logits = F.linear(inputs["teacher_hidden"][0], inputs["teacher_weight"]).float()
            log_p = torch.log_softmax(t_logits[:-1], dim=-1)
        log_q = torch.log_softmax(logits, dim=-1)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
        valid = (targets != -100).float()
        loss = loss + (kl * valid).sum() / valid.sum()
    loss.backward()
    return loss.detach()


def chunked(inputs: dict[str, Any], objective: dict, chunk_size: int) -> torch.Tensor:
    """uapt's chunked path (imported here: measuring the naive path needs no uapt)."""
    from uapt.objectives import OutputHead, token_loss_chunked

    head = OutputHead(inputs["weight"])
    teacher_head = OutputHead(inputs["teacher_weight"])
    result = token_loss_chunked(
        inputs["hidden"],
        inputs["labels"],
        objective,
        head,
        inputs["teacher_hidden"],
        teacher_head,
        chunk_size=chunk_size,
    )
    result.total.backward()
    return result.total.detach()


def run_method(name: str, inputs: dict[str, Any], args: argparse.Namespace) -> float:
    if name.startswith("naive"):
        loss = naive(inputs, with_kl=name == "naive_ce_kl")
    else:
        loss = chunked(inputs, OBJECTIVES[name], args.chunk_size)
    inputs["hidden"].grad = None  # keep only the (pre-allocated) weight grad buffer
    return float(loss)


# ------------------------------------------------------------------------------------------
# Measurement
# ------------------------------------------------------------------------------------------


def free(device: torch.device) -> None:
    """Drop what the last call left: Python's garbage and, on CUDA, the allocator's cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_ms(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """fn's result and its time in ms: CUDA events on a GPU (work is asynchronous), else a clock."""
    if device.type != "cuda":
        t0 = time.perf_counter()
        out = fn()
        return out, (time.perf_counter() - t0) * 1000
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    out = fn()
    end.record()
    torch.cuda.synchronize(device)
    return out, start.elapsed_time(end)


class CpuPeak:
    """Extra peak memory on CPU, exact to the page, no sampling.

    glibc's mmap threshold is lowered to 64 KiB, so every tensor of that size or more is its own
    mapping and goes back to the OS when freed: the resident set then tracks live tensors. Free
    heap memory that earlier work left resident (smaller blocks, or blocks from before the
    threshold was lowered) is given back too (malloc_trim) before the measured call: reused, it
    would hide the call's own memory. The kernel's high-water mark is reset (clear_refs 5), and
    the figure is VmHWM - VmRSS(before). Where either is unavailable (another libc, no /proc)
    `available` is False and no exact figure can be had.
    """

    M_MMAP_THRESHOLD = -3

    def __init__(self) -> None:
        try:
            self.libc = ctypes.CDLL("libc.so.6")
            lowered = self.libc.mallopt(self.M_MMAP_THRESHOLD, 65536)
            self.available = bool(lowered) and self._reset()
        except (OSError, AttributeError):
            self.available = False

    @staticmethod
    def _kb(field_name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{field_name} not in /proc/self/status")

    def _reset(self) -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return self._kb("VmHWM") <= self._kb("VmRSS") + 1024
        except OSError:
            return False

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        out: dict[str, float] = {}
        self.libc.malloc_trim(0)
        self._reset()
        before = self._kb("VmRSS")
        yield out
        out["extra_mb"] = (self._kb("VmHWM") - before) / 1024


class RssSampler:
    """Fallback where CpuPeak is not available: the highest RSS seen by a 1 ms sampler (a lower
    bound of the true peak)."""

    @contextlib.contextmanager
    def measure(self) -> Iterator[dict[str, float]]:
        import psutil

        proc, stop, out = psutil.Process(), threading.Event(), {}
        before, peak = proc.memory_info().rss, [0]

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.001)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        yield out
        stop.set()
        thread.join()
        out["extra_mb"] = (peak[0] - before) / MB


@contextlib.contextmanager
def cuda_peak(device: torch.device) -> Iterator[dict[str, float]]:
    """Extra peak memory of the block: max_memory_allocated - memory_allocated before."""
    out: dict[str, float] = {}
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    yield out
    torch.cuda.synchronize(device)
    out["extra_mb"] = (torch.cuda.max_memory_allocated(device) - before) / MB


def measure(
    run: Callable[[], float],
    device: torch.device,
    repeat: int,
    peak: CpuPeak | RssSampler | None = None,
    warmup: int = 1,
) -> dict[str, Any]:
    """`run` (one loss forward + backward) after `warmup` untimed calls (kernels, allocator,
    thread pools: not the loss's memory): its value, the extra peak memory of the first measured
    call (`memory` says how: CUDA's allocator, or `peak` on CPU; None without either) and the
    times in ms of `repeat` calls."""
    for _ in range(warmup):
        run()
    free(device)
    if device.type == "cuda":
        with cuda_peak(device) as mem:
            loss, first = timed_ms(run, device)
        how = "cuda_max_memory_allocated"
    elif peak is not None and getattr(peak, "available", True):
        with peak.measure() as mem:
            loss, first = timed_ms(run, device)
        how = "cpu_rss_high_water_mark" if isinstance(peak, CpuPeak) else "rss_sampled_lower_bound"
    else:
        mem, how = {}, "not measured: no /proc clear_refs or glibc mallopt here"
        loss, first = timed_ms(run, device)
    times = [first] + [timed_ms(run, device)[1] for _ in range(repeat - 1)]
    return {"loss": loss, "extra_mb": mem.get("extra_mb"), "memory": how, "ms": times}


def measure_cpu_worker(args: argparse.Namespace) -> dict[str, Any]:
    """In a fresh subprocess: one method's extra peak RSS and time."""
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    inputs = make_inputs(args)
    peak = CpuPeak()
    m = measure(
        lambda: run_method(args.worker, inputs, args),
        torch.device("cpu"),
        args.repeat,
        peak if peak.available else RssSampler(),
        warmup=args.warmup,
    )
    how = {"cpu_rss_high_water_mark": "rss_hwm"}.get(m["memory"], m["memory"])
    return dict(
        method=args.worker,
        extra_mb=m["extra_mb"],
        seconds=min(m["ms"]) / 1000,
        loss=m["loss"],
        memory=how,
    )


def measure_cpu(name: str, args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", name]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{name} failed (exit {out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_cuda(name: str, inputs: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    m = measure(lambda: run_method(name, inputs, args), device, args.repeat)
    return dict(
        method=name,
        extra_mb=m["extra_mb"],
        seconds=min(m["ms"]) / 1000,
        loss=m["loss"],
        memory="cuda_max_allocated",
    )


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def ratios(rows: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}

    def put(key: str, a: str, b: str, field: str) -> None:
        if a in rows and b in rows and rows[b][field] > 0:
            out[key] = rows[a][field] / rows[b][field]

    put("mem_chunked_ce_kl/naive_ce_kl", "chunked_ce_kl", "naive_ce_kl", "extra_mb")
    put("mem_chunked_ce_kl/chunked_ce", "chunked_ce_kl", "chunked_ce", "extra_mb")
    put("mem_chunked_ce/naive_ce", "chunked_ce", "naive_ce", "extra_mb")
    put("time_chunked_ce_kl/naive_ce_kl", "chunked_ce_kl", "naive_ce_kl", "seconds")
    put("time_chunked_ce/naive_ce", "chunked_ce", "naive_ce", "seconds")
    return out


TARGETS = {
    "mem_chunked_ce_kl/naive_ce_kl": 1 / 8,
    "mem_chunked_ce_kl/chunked_ce": 1.3,
    "time_chunked_ce_kl/naive_ce_kl": 1.2,
}


def report(rows: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    grad_tmp = (
        0.0
        if args.frozen_head
        else (
            args.vocab
            * args.hidden
            * torch.tensor([], dtype=DTYPES[args.dtype]).element_size()
            / MB
        )
    )
    print(
        f"vocab {args.vocab}  hidden {args.hidden}  tokens {args.tokens}  chunk {args.chunk_size}"
        f"  {args.dtype}  {args.device}  head {'frozen' if args.frozen_head else 'trained'}"
        f"  grad_tmp_mb {grad_tmp:.0f}"
    )
    print(f"{'method':<15}{'extra MB':>12}{'seconds':>10}{'loss':>12}  memory")
    for r in rows.values():
        print(
            f"{r['method']:<15}{r['extra_mb']:>12.1f}{r['seconds']:>10.3f}{r['loss']:>12.6f}"
            f"  {r['memory']}"
        )
    found = ratios(rows)
    for key, value in found.items():
        target = TARGETS.get(key)
        verdict = (
            ""
            if target is None
            else f"  target <= {target:.3g}: " + ("met" if value <= target else "NOT met")
        )
        print(f"{key:<32}{value:>8.3f}{verdict}")
    return dict(
        config={k: v for k, v in vars(args).items() if k != "worker"},
        grad_tmp_mb=grad_tmp,
        results=list(rows.values()),
        ratios=found,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(measure_cpu_worker(args)))
        return 0
    methods = args.methods.split(",")
    rows: dict[str, dict[str, Any]] = {}
    if args.device.startswith("cuda"):
        inputs = make_inputs(args)
        for name in methods:
            rows[name] = measure_cuda(name, inputs, args)
    else:
        for _ in range(args.rounds):
            for name in methods:
                row = measure_cpu(name, args, argv)
                if name in rows:
                    row["seconds"] = min(row["seconds"], rows[name]["seconds"])
                    row["extra_mb"] = max(row["extra_mb"], rows[name]["extra_mb"])
                rows[name] = row
    summary = report(rows, args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
