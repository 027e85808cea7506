"""`uapt-train` as a user runs it, in a subprocess; the sections e2e (one run end to end: bf16
training on the device, the embedded eval suite, W&B offline) and ddp (two ranks where there are
two GPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from common import OFFLINE_ENV, REPO

from gpu_check.check import Check, missing, not_measured

PACKAGE = Path(__file__).resolve().parent  # `python benchmarks/gpu_check` runs it


def child_env(check: Check) -> dict[str, str]:
    """Offline, unbuffered, this checkout's src/ first on the path (uapt need not be installed:
    on a device machine it is not), one thread per process on CPU as the benchmarks do."""
    path = [str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, **OFFLINE_ENV, "PYTHONUNBUFFERED": "1", "PYTHONPATH": ":".join(path)}
    env.setdefault("UAPT_CACHE", str(REPO / ".cache" / "uapt"))
    if check.device.type == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    return env


def run_child(cmd: Sequence[str], check: Check, timeout: float) -> tuple[int | None, str, float]:
    """A subprocess from the repository root: exit status (None: killed at the timeout), the
    tail of its output, and its seconds."""
    t0 = time.monotonic()
    try:
        proc = subprocess.run(
            cmd, cwd=REPO, env=child_env(check), capture_output=True, text=True, timeout=timeout
        )
        code, tail = proc.returncode, (proc.stdout + proc.stderr)[-3000:]
    except subprocess.TimeoutExpired as e:
        code, tail = None, f"timed out after {timeout:.0f} s\n" + _text(e.stderr)[-2000:]
    return code, tail, round(time.monotonic() - t0, 2)


def _text(data: bytes | str | None) -> str:
    if isinstance(data, bytes):
        return data.decode(errors="replace")
    return data or ""


def uapt_train(check: Check, args: Sequence[str], timeout: float) -> dict[str, Any]:
    """`python -m uapt.train <args>` as a user runs it; exit status, seconds, output tail."""
    code, tail, seconds = run_child([sys.executable, "-m", "uapt.train", *args], check, timeout)
    return {
        "command": "python -m uapt.train " + " ".join(args),
        "exit_code": code,
        "seconds": seconds,
        "output_tail": tail if code != 0 else None,
    }


def run_folder(runs_dir: Path) -> Path | None:
    found = sorted(runs_dir.glob("*/run.json"))
    return found[0].parent if found else None


def tiny_run(check: Check, runs_dir: Path, *extra: str) -> list[str]:
    """A tiny masked_mle_distill run in bf16 on the device (seconds of training)."""
    return [
        "model=tiny",
        "dataset=arith",
        "dataset.num_train=64",
        "dataset.val_size=16",
        "objective=masked_mle_distill",
        "trainer.max_steps=4",
        "trainer.batch_size=8",
        "trainer.micro_batch_size=4",
        "trainer.lr=1e-3",
        "trainer.precision=bf16",
        f"trainer.device={check.device.type}",
        f"runs_dir={runs_dir}",
        "force=true",
        *extra,
    ]


def section_e2e(check: Check, packages: Mapping[str, Any]) -> dict[str, Any]:
    """A whole run as a user starts it: bf16 training on the device, the embedded eval suite
    (base model and trained model), W&B offline; a missing package leaves out its part, named."""
    why = check.budget_note() or _lacking(packages, "e2e")
    if why:
        return {"status": "not measured", "why": why, "items": []}
    runs_dir, items, extra = check.work / "runs-e2e", [], []
    no_eval, no_wandb = _lacking(packages, "eval"), _lacking(packages, "wandb")
    if no_eval:
        extra.append("eval=none")
        items.append(not_measured("eval=embedded", no_eval))
    else:
        extra += check.sizes.e2e_eval
    if no_wandb:
        extra.append("logger=none")
        items.append(not_measured("W&B offline", no_wandb))
    else:
        extra += ["logger=wandb", "logger.mode=offline"]
    outcome = uapt_train(check, tiny_run(check, runs_dir, *extra), min(check.left(), 900))
    checks = run_checks(runs_dir, outcome)
    record = checks.pop("_record")
    if not no_eval:
        checks["eval_scores"] = bool(record.get("eval")) and bool(record.get("eval_base"))
    if not no_wandb:
        checks["wandb_offline_run"] = any((runs_dir / "wandb").glob("offline-run-*"))
    item = {
        "item": "uapt-train end to end",
        "measured": True,
        **outcome,
        "checks": checks,
        "ok": all(checks.values()),
        "timings": record.get("timings"),
        "eval": record.get("eval"),
    }
    return {"items": [item, *items]}


def _lacking(packages: Mapping[str, Any], need: str) -> str | None:
    names = missing(packages, need)
    return f"missing: {', '.join(names)}" if names else None


def run_checks(runs_dir: Path, outcome: Mapping[str, Any]) -> dict[str, Any]:
    """What a completed run leaves behind (its record is returned under _record)."""
    folder = run_folder(runs_dir)
    record = json.loads((folder / "run.json").read_text()) if folder else {}
    return {
        "exit_code_0": outcome["exit_code"] == 0,
        "status_completed": record.get("status") == "completed",
        "metrics_rows": folder is not None and _nonempty(folder / "metrics.jsonl"),
        "model_saved": folder is not None and (folder / "model" / "config.json").exists(),
        "_record": record,
    }


def _nonempty(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def section_ddp(check: Check, packages: Mapping[str, Any]) -> dict[str, Any]:
    """Two ranks (uapt-train starts torchrun) when there are two GPUs; else said so."""
    if check.device.type != "cuda":
        why = "--device cpu (DDP over gloo on CPU is tested by tests/test_distributed.py)"
        return {"status": "not measured", "why": why, "gpus": 0, "items": []}
    gpus = torch.cuda.device_count()
    if gpus < 2:
        why = f"{gpus} GPU on this machine; a two-rank DDP run needs 2"
        return {"status": "not measured", "why": why, "gpus": gpus, "items": []}
    why = check.budget_note() or _lacking(packages, "e2e")
    if why:
        return {"status": "not measured", "why": why, "gpus": gpus, "items": []}
    runs_dir = check.work / "runs-ddp"
    args = tiny_run(check, runs_dir, "trainer.nproc=2", "logger=none")
    outcome = uapt_train(check, args, min(check.left(), 600))
    checks = run_checks(runs_dir, outcome)
    checks["world_size_2"] = checks.pop("_record").get("world_size") == 2
    item = {"item": "uapt-train trainer.nproc=2", "measured": True, **outcome, "checks": checks}
    return {"gpus": gpus, "items": [{**item, "ok": all(checks.values())}]}
