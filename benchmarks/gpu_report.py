"""Tables of a gpu_check record, as text and as the "GPU" section of docs/performance.md.

No torch here: run_all.py re-renders the section from the committed record
(docs/results/gpu_check.json) whenever it rewrites the page, so a CPU benchmark run never loses
the GPU figures, and they always say which machine and date they came from.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, table, write_json

DOC = REPO / "docs" / "performance.md"
RECORD = REPO / "docs" / "results" / "gpu_check.json"
HEADING = "## GPU"

SECTIONS = ("parity", "loss_memory", "train_step", "e2e", "ddp")

Section = Mapping[str, Any]


def unmeasured(sections: Mapping[str, Section]) -> list[dict[str, str]]:
    """Every section or item that was not measured, with why: the list the page prints."""
    out = []
    for name, sec in sections.items():
        if not sec.get("items") and sec.get("why"):
            out.append({"section": name, "item": "(whole section)", "why": sec["why"]})
        for item in sec.get("items", []):
            if not item.get("measured"):
                out.append({"section": name, "item": item["item"], "why": item.get("why", "")})
            elif str(item.get("memory", "")).startswith("not measured"):
                why = item["memory"].removeprefix("not measured: ")
                out.append({"section": name, "item": f"{item['item']} (memory)", "why": why})
    return out


def merge_records(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One record from a run and its reruns: a later record's sections replace the earlier
    ones; `runs` says which run every section comes from (its date and command)."""
    sections: dict[str, tuple[int, Section]] = {}
    for index, record in enumerate(records):
        sections.update({name: (index, sec) for name, sec in record["sections"].items()})
    merged = {**records[-1], "sections": {}}
    for name in [*SECTIONS, *sorted(set(sections) - set(SECTIONS))]:
        if name in sections:
            merged["sections"][name] = sections[name][1]
    if len(records) > 1:
        merged["runs"] = [
            {
                "started_at": r["started_at"],
                "command": r["command"],
                "sections": [n for n, (i, _) in sections.items() if i == index],
            }
            for index, r in enumerate(records)
        ]
    merged["not_measured"] = unmeasured(merged["sections"])
    return merged


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return str(value)


def fmt_spread(s: Mapping[str, float] | None) -> str:
    if not s:
        return ""
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def _skipped(item: Mapping[str, Any], width: int) -> list[str]:
    """A table row for an item that did not run: its name, blanks, and why."""
    label = "failed" if item.get("error") else "not measured"
    return [item["item"], *[""] * (width - 2), f"{label}: {item.get('why', '')}"]


def parity_table(sec: Section, verdicts: bool = True) -> list[str]:
    head = ["objective dtype", "loss rel", "d hidden rel", "d weight rel", "kept agree"]
    head += ["bf16 vs fp32 (d weight)", "parity"]
    rows = []
    for i in sec.get("items", []):
        if not i["measured"]:
            rows.append(_skipped(i, len(head)))
            continue
        floor = i.get("bf16_vs_fp32", {})
        rows.append(
            [
                i["item"],
                fmt(i["loss_rel"]),
                fmt(i["grad_hidden_rel"]),
                fmt(i["grad_weight_rel"]),
                fmt(i["kept_agree"], 4),
                fmt(floor.get("grad_weight_rel"))
                + (f" ({floor['flips']} flipped)" if floor.get("flips") else ""),
                "ok" if i["ok"] else "**FAILED**",
            ]
        )
    return [table(head, rows), tolerance_note(sec.get("tolerance"))]


def tolerance_note(tol: Mapping[str, Any] | None) -> str:
    """The parity rule in words (gpu_check.PARITY_TOL, KEPT_TOL, parity_verdict)."""
    if not tol:
        return ""
    dtypes = [d for d in tol if d != "kept_agree"]
    errors = "; ".join(f"{d} loss {tol[d]['loss']:g}, gradients {tol[d]['grad']:g}" for d in dtypes)
    kept = ", ".join(f"{tol['kept_agree'][d]:g} ({d})" for d in dtypes)
    return (
        f"Parity: relative errors chunked vs naive within {errors} (gradients: plus "
        "2 sqrt(2 flips / kept) when a near tie put a token on the other side of the K-th "
        f"place); kept sets agree on at least {kept} of the tokens. The bf16 column is the "
        "naive bf16 path against fp32 on the same inputs, the scale of bf16's own error (more "
        "where bf16 put tokens on the other side of the K-th place: flipped)."
    )


def loss_table(sec: Section, verdicts: bool = True) -> list[str]:
    head = ["method", "extra MB", "ms fwd+bwd median [min-max]", "loss", "memory"]
    rows = []
    for i in sec.get("items", []):
        if not i["measured"]:
            rows.append(_skipped(i, len(head)))
            continue
        rows.append(
            [i["item"], fmt(i["extra_mb"], 4), fmt_spread(i["ms"]), fmt(i["loss"], 6), i["memory"]]
        )
    lines = [table(head, rows)]
    ratios = sec.get("ratios", {})
    if ratios:
        lines.append(table(["ratio", "value"], [[k, fmt(v)] for k, v in ratios.items()]))
    return lines


def train_table(sec: Section, verdicts: bool = True) -> list[str]:
    head = ["run", "tokens/s median [min-max]", "peak MB", "ratio", "target", "verdict"]
    rows, ratios = [], sec.get("ratios_vs_mle", {})
    for i in sec.get("items", []):
        if not i["measured"]:
            rows.append(_skipped(i, len(head)))
            continue
        versus_hf = "ratio_uapt_over_hf" in i
        r = i["ratio_uapt_over_hf"] if versus_hf else ratios.get(i["item"], {})
        target = r.get("target")
        rows.append(
            [
                i["item"],
                fmt_spread(i["tokens_per_s"]),
                fmt(i["peak_mem_mb"], 4),
                fmt(r.get("ratio")),
                f"{'>=' if versus_hf else '<='} {target}" if target else "",
                _verdict(r.get("met"), verdicts),
            ]
        )
    note = (
        "ratio: the objective's step time / mle's (mle tokens/s over its tokens/s); on the "
        "transformers.Trainer row, uapt's mle tokens/s / the Trainer's. Steady state: steps "
        f"from {sec.get('config', {}).get('steady_state_from_step')} on. Peak MB: "
        "torch.cuda.max_memory_allocated on CUDA, the process's peak RSS on a CPU. Clocks: "
        + sec.get("config", {}).get("clocks", "")
    )
    return [table(head, rows), note]


def _verdict(met: bool | None, verdicts: bool) -> str:
    if met is None:
        return ""
    if not verdicts:  # a CPU smoke run's figures are noise: the targets are about the GPU
        return "(smoke run)"
    return "met" if met else "**not met**"


def run_table(sec: Section, verdicts: bool = True) -> list[str]:
    head = ["run", "exit", "seconds", "result"]
    rows = []
    for i in sec.get("items", []):
        if not i["measured"]:
            rows.append(_skipped(i, len(head)))
            continue
        failed = [k for k, v in (i.get("checks") or {}).items() if not v]
        detail = "all checks passed" if i.get("ok") else f"**failed**: {', '.join(failed)}"
        rows.append([i["item"], fmt(i.get("exit_code")), fmt(i.get("seconds")), detail])
    return [table(head, rows)]


TABLES: dict[str, Callable[[Section, bool], list[str]]] = {
    "parity": parity_table,
    "loss_memory": loss_table,
    "train_step": train_table,
    "e2e": run_table,
    "ddp": run_table,
}


def section_lines(name: str, sec: Section, verdicts: bool = True) -> list[str]:
    head = f"{sec['status']} ({sec.get('seconds', 0):.0f} s)"
    lines = [head + (f": {sec['why']}" if sec.get("why") else "")]
    if sec.get("items"):
        lines += [block for block in TABLES[name](sec, verdicts) if block]
    return lines


def render_text(payload: Mapping[str, Any]) -> str:
    """The tables (plain text, also valid Markdown), then everything that was not measured."""
    lines = []
    for name, sec in payload["sections"].items():
        lines += [f"{name}: " + "\n".join(section_lines(name, sec, not payload["quick"])), ""]
    gaps = payload.get("not_measured", [])
    lines.append(f"not measured: {len(gaps)}")
    lines += [f"- {g['section']}: {g['item']}: {g['why']}" for g in gaps]
    return "\n".join(lines)


def provenance(payload: Mapping[str, Any]) -> list[str]:
    """Which machine, software and command every figure of the record came from, and when."""
    m = payload["machine"]
    versions = m.get("versions", {})
    where = m.get("gpu") or f"no GPU: {m.get('cpu_model')}, {m.get('cores')} cores"
    if m.get("gpu"):
        where += f" x{m.get('gpu_count')}, driver {m.get('driver')}, CUDA {m.get('torch_cuda')}"
    found = payload.get("packages", {})
    listed = ("triton", "liger_kernel", "lm_eval", "wandb", "hydra", "datasets")
    packages = ", ".join(
        f"{found[k]['distribution']} {found[k]['version'] or 'missing'}"
        for k in listed
        if k in found
    )
    runs = payload.get("runs") or [
        {"started_at": payload["started_at"], "command": payload["command"], "sections": []}
    ]
    when = [
        f"- Date: {r['started_at']}; command `{r['command']}`"
        + (f" (sections {', '.join(r['sections'])})" if len(runs) > 1 else "")
        for r in runs
    ]
    return [
        f"- Machine: {where}; `--device {payload['device']}`; {payload.get('seconds', 0):.0f} s",
        *when,
        f"- torch {versions.get('torch')}, transformers {versions.get('transformers')}, {packages}",
        f"- CPU load average (1, 5, 15 min): {m.get('load_average')} before, "
        f"{payload.get('load_average_after')} after",
    ]


INTRO = """`benchmarks/gpu_check.py` checks uapt's CUDA paths and measures them in one command: the
chunked loss's parity with the naive one at Gemma-2-2b's head (fp32 and bf16), the loss's extra
peak memory and time (Liger-Kernel's fused kernels beside it), training steps of Llama-3.2-1B's
architecture with random weights (bf16, sequence 2,048: the objectives against mle, uapt against
transformers.Trainer), one `uapt-train` run end to end with the embedded eval and W&B offline,
and DDP where there are two GPUs. What it could not measure is listed as such.

On a CUDA machine with a package index: `make gpu-check`. On one without (this workplace's lent
H200: Python 3.12 with torch 2.11, transformers 5.17, accelerate, peft and triton, but no hydra,
omegaconf, datasets, lm-eval or W&B), fetch the wheels of `benchmarks/gpu_requirements.txt`
here, carry `.whl/` and run it there as one command with a 360 s timeout: the script starts no
item after 300 s (nor one with less than 30 s left) and ends within seconds of it, so a 15-minute
lease (a start of a minute or two, this call, a rerun) keeps room for one rerun of what failed,
started at once while the machine is still warm.

```bash
make gpu-wheels   # here: .whl/ (about 55 MB; git-ignored)
# there, from the repository root, as one command:
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .site .whl/*.whl && export PYTHONPATH=$PWD/.site || exit; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --json $OUT/gpu_check.json --deadline-s 300 2>&1 | tee $OUT/gpu_check.log
# back here: this section and docs/results/gpu_check.json from the record
python benchmarks/gpu_check.py --doc <fetched>/gpu_check.json
```

A rerun of what failed writes its own record (`--sections train_step --json
$OUT/gpu_check_rerun.json`, say); `--doc <first> <rerun>` merges them, a later record's
sections replacing the earlier ones, and the page names the run each section came from. The
carried transformers 5.24.0 is the project's pin; should it not import there, start the
rerun with `rm .whl/transformers-*.whl;` and the image's own version is used (the record names
the versions that ran)."""


def render_markdown(payload: Mapping[str, Any]) -> str:
    """The "GPU" section of docs/performance.md from one gpu_check record."""
    lines = [HEADING, "", INTRO, ""]
    if payload.get("note"):
        lines += [f"**Note.** {payload['note']}", ""]
    if payload["device"] != "cuda":
        smoke = " --quick" if payload["quick"] else ""
        lines += [
            "**No GPU figures yet.** No run of `benchmarks/gpu_check.py` on a GPU is recorded. "
            f"The record below is its CPU run (`--device cpu{smoke}`), kept to show what the "
            "GPU run will report and that every path runs; its figures are from a CPU"
            + (" at smoke sizes" if smoke else "")
            + " and say nothing about a GPU.",
            "",
        ]
    lines += ["Record `docs/results/gpu_check.json`:", "", *provenance(payload), ""]
    for name, sec in payload["sections"].items():
        lines += [f"### GPU: {name}", ""]
        for block in section_lines(name, sec, verdicts=not payload["quick"]):
            lines += [block, ""]
    gaps = payload.get("not_measured", [])
    lines += ["### GPU: not measured in this record", ""]
    lines += [f"- {g['section']} / {g['item']}: {g['why']}" for g in gaps] or ["- nothing"]
    return "\n".join(lines).rstrip() + "\n"


def replace_section(text: str, section: str) -> str:
    """The document with its "## GPU" section (up to the next "## " heading) replaced, or
    with the section appended when it has none."""
    head, sep, rest = text.partition(f"\n{HEADING}\n")
    tail = ""
    if sep:
        after = rest.find("\n## ")
        tail = rest[after:] if after >= 0 else ""
    return head.rstrip() + "\n\n" + section + tail


def update_doc(payload: Mapping[str, Any], doc: Path = DOC, record: Path = RECORD) -> None:
    """Keep the record and render it into the document."""
    write_json(record, payload)
    doc.write_text(replace_section(doc.read_text(), render_markdown(payload)))


def saved_section(record: Path = RECORD) -> str | None:
    """The section rendered from the committed record, None when there is none yet."""
    if not record.exists():
        return None
    return render_markdown(json.loads(record.read_text()))
