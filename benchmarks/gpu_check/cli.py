"""The command: the sections in turn, each timed and written to the JSON record as soon as it
ends; --render and --doc turn records into docs/performance.md's "GPU" section (gpu_report)."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import loss_memory
import torch
from common import OFFLINE_ENV, load_average, machine_info, write_json
from gpu_report import (
    DOC,
    RECORD,
    SECTIONS,
    merge_records,
    render_markdown,
    render_text,
    unmeasured,
    update_doc,
)

from gpu_check.check import FULL, QUICK, Check, package_table
from gpu_check.memory import section_loss_memory
from gpu_check.parity import section_parity
from gpu_check.runs import section_ddp, section_e2e
from gpu_check.train_step import section_train_step, worker_hf_trainer

DESCRIPTION = 'Checks uapt\'s CUDA paths and measures them (docs/performance.md, "GPU").'

RUNNERS = {
    "parity": section_parity,
    "loss_memory": section_loss_memory,
    "train_step": section_train_step,
    "e2e": section_e2e,
    "ddp": section_ddp,
}


def run_section(name: str, check: Check, packages: Mapping[str, Any]) -> dict[str, Any]:
    """A section's result; an exception fails that section only, with its message."""
    t0 = time.monotonic()
    try:
        result = RUNNERS[name](check, packages)
        result.setdefault("status", section_status(result.get("items", [])))
    except Exception as e:  # report and go on: the next section may still measure
        import traceback

        result = {
            "status": "failed",
            "why": f"{type(e).__name__}: {e}",
            "traceback": traceback.format_exc()[-3000:],
            "items": [],
        }
    loss_memory.free(check.device)
    result["seconds"] = round(time.monotonic() - t0, 2)
    return result


def section_status(items: Sequence[Mapping[str, Any]]) -> str:
    """failed: an item broke or failed its check; else how much of it was measured."""
    if any(i.get("error") or i.get("ok") is False for i in items):
        return "failed"
    measured = [i for i in items if i.get("measured")]
    if not measured:
        return "not measured"
    return "measured" if len(measured) == len(items) else "partly measured"


def gpu_info(device: torch.device) -> dict[str, Any]:
    if device.type != "cuda":
        return {"gpu": None, "cuda_available": torch.cuda.is_available()}
    props = torch.cuda.get_device_properties(device)
    info = {
        "gpu": props.name,
        "gpu_count": torch.cuda.device_count(),
        "gpu_memory_gb": round(props.total_memory / 1e9, 1),
        "capability": f"{props.major}.{props.minor}",
        "torch_cuda": torch.version.cuda,
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        info["driver"] = subprocess.run(
            query, capture_output=True, text=True, timeout=20
        ).stdout.strip()
    return info


def new_payload(check: Check, argv: Sequence[str], packages: Mapping[str, Any]) -> dict:
    now = datetime.datetime.now(datetime.UTC)
    return {
        "benchmark": "gpu_check",
        "quick": check.quick,
        "device": check.device.type,
        "started_at": now.strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/gpu_check " + " ".join(argv),
        "machine": {**machine_info(str(check.device)), **gpu_info(check.device)},
        "packages": packages,
        "sections": {},
    }


def run_all(check: Check, sections: Sequence[str], argv: Sequence[str], out: Path | None) -> dict:
    """Run the sections in turn, writing the record after each one."""
    packages = package_table()
    payload = new_payload(check, argv, packages)
    for name in sections:
        print(f"== gpu_check: {name} ({time.monotonic() - check.started:.0f} s)", flush=True)
        payload["sections"][name] = run_section(name, check, packages)
        payload["not_measured"] = unmeasured(payload["sections"])
        payload["seconds"] = round(time.monotonic() - check.started, 1)
        write_json(out, payload)  # after every section: a killed run keeps what it measured
    payload["load_average_after"] = load_average()  # how busy the machine's CPUs were
    write_json(out, payload)
    return payload


# ----------------------------------------------------------------------------- command line
def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=DESCRIPTION)
    p.add_argument(
        "--device",
        choices=("cuda", "cpu"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where to measure (default cuda when PyTorch sees a GPU)",
    )
    p.add_argument("--quick", action="store_true", help="smoke sizes: the same paths in seconds")
    p.add_argument("--json", type=Path, default=None, help="write the record here")
    p.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    p.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="start no item after this many seconds (default: 300 at full size, none with "
        "--quick); what is skipped is named in the output",
    )
    p.add_argument("--work-dir", type=Path, default=None, help="scratch folder (default: a temp)")
    p.add_argument(
        "--render",
        type=Path,
        nargs="+",
        help="print records as Markdown and exit (later records' sections replace earlier ones)",
    )
    p.add_argument(
        "--doc",
        type=Path,
        nargs="+",
        help="put records (a run, then reruns) into docs/performance.md and the committed record",
    )
    p.add_argument("--note", default=None, help="with --doc/--render: a line kept in the record")
    p.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: PyTorch sees no GPU here (use --device cpu for the CPU paths)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        name, spec, out = args.worker
        result = {"hf_trainer": worker_hf_trainer}[name](json.loads(Path(spec).read_text()))
        Path(out).write_text(json.dumps(result))
        return 0
    if args.render or args.doc:
        payload = merge_records([json.loads(path.read_text()) for path in args.render or args.doc])
        if args.note:
            payload["note"] = args.note
        if args.render:
            print(render_markdown(payload))
            return 0
        update_doc(payload)
        print(f"wrote the GPU section of {DOC} and the record {RECORD}")
        return 0
    return check_and_report(args, argv)


def check_and_report(args: argparse.Namespace, argv: Sequence[str]) -> int:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    if args.device == "cpu":  # as the other benchmarks: OpenMP threads spin on a busy CPU
        torch.set_num_threads(1)
    deadline_s = args.deadline_s if args.deadline_s is not None else (None if args.quick else 300)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="uapt-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    check = Check(
        device=torch.device(args.device),
        quick=args.quick,
        sizes=QUICK if args.quick else FULL,
        work=work,
        deadline=None if deadline_s is None else time.monotonic() + deadline_s,
    )
    try:
        payload = run_all(check, args.sections.split(","), argv, args.json)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(render_text(payload))
    failed = [n for n, s in payload["sections"].items() if s["status"] == "failed"]
    if failed:  # a rerun writes its own record; --doc <first> <rerun> merges them
        print(f"failed: {', '.join(failed)}; rerun them with --sections {','.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
