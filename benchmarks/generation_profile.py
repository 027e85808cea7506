"""Where one task's generation time goes (`python benchmarks/eval_generation.py --profile TASK`):
today's path and uapt's loop under torch.profiler, forward seconds by phase, and how far float
rounding moves a logit when the batch around a prompt changes (what generate.NEAR_TIE must exceed).
"""

from __future__ import annotations

import time
from typing import Any

from common import compose
from eval_generation import Clock, capture_requests, suite_node


class Forwards:
    """CPU seconds in the model's forward calls: prefill (several positions a row) and decoding."""

    def __init__(self, model: Any) -> None:
        self.seconds = {"prefill": 0.0, "decode": 0.0}
        self.steps, self.rows = 0, 0
        self.handles = [
            model.register_forward_pre_hook(self.start, with_kwargs=True),
            model.register_forward_hook(self.stop, with_kwargs=True),
        ]

    def start(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.started = time.process_time()

    def stop(self, module: Any, args: tuple, kwargs: dict, out: Any) -> None:
        ids = kwargs["input_ids"]
        phase = "decode" if ids.shape[-1] == 1 else "prefill"
        self.seconds[phase] += time.process_time() - self.started
        if phase == "decode":
            self.steps, self.rows = self.steps + 1, self.rows + ids.shape[0]


def profile(sizes: dict[str, Any], task: str) -> dict[str, Any]:
    """One task's generation by today's path and by the loop, each under torch.profiler: CPU
    seconds (one thread: an idle machine's wall clock), forward seconds by phase, decoding steps
    and rows, and the operators' shares; then the logits' rounding across batch shapes."""
    import torch
    from lm_eval.api.instance import Instance
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from uapt.evaluation.generate import UaptLM
    from uapt.models import load_model, load_tokenizer

    node = suite_node(sizes)
    cfg = compose([f"model={sizes['model']}", "logger=none"])
    tokenizer = load_tokenizer(cfg["model"], cfg["cache_dir"])
    model = load_model(cfg["model"], tokenizer, cfg["cache_dir"], torch.device("cpu")).eval()
    requests = capture_requests(model, tokenizer, node)[task]
    out: dict[str, Any] = {"task": task, "samples": len(requests), "paths": {}}
    for path, generator in (("today", "hf"), ("fast", "fast")):
        lm = UaptLM(pretrained=model, tokenizer=tokenizer, batch_size=node["batch_size"],
                    generator=generator)  # fmt: skip
        forwards = Forwards(model)
        reqs = [Instance("generate_until", {}, args, i) for i, args in enumerate(requests)]
        with Clock() as clock, torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            lm.generate_until(reqs, disable_tqdm=True)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:8]
        out["paths"][path] = {
            "cpu_s": clock.seconds["cpu"],
            "forward_s": dict(forwards.seconds),
            "decode_steps": forwards.steps,
            "mean_rows_per_step": forwards.rows / max(forwards.steps, 1),
            "op_share": {e.key: e.self_cpu_time_total / total for e in top},
        }
        for handle in forwards.handles:
            handle.remove()
    out["rounding"] = rounding(model, lm, [context for context, _ in requests[:ROUNDING_PROMPTS]])
    return out


ROUNDING_PROMPTS = 4  # prompts whose logits are compared across batch shapes (seconds each)


def rounding(model: Any, lm: Any, prompts: list[str]) -> dict[str, float]:
    """How far float rounding moves a logit when the batch around a prompt changes: each prompt's
    last-position logits in the left-padded batch of all `prompts` vs alone (other shapes, other
    BLAS kernels, the same arithmetic). generate.NEAR_TIE must stay well above it."""
    import torch

    ids, mask = lm.tok_batch_encode(prompts)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # as model.generate makes them
    with torch.no_grad():
        batched = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1]
        alone = torch.cat(
            [model(input_ids=torch.tensor([lm.tok_encode(p)])).logits[:, -1] for p in prompts]
        )
    return {
        "max_abs_logit_change": float((batched - alone).abs().max()),
        "max_abs_logit": float(alone.abs().max()),
    }


def render_profile(found: dict[str, Any]) -> str:
    lines = [f"profile: {found['task']}, {found['samples']} samples"]
    for path, p in found["paths"].items():
        f = p["forward_s"]
        shares = ", ".join(f"{k.removeprefix('aten::')} {v:.0%}" for k, v in p["op_share"].items())
        lines.append(
            f"{path}: {p['cpu_s']:.1f} CPU s; prefill {f['prefill']:.1f} s, decoding {f['decode']:.1f} "
            f"s over {p['decode_steps']} steps ({p['mean_rows_per_step']:.1f} rows a step, "
            f"{1000 * f['decode'] / max(p['decode_steps'], 1):.0f} ms a step), outside the model "
            f"{p['cpu_s'] - f['prefill'] - f['decode']:.1f} s; operators: {shares}"
        )
    r = found["rounding"]
    lines.append(
        f"rounding: {ROUNDING_PROMPTS} prompts' logits batched vs alone differ by up to "
        f"{r['max_abs_logit_change']:.1e} (|logit| up to {r['max_abs_logit']:.0f})"
    )
    return "\n".join(lines)
