"""Cached teacher (`objective.teacher=cached`): how far its top-k KL is from the exact KL.

The cache keeps, per token, the teacher's k most likely tokens and the mass of the rest, so the
distillation term compares teacher and student over k + 1 buckets: a lower bound of the exact
KL(P || Q). Measured per token on real rows as uapt tokenises them, with the teacher = the
initial model and the student = the same model after a few plain-MLE steps on those data
(trained here with uapt-train; reused when present): the exact and cached KL, their ratio, the
teacher's mass outside its top k, and the cosine between the two gradients w.r.t. the student's
logits (what training follows).

    python benchmarks/teacher_topk_gap.py            # SmolLM2-135M-Instruct, real GSM8K rows
    python benchmarks/teacher_topk_gap.py --quick    # the tiny model on the synthetic task
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    REPO,
    compose,
    load_average,
    log,
    machine_info,
    parser,
    set_threads,
    setup_env,
    subprocess_env,
    table,
    write_json,
)

DATA = Path(os.environ.get("UAPT_DATA", REPO.parent / "shared" / "data"))
FULL = {
    "model": "smollm2_135m",
    "data": [
        "dataset=gsm8k",
        f"dataset.source={DATA / 'gsm8k' / 'train.jsonl'}",
        "dataset.max_length=384",
    ],
    "student": ["trainer.max_steps=4", "trainer.batch_size=4", "trainer.lr=1e-4"],
    "rows": 32,
    "ks": [16, 64, 256],
}
QUICK = {
    "model": "tiny",
    "data": ["dataset=arith", "dataset.num_train=64"],
    "student": ["trainer.max_steps=4", "trainer.batch_size=4", "trainer.lr=1e-3"],
    "rows": 8,
    "ks": [4, 16, 64],
}
BATCH = 4


def train_student(sizes: dict[str, Any], out: Path) -> Path:
    """The student: a few plain-MLE steps from the teacher's weights (a uapt-train run)."""
    runs = out / "student_runs"
    overrides = [
        f"model={sizes['model']}",
        *sizes["data"],
        *sizes["student"],
        "dataset.val_size=4",
        "objective=mle",
        "trainer.micro_batch_size=4",
        "trainer.warmup_steps=1",
        "eval=none",
        "logger=none",
        f"runs_dir={runs}",
    ]
    cmd = [sys.executable, "-m", "uapt.train", *overrides]
    log("teacher_topk_gap: training the student: uapt-train " + " ".join(overrides))
    subprocess.run(cmd, cwd=REPO, env=subprocess_env(), check=True, capture_output=True)
    from uapt.inputs import with_fingerprints
    from uapt.records import run_dir

    # the run's id covers its local inputs' contents (the data file), as uapt-train computes it
    return run_dir(with_fingerprints(compose(overrides))) / "model"  # a second call finds it


def teacher_and_student(sizes: dict[str, Any], student_path: Path):
    import torch

    from uapt.data import build_datasets
    from uapt.models import load_model, load_tokenizer

    cfg = compose([f"model={sizes['model']}", *sizes["data"], "dataset.val_size=4"])
    tokenizer = load_tokenizer(cfg["model"], cfg["cache_dir"])
    train_set, _, _ = build_datasets(cfg["dataset"], tokenizer, cfg["seed"], cfg["cache_dir"])
    cpu = torch.device("cpu")
    torch.manual_seed(cfg["seed"])  # the tiny model's initial weights, as uapt-train makes them
    teacher = load_model(cfg["model"], tokenizer, cfg["cache_dir"], cpu).eval()
    student_cfg = {**cfg["model"], "path": str(student_path), "source": "hub"}
    student = load_model(student_cfg, tokenizer, cfg["cache_dir"], cpu).eval()
    rows = [train_set[i] for i in range(min(sizes["rows"], len(train_set)))]
    return teacher, student, rows, tokenizer.pad_token_id


def measure(teacher, student, rows, pad_id: int, ks: list[int]) -> dict[str, Any]:
    import torch

    from uapt.data import collate
    from uapt.objectives import cached_buckets, divergence_rows, teacher_topk, valid_mask

    sums = {k: {"cached": 0.0, "rest": 0.0, "cos": 0.0} for k in ks}
    exact_sum, tokens = 0.0, 0
    for start in range(0, len(rows), BATCH):
        batch = collate(rows[start : start + BATCH], pad_id)
        valid = valid_mask(batch["labels"])
        b, t = valid.nonzero(as_tuple=True)
        with torch.no_grad():
            kw = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
            p_logits = teacher(**kw).logits[b, t - 1].double()
            q_logits = student(**kw).logits[b, t - 1].double()
        targets = batch["labels"][b, t]
        log_p, log_q = p_logits.log_softmax(-1), q_logits.log_softmax(-1)
        exact = divergence_rows(log_p, log_q, "forward_kl", 0.5)
        exact_grad = log_q.exp() - log_p.exp()  # d KL(P||Q) / d student logits
        exact_sum, tokens = exact_sum + float(exact.sum()), tokens + len(targets)
        for k in ks:
            cache = teacher_topk(p_logits, targets, k)
            z = q_logits.clone().requires_grad_()
            log_pb, log_qb = cached_buckets(z.log_softmax(-1), cache)
            approx = divergence_rows(log_pb, log_qb, "forward_kl", 0.5)
            (grad,) = torch.autograd.grad(approx.sum(), z)
            cos = torch.nn.functional.cosine_similarity(grad, exact_grad, dim=-1)
            sums[k]["cached"] += float(approx.detach().sum())
            sums[k]["rest"] += float(cache.rest.exp().sum())
            sums[k]["cos"] += float(cos.sum())
    results = []
    for k in ks:
        s = sums[k]
        results.append(
            {
                "k": k,
                "kl_exact": exact_sum / tokens,
                "kl_cached": s["cached"] / tokens,
                "ratio": s["cached"] / exact_sum,
                "teacher_rest_mass": s["rest"] / tokens,
                "grad_cosine": s["cos"] / tokens,
            }
        )
    return {"tokens": tokens, "results": results}


def render(payload: dict[str, Any]) -> str:
    rows = [
        [
            r["k"],
            f"{r['kl_exact']:.4g}",
            f"{r['kl_cached']:.4g}",
            f"{r['ratio']:.3f}",
            f"{r['teacher_rest_mass']:.3g}",
            f"{r['grad_cosine']:.3f}",
        ]
        for r in payload["results"]
    ]
    head = ["k", "exact KL / token", "cached KL / token", "cached / exact"]
    head += ["teacher mass outside top-k", "gradient cosine"]
    return "\n".join(
        [
            f"{payload['model']} on {payload['dataset']}: {payload['tokens']} tokens of "
            f"{payload['rows']} training rows; student = {payload['student']}",
            table(head, rows),
        ]
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--student", type=Path, default=None, help="a saved student model folder")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "benchmarks" / "topk_gap")
    args = p.parse_args(argv)
    setup_env()
    set_threads(args.threads)
    sizes = QUICK if args.quick else FULL
    out = args.out / ("quick" if args.quick else "full")
    student = args.student or train_student(sizes, out)
    teacher, student_model, rows, pad_id = teacher_and_student(sizes, student)
    log(f"teacher_topk_gap: {len(rows)} rows, k in {sizes['ks']}")
    payload = {
        "benchmark": "teacher_topk_gap",
        "quick": args.quick,
        "machine": machine_info("cpu"),
        "load_average_after": None,
        "model": sizes["model"],
        "dataset": " ".join(sizes["data"]),
        "rows": len(rows),
        "student": f"{student} ({' '.join(sizes['student'])} of objective=mle)",
        **measure(teacher, student_model, rows, pad_id, sizes["ks"]),
    }
    payload["load_average_after"] = load_average()
    print(render(payload))
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
