"""In-process evaluation vs the lm-eval command line, on the same model and the same task.

In-process: `uapt.evaluation.run_suite` on the model already in memory (what uapt-train does
after training), with the embedded suite's builtin `arith` task. Command line: `lm-eval run
--model hf --model_args pretrained=<saved folder>` as a subprocess, on the same task written
as a task YAML (lm-eval's gsm8k config with the same held-out problems as local JSONL files
and the same prompt), with the same limit, batch size, generation length, chat template and
seeds. Wall time of the subprocess includes interpreter start, imports, lm-eval's task index
and the model load: the costs that evaluating in-process avoids. The scores of both sides are
compared too, and so are the generations themselves (greedy decoding: they must agree).

Calls are interleaved (command line, in-process, command line, ...). The first in-process call
is reported apart as "cold": it imports lm-eval and indexes the task, once per process.

    python benchmarks/eval_inprocess.py                  # SmolLM2-135M-Instruct
    python benchmarks/eval_inprocess.py --quick --json /tmp/eval.json
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
    write_json,
)

CLI_TASK = "uapt_arith_cli"
# (model, limit, size of the generated task, max_gen_toks, timed rounds)
FULL = {"model": "smollm2_135m", "limit": 8, "size": 64, "max_gen_toks": 96, "rounds": 3}
QUICK = {"model": "tiny", "limit": 2, "size": 8, "max_gen_toks": 8, "rounds": 1}


def suite(sizes: dict[str, Any]) -> dict[str, Any]:
    """The embedded suite reduced to its `arith` task, at the benchmark's sizes."""
    node = compose(["eval=embedded", "logger=none"])["eval"]
    arith = next(t for t in node["tasks"] if t["name"] == "arith")
    arith = {**arith, "size": sizes["size"], "max_gen_toks": sizes["max_gen_toks"]}
    # log_samples: both sides write their generations, which are compared
    return {**node, "tasks": [arith], "limit": sizes["limit"], "log_samples": True}


def write_cli_task(folder: Path, arith: dict[str, Any]) -> Path:
    """The builtin arith task as a task YAML lm-eval's command line can load: lm-eval's gsm8k
    config (what uapt builds `arith` from) with the same problems as local JSONL files."""
    import lm_eval.tasks

    from uapt.evaluation import arith_dataset

    data = arith_dataset(size=arith["size"], seed=arith["seed"])
    files = {}
    for split in ("train", "test"):
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in data[split].to_list()))
        files[split] = str(path)
    task = {
        "include": str(Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml"),
        "task": CLI_TASK,
        "dataset_path": "json",
        "dataset_name": None,
        "dataset_kwargs": {"data_files": files},
        "doc_to_text": "{{question}}",
        "num_fewshot": arith.get("num_fewshot") or 0,
        "metadata": {"version": 1.0},
    }
    yaml_path = folder / f"{CLI_TASK}.yaml"
    yaml_path.write_text(json.dumps(task, indent=2))  # JSON is YAML
    return yaml_path


def cli_command(
    model_dir: Path, task_dir: Path, out_dir: Path, node: dict[str, Any], device
) -> list[str]:
    arith = node["tasks"][0]
    cmd = [
        sys.executable, "-m", "lm_eval", "run",
        "--model", "hf",
        "--model_args", f"pretrained={model_dir},dtype=float32",
        "--tasks", CLI_TASK,
        "--include_path", str(task_dir),
        "--limit", str(node["limit"]),
        "--batch_size", str(node["batch_size"]),
        "--max_batch_size", str(node["max_batch_size"]),
        "--device", str(device),
        "--gen_kwargs", f"max_gen_toks={arith['max_gen_toks']}",
        "--output_path", str(out_dir),
        "--seed", "0,1234,1234,1234",  # what run_suite uses for seed 0
    ]  # fmt: skip
    if node["log_samples"]:
        cmd.append("--log_samples")
    if node["apply_chat_template"]:
        cmd.append("--apply_chat_template")
        if node["fewshot_as_multiturn"]:
            cmd.append("--fewshot_as_multiturn")
    return cmd


def run_cli(cmd: list[str], out_dir: Path) -> tuple[dict[str, float | None], list]:
    """Run the command line; its scores (flattened as uapt flattens them) and its generations."""
    from uapt.evaluation import flatten_results

    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    found = sorted(out_dir.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
    samples = sorted(out_dir.rglob(f"samples_{CLI_TASK}_*.jsonl"), key=lambda p: p.stat().st_mtime)
    if not found or not samples:
        raise RuntimeError(f"lm-eval wrote no results_*.json / samples_*.jsonl under {out_dir}")
    scores = flatten_results(json.loads(found[-1].read_text()), {CLI_TASK})[CLI_TASK]
    outputs = generations(samples[-1])
    for path in [*found, *samples]:  # the next call's files must not be confused with these
        path.unlink()
    return scores, outputs


def generations(path: Path) -> list[tuple[int, Any]]:
    """(doc_id, raw model outputs) of a samples JSONL file, in doc order."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sorted((row["doc_id"], row["resps"]) for row in rows)


def measure(sizes: dict[str, Any], rounds: int) -> dict[str, Any]:
    from uapt import distributed
    from uapt.evaluation import run_suite
    from uapt.models import load_model, load_tokenizer
    from uapt.train import pick_device, save_model

    cfg = compose([f"model={sizes['model']}", "logger=none"])
    device = pick_device(cfg["trainer"]["device"], distributed.World())
    tokenizer = load_tokenizer(cfg["model"], cfg["cache_dir"])
    model = load_model(cfg["model"], tokenizer, cfg["cache_dir"], device)
    node = suite(sizes)
    with tempfile.TemporaryDirectory(prefix="uapt-bench-eval-") as tmp:
        root = Path(tmp)
        for sub in ("model", "tasks", "out"):
            (root / sub).mkdir()
        save_model(model, tokenizer, root / "model")  # what the command line loads
        write_cli_task(root / "tasks", node["tasks"][0])
        cmd = cli_command(root / "model", root / "tasks", root / "out", node, device)

        def in_process() -> dict[str, Any]:
            out = run_suite(model, tokenizer, node, device=device, out_dir=root / "ours")
            return out["eval"]["arith"]

        started = time.perf_counter()
        ours = in_process()  # cold: imports lm-eval, indexes the task
        cold = time.perf_counter() - started
        times: dict[str, list[float]] = {"cli": [], "in_process": []}
        theirs: dict[str, Any] = {}
        their_outputs: list = []
        for _ in range(rounds):
            started = time.perf_counter()
            theirs, their_outputs = run_cli(cmd, root / "out")
            times["cli"].append(time.perf_counter() - started)
            started = time.perf_counter()
            ours = in_process()
            times["in_process"].append(time.perf_counter() - started)
        our_outputs = generations(root / "ours" / "eval_samples" / "arith.jsonl")
    metrics = sorted(k for k in ours if not k.endswith("_stderr"))
    agree = bool(metrics) and all(ours.get(k) == theirs.get(k) for k in metrics)
    ratios = [c / i for c, i in zip(times["cli"], times["in_process"], strict=True)]
    return {
        "model": sizes["model"],
        "device": str(device),
        "task": {"name": "arith", **{k: sizes[k] for k in ("limit", "size", "max_gen_toks")}},
        "rounds": rounds,
        "cli_command": " ".join(cmd),
        "seconds": {**times, "in_process_cold": cold},
        "ratio_cli_over_in_process": Spread.of(ratios).as_dict(),
        "ratio_cli_over_in_process_cold": Spread.of(times["cli"]).median / cold,
        "scores": {"in_process": ours, "cli": theirs, "agree": agree},
        "generations": {
            "rows": len(our_outputs),  # one per document and filter
            "agree": bool(our_outputs) and our_outputs == their_outputs,
            "first_in_process": our_outputs[0][1] if our_outputs else None,
        },
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.split("\n")[0])
    p.add_argument(
        "--model", default=None, help="model config (default: smollm2_135m; quick: tiny)"
    )
    p.add_argument("--limit", type=int, default=None, help="problems evaluated")
    args = p.parse_args(argv)
    setup_env()
    set_threads(args.threads)
    sizes = dict(QUICK if args.quick else FULL)
    if args.model:
        sizes["model"] = args.model
    if args.limit:
        sizes["limit"] = args.limit
        sizes["size"] = max(sizes["size"], args.limit)
    rounds = args.rounds or sizes["rounds"]
    load_before = load_average()
    log(f"eval_inprocess: {sizes['model']}, arith limit {sizes['limit']}, {rounds} rounds")
    result = measure(sizes, rounds)
    payload = {
        "benchmark": "eval_inprocess",
        "quick": args.quick,
        "machine": machine_info(result["device"]),
        "load_average_after": load_average(),
        "results": [result],
    }
    payload["contention"] = contention_note(load_before, payload["load_average_after"])
    print(render(payload))
    write_json(args.json, payload)
    return payload


def render(payload: dict[str, Any]) -> str:
    rows = []
    for r in payload["results"]:
        s = r["seconds"]
        rows.append(
            [
                r["model"],
                fmt_spread(Spread.of(s["cli"]).as_dict()),
                fmt_spread(Spread.of(s["in_process"]).as_dict()),
                s["in_process_cold"],
                fmt_spread(r["ratio_cli_over_in_process"]),
                r["ratio_cli_over_in_process_cold"],
                "yes" if r["scores"]["agree"] else "NO",
                "yes" if r["generations"]["agree"] else "NO",
            ]
        )
    headers = [
        "model",
        "lm-eval CLI s",
        "in-process s",
        "in-process cold s",
        "CLI / in-process",
        "CLI / cold",
        "scores agree",
        "outputs agree",
    ]
    lines = [table(headers, rows)]
    if payload["contention"]:
        lines.append(payload["contention"])
    return "\n".join(lines)


if __name__ == "__main__":
    main()
