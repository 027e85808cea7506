"""Generated samples per second of evaluation: uapt's greedy loop vs today's path vs a plain
`model.generate` loop, on the real-data suite, with the compute-bound estimate beside them.

Three ways to generate the answers of `eval=repro_real` (lm-eval's gsm8k and ifeval tasks on the
local GSM8K and IFEval files, SmolLM2-135M-Instruct, batch 32, greedy), on the same prompts:

- **fast**: `uapt.evaluation.evaluate_lm` with `UaptLM(generator="fast")`, what a run does now
  (`eval.generate=fast`): uapt's greedy loop (uapt.evaluation.generate);
- **today**: the same with `generator="hf"`: lm-eval's HFLM calling `model.generate` with its
  stop-sequence criteria, what every run did before;
- **plain**: `model.generate` by hand on lm-eval's prompts (the same batches: sorted by length,
  `batch_size` at a time), greedy, `max_gen_toks` new tokens, stopping at the end-of-sequence
  token only (no stop sequences, no lm-eval): what a hand-written loop costs.

Rounds interleave fast, today, plain; ratios are taken per round (paired). Per task: generated
samples/s, tokens/s (the tokens of the kept outputs: up to a row's end-of-sequence token or the
token completing its stop sequence; the same count for fast and today, whose outputs are the same;
plain counts its own until its end-of-sequence token), the token positions each path actually ran
through the model (prefill and decoding: padding and finished rows included), and the
compute-bound estimate: 2 x (the model's linear weights) x (prompt + generated tokens) FLOPs over
the throughput of the model's own matrix products at decode shape (batch rows), measured in the
same run (attention, ~4 % of the FLOPs here, is left out).

The outputs are compared: per sample, fast vs today (and the per-sample outcomes and scores);
each differing sample's first differing token is checked for a near tie (generate.difference,
generate.NEAR_TIE).

`--profile TASK` instead profiles one task's generation by today's path and by the loop
(torch.profiler, benchmarks/generation_profile.py): where the time goes, for docs/performance.md.

    python benchmarks/eval_generation.py                    # SmolLM2, eval=repro_real, 3 rounds
    python benchmarks/eval_generation.py --quick --json /tmp/gen.json
    python benchmarks/eval_generation.py --profile ifeval   # the profile of one task
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
    write_json,
)

TARGET = 2.0  # fast / today generated samples/s on SmolLM2, the real-data suite (issue 26)
PATHS = ("fast", "today", "plain")
LM_PATHS = ("fast", "today")  # the two that run through lm-eval
CLOCKS = ("cpu", "wall")  # process CPU seconds (one thread) and wall seconds: see Clock
# (model, samples per task, max generated tokens per task (None: the suite's), timed rounds)
FULL = {"model": "smollm2_135m", "limit": None, "max_gen_toks": None, "rounds": 3}
QUICK = {"model": "tiny", "limit": 3, "max_gen_toks": 8, "rounds": 1}


def suite_node(sizes: dict[str, Any]) -> dict[str, Any]:
    """eval=repro_real at the benchmark's sizes, its outputs logged (they are compared)."""
    node = compose(["eval=repro_real", "logger=none"])["eval"]
    tasks = []
    for task in node["tasks"]:
        task = dict(task)
        if sizes["limit"]:
            task["limit"] = sizes["limit"]
        if sizes["max_gen_toks"]:
            task["max_gen_toks"] = sizes["max_gen_toks"]
        tasks.append(task)
    return {**node, "tasks": tasks, "log_samples": True}


class Recorder:
    """Spies on an lm's _model_generate: each row's generated ids by its unpadded prompt ids."""

    def __init__(self, lm: Any) -> None:
        self.ids: dict[tuple[int, ...], list[int]] = {}
        inner = lm._model_generate

        def spy(context, max_length, stop, **kwargs):
            out = inner(context, max_length, stop, **kwargs)
            for row, mask, ids in zip(context, kwargs["attention_mask"], out, strict=True):
                self.ids[tuple(row[mask.bool()].tolist())] = ids[context.shape[1] :].tolist()
            return out

        lm._model_generate = spy


class Clock:
    """Process CPU seconds and wall seconds of a block. With one thread, the CPU seconds are what
    the wall clock of an idle machine would show; on a shared one the wall clock adds the time
    spent waiting for a core, which varies from call to call (CLOCKS)."""

    def __enter__(self) -> Clock:
        self.started = (time.process_time(), time.perf_counter())
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = {
            "cpu": time.process_time() - self.started[0],
            "wall": time.perf_counter() - self.started[1],
        }


class Timer:
    """Seconds an lm spends in generate_until (the generation, without lm-eval's task building
    and scoring), per call: {"cpu": s, "wall": s}."""

    def __init__(self, lm: Any) -> None:
        self.seconds: list[dict[str, float]] = []
        inner = lm.generate_until

        def timed(requests, disable_tqdm=False):
            with Clock() as clock:
                out = inner(requests, disable_tqdm=disable_tqdm)
            self.seconds.append(clock.seconds)
            return out

        lm.generate_until = timed


class Positions:
    """Token positions run through the model (every forward call's input ids), per phase."""

    def __init__(self, model: Any) -> None:
        self.count = {"prefill": 0, "decode": 0}
        model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module: Any, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            self.count["decode" if ids.shape[-1] == 1 else "prefill"] += ids.numel()

    def take(self) -> dict[str, int]:
        out, self.count = dict(self.count), {"prefill": 0, "decode": 0}
        return out


def kept_length(ids: list[int], pad: int, eos: set[int]) -> int:
    """Generated tokens a row kept: through its end-of-sequence token, else up to its padding."""
    for i, t in enumerate(ids):
        if t in eos:
            return i + 1
    end = len(ids)
    while end and ids[end - 1] == pad:
        end -= 1
    return end


def capture_requests(model: Any, tokenizer: Any, node: dict[str, Any]) -> dict[str, list]:
    """Each task's generate_until requests (prompt, generation kwargs), as lm-eval makes them."""
    from uapt.evaluation import evaluate_lm
    from uapt.evaluation.generate import UaptLM

    lm = UaptLM(pretrained=model, tokenizer=tokenizer, batch_size=node["batch_size"])
    found: dict[str, list] = {}

    def record(requests, disable_tqdm=False):
        found[requests[0].task_name] = [r.args for r in requests]
        return [""] * len(requests)

    lm.generate_until = record
    evaluate_lm(lm, {**node, "log_samples": False})
    return found


def plain_loop(model: Any, lm: Any, requests: list, batch_size: int) -> list[list[int]]:
    """model.generate by hand on lm-eval's prompts and batches: the generated ids per prompt."""
    import torch

    prompts = sorted((context for context, _ in requests), key=lambda c: -len(lm.tok_encode(c)))
    max_new = requests[0][1]["max_gen_toks"]
    outputs = []
    for start in range(0, len(prompts), batch_size):
        ids, mask = lm.tok_batch_encode(prompts[start : start + batch_size])
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=max_new,
                do_sample=False,
                pad_token_id=lm.tokenizer.pad_token_id,
            )
        outputs += out[:, ids.shape[1] :].tolist()
    return outputs


def matmul_throughput(model: Any, rows: int, repeats: int = 3) -> float:
    """FLOP/s of the model's linear layers on `rows` rows (one decoding step's products)."""
    import torch

    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    x = {m.in_features: torch.randn(rows, m.in_features) for m in linears}
    flops = sum(2 * rows * m.in_features * m.out_features for m in linears)
    best = float("inf")
    with torch.no_grad():
        for _ in range(repeats):
            with Clock() as clock:
                for m in linears:
                    m(x[m.in_features])
            best = min(best, clock.seconds["cpu"])
    return flops / best


def linear_weights(model: Any) -> tuple[int, int]:
    """(weights of the linear layers before the output layer, weights of the output layer)."""
    import torch

    head = model.get_output_embeddings()
    body = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and m is not head
    )
    return body, head.weight.numel()


class Bench:
    """The model, the suite's requests and the three paths' LMs, spied on."""

    def __init__(self, sizes: dict[str, Any]) -> None:
        import torch

        from uapt.evaluation.generate import ExactSizes, UaptLM
        from uapt.models import load_model, load_tokenizer

        cfg = compose([f"model={sizes['model']}", "logger=none"])
        self.tokenizer = load_tokenizer(cfg["model"], cfg["cache_dir"])
        model = load_model(cfg["model"], self.tokenizer, cfg["cache_dir"], torch.device("cpu"))
        self.model = model.eval()
        self.node = suite_node(sizes)
        self.requests = capture_requests(self.model, self.tokenizer, self.node)
        self.tasks = [t["name"] for t in self.node["tasks"]]
        batch = self.node["batch_size"]
        self.lms = {
            p: UaptLM(pretrained=self.model, tokenizer=self.tokenizer, batch_size=batch,
                      generator="hf" if p == "today" else "fast")
            for p in PATHS
        }  # fmt: skip
        self.recorders = {p: Recorder(self.lms[p]) for p in LM_PATHS}
        self.timers = {p: Timer(self.lms[p]) for p in LM_PATHS}
        self.positions = Positions(self.model)
        with Clock() as clock:
            ExactSizes(self.model, batch).exact(1)  # the loop's one-off BLAS probe, per process
        self.probe_s = clock.seconds["cpu"]
        # seconds by clock, path and task: the generation alone, and with lm-eval around it
        self.gen_s = {c: {p: {t: [] for t in self.tasks} for p in PATHS} for c in CLOCKS}
        self.eval_s = {c: {p: {t: [] for t in self.tasks} for p in LM_PATHS} for c in CLOCKS}
        self.ran: dict[str, dict[str, dict[str, int]]] = {p: {} for p in PATHS}
        self.scores: dict[str, dict[str, Any]] = {"fast": {}, "today": {}}
        self.plain_ids: dict[str, list] = {}

    def run(self, path: str, task: str, out_dir: Path) -> None:
        """One task by one path, timed; its outputs under out_dir (fast, today)."""
        from uapt.evaluation import evaluate_lm

        if path == "plain":
            with Clock() as clock:
                self.plain_ids[task] = plain_loop(
                    self.model, self.lms[path], self.requests[task], self.node["batch_size"]
                )
            generation = clock.seconds
        else:
            one = {**self.node, "tasks": [t for t in self.node["tasks"] if t["name"] == task]}
            with Clock() as clock:
                out = evaluate_lm(self.lms[path], one, out_dir=out_dir / path / task)
            generation = self.timers[path].seconds.pop()
            for c in CLOCKS:
                self.eval_s[c][path][task].append(clock.seconds[c])
            self.scores[path][task] = out["eval"][task]
        for c in CLOCKS:
            self.gen_s[c][path][task].append(generation[c])
        self.ran[path][task] = self.positions.take()

    def differences(self, task: str, out_dir: Path) -> list[dict[str, Any]]:
        """The samples whose output differs (fast vs today), each with its first differing
        token and the reference's logit margin there."""
        from uapt.evaluation.generate import difference

        theirs, ours = (
            _responses(out_dir / p / task / "eval_samples" / f"{task}.jsonl")
            for p in ("today", "fast")
        )
        found = []
        for i, (context, _) in enumerate(self.requests[task]):
            if ours[context] == theirs[context]:
                continue
            prompt = tuple(self.lms["fast"].tok_encode(context))
            mine, ref = self.recorders["fast"].ids[prompt], self.recorders["today"].ids[prompt]
            end = kept_length(mine, self.tokenizer.pad_token_id, self.eos)
            # a row whose text differs where its kept ids do not: not a rounding flip
            departs = difference(self.model, prompt, ref[:end], mine[:end])
            found.append(
                {"doc": i, **(departs or {"token": None, "margin": None, "near_tie": False})}
            )
        return found

    @property
    def eos(self) -> set[int]:
        from uapt.evaluation.generate import eos_token_ids

        return set(eos_token_ids(self.model, self.tokenizer))

    def summary(self, task: str, out_dir: Path, throughput: float) -> dict[str, Any]:
        pad, eos = self.tokenizer.pad_token_id, self.eos
        prompts = [tuple(self.lms["fast"].tok_encode(c)) for c, _ in self.requests[task]]
        kept = sum(kept_length(self.recorders["fast"].ids[p], pad, eos) for p in prompts)
        plain_kept = sum(kept_length(ids, pad, eos) for ids in self.plain_ids[task])
        max_gen = self.requests[task][0][1]["max_gen_toks"]
        at_max = sum(
            kept_length(self.recorders["fast"].ids[p], pad, eos) >= max_gen for p in prompts
        )
        n, prompt_tokens = len(prompts), sum(len(p) for p in prompts)
        body, head = linear_weights(self.model)
        flops = 2 * body * (prompt_tokens + kept) + 2 * head * (kept + n)
        fast, today = (out_dir / p / task / "eval_outcomes.jsonl" for p in LM_PATHS)
        gen = {c: {p: self.gen_s[c][p][task] for p in PATHS} for c in CLOCKS}
        evaluation = {c: {p: self.eval_s[c][p][task] for p in LM_PATHS} for c in CLOCKS}
        tokens = {"fast": kept, "today": kept, "plain": plain_kept}
        return {
            "task": task,
            "samples": n,
            "max_gen_toks": max_gen,
            "prompt_tokens": prompt_tokens,
            "kept_tokens": kept,
            "plain_kept_tokens": plain_kept,
            "rows_at_max_gen_toks": at_max,
            "generation_s": gen,
            "evaluation_s": evaluation,
            "positions_run": {p: self.ran[p][task] for p in PATHS},
            **rates(n, gen, evaluation, tokens, target=None),
            "bound": {
                "flops": flops,
                "seconds": flops / throughput,
                "samples_per_s": n * throughput / flops,
            },
            "outputs": {
                "differing": self.differences(task, out_dir),
                "outcomes_equal": fast.read_text() == today.read_text(),
                "scores_equal": self.scores["fast"][task] == self.scores["today"][task],
            },
        }


def rates(
    n: int,
    gen: dict[str, dict[str, list[float]]],
    evaluation: dict[str, dict[str, list[float]]],
    tokens: dict[str, int] | None,
    target: float | None,
) -> dict[str, Any]:
    """Samples/s (and tokens/s) per path and the paired ratios, by CPU seconds; the wall-clock
    ratios beside them."""
    cpu = gen["cpu"]
    out: dict[str, Any] = {
        "samples_per_s": {p: Spread.of(n / s for s in cpu[p]).as_dict() for p in PATHS},
        "ratio_fast_over_today": ratio_summary(cpu["today"], cpu["fast"], target, True),
        "ratio_fast_over_plain": ratio_summary(cpu["plain"], cpu["fast"], None, True),
        "ratio_today_over_plain": ratio_summary(cpu["plain"], cpu["today"], None, True),
        "ratio_evaluation_fast_over_today": ratio_summary(
            evaluation["cpu"]["today"], evaluation["cpu"]["fast"], None, True
        ),
        "wall": {
            "ratio_fast_over_today": ratio_summary(
                gen["wall"]["today"], gen["wall"]["fast"], None, True
            ),
            "ratio_fast_over_plain": ratio_summary(
                gen["wall"]["plain"], gen["wall"]["fast"], None, True
            ),
        },
    }
    if tokens is not None:
        out["tokens_per_s"] = {p: Spread.of(tokens[p] / s for s in cpu[p]).as_dict() for p in PATHS}
    return out


def measure(sizes: dict[str, Any], rounds: int) -> dict[str, Any]:
    bench = Bench(sizes)
    with tempfile.TemporaryDirectory(prefix="uapt-bench-gen-") as tmp:
        for r in range(rounds):
            for path in PATHS:
                log(f"round {r + 1}/{rounds}: {path}")
                for task in bench.tasks:  # one task at a time: its positions and seconds apart
                    bench.run(path, task, Path(tmp))
        throughput = matmul_throughput(bench.model, bench.node["batch_size"])
        per_task = [bench.summary(t, Path(tmp), throughput) for t in bench.tasks]

    def summed(table: dict[str, dict[str, dict[str, list[float]]]], paths) -> dict:
        return {
            c: {
                p: [sum(table[c][p][t][r] for t in bench.tasks) for r in range(rounds)]
                for p in paths
            }
            for c in CLOCKS
        }

    n = sum(t["samples"] for t in per_task)
    gen, evaluation = summed(bench.gen_s, PATHS), summed(bench.eval_s, LM_PATHS)
    differing = [d for t in per_task for d in t["outputs"]["differing"]]
    return {
        "model": sizes["model"],
        "suite": bench.node["name"],
        "batch_size": bench.node["batch_size"],
        "rounds": rounds,
        "probe_s": bench.probe_s,
        "matmul_gflops": throughput / 1e9,
        "linear_weights": dict(zip(("body", "head"), linear_weights(bench.model), strict=True)),
        "tasks": per_task,
        "total": {
            "samples": n,
            "generation_s": gen,
            "evaluation_s": evaluation,
            **rates(n, gen, evaluation, None, TARGET),
            "bound_samples_per_s": n / sum(t["bound"]["seconds"] for t in per_task),
            "differing_samples": len(differing),
            "all_differences_near_ties": all(d["near_tie"] for d in differing),
        },
    }


def _responses(path: Path) -> dict[str, Any]:
    """A samples file's raw outputs by prompt."""
    import json

    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["arguments"][0][0]: row["resps"] for row in rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="model config (default smollm2_135m; quick tiny)")
    p.add_argument("--limit", type=int, default=None, help="samples per task (default: suite's)")
    p.add_argument("--profile", default=None, metavar="TASK", help="profile one task instead")
    args = p.parse_args(argv)
    setup_env()
    set_threads(args.threads)
    sizes = dict(QUICK if args.quick else FULL)
    if args.model:
        sizes["model"] = args.model
    if args.limit:
        sizes["limit"] = args.limit
    if args.profile:
        from generation_profile import profile, render_profile

        found = profile(sizes, args.profile)
        print(render_profile(found))
        write_json(args.json, {"benchmark": "eval_generation_profile", "profile": found})
        return found
    rounds = args.rounds or sizes["rounds"]
    load_before = load_average()
    log(f"eval_generation: {sizes['model']}, eval=repro_real, {rounds} rounds")
    result = measure(sizes, rounds)
    payload = {
        "benchmark": "eval_generation",
        "quick": args.quick,
        "machine": machine_info("cpu"),
        "load_average_after": load_average(),
        "results": [result],
    }
    payload["contention"] = contention_note(load_before, payload["load_average_after"])
    print(render(payload))
    write_json(args.json, payload)
    return payload


def render(payload: dict[str, Any]) -> str:
    (r,) = payload["results"]
    rows = []
    for t in [*r["tasks"], {"task": "suite", **r["total"]}]:
        sps = t["samples_per_s"]
        bound = t["bound"]["samples_per_s"] if "bound" in t else t["bound_samples_per_s"]
        differing = t["outputs"]["differing"] if "outputs" in t else [None] * t["differing_samples"]
        rows.append(
            [
                t["task"],
                t["samples"],
                fmt_spread(sps["fast"]),
                fmt_spread(sps["today"]),
                fmt_spread(sps["plain"]),
                f"{bound:.3g}",
                fmt_spread(t["ratio_fast_over_today"]),
                fmt_spread(t["ratio_fast_over_plain"]),
                fmt_spread(t["ratio_evaluation_fast_over_today"]),
                fmt_spread(t["wall"]["ratio_fast_over_today"]),
                len(differing),
            ]
        )
    headers = [
        "task",
        "samples",
        "fast samples/s",
        "today samples/s",
        "plain samples/s",
        "compute-bound samples/s",
        "fast / today",
        "fast / plain",
        "fast / today, whole evaluation",
        "fast / today, wall clock",
        "outputs differing",
    ]
    lines = [table(headers, rows), ""]
    lines.append(
        f"{r['model']}, batch {r['batch_size']}, {r['rounds']} rounds; samples/s of generation "
        f"(lm-eval's generate_until; plain: model.generate) by process CPU seconds (one thread; "
        f"the wall-clock ratio beside them); matrix products at decode shape: "
        f"{r['matmul_gflops']:.1f} GFLOP/s; the loop's BLAS probe (once per process): "
        f"{r['probe_s']:.1f} s"
    )
    for t in r["tasks"]:
        ran, tps = t["positions_run"], t["tokens_per_s"]
        lines.append(
            f"{t['task']}: {t['kept_tokens']} tokens kept ({t['rows_at_max_gen_toks']} of "
            f"{t['samples']} rows at max_gen_toks={t['max_gen_toks']}), {t['prompt_tokens']} "
            f"prompt tokens; tokens/s fast {fmt_spread(tps['fast'])}, today "
            f"{fmt_spread(tps['today'])}, plain {fmt_spread(tps['plain'])} "
            f"({t['plain_kept_tokens']} tokens); positions run, prefill + decoding: fast "
            f"{ran['fast']['prefill']} + {ran['fast']['decode']}, today {ran['today']['prefill']} "
            f"+ {ran['today']['decode']}, plain {ran['plain']['prefill']} + "
            f"{ran['plain']['decode']}; outcomes equal: {t['outputs']['outcomes_equal']}, scores "
            f"equal: {t['outputs']['scores_equal']}"
        )
    if payload["contention"]:
        lines.append(payload["contention"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
