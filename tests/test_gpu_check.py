"""benchmarks/gpu_check at --device cpu --quick: the paths a GPU run takes (parity, memory and
time measurement with the CPU fallbacks, uapt-train training steps against
transformers.Trainer, one run end to end) run here, and the record they write holds what
docs/performance.md renders. No speed is asserted (the machine is shared)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import env

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_report  # noqa: E402
from gpu_check import check, cli, parity, train_step  # noqa: E402

pytestmark = pytest.mark.slow

STATUSES = {"measured", "partly measured", "not measured", "failed"}


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("gpu_check")
    path = out / "gpu_check.json"
    cmd = [sys.executable, str(BENCH / "gpu_check"), "--device", "cpu", "--quick"]
    cmd += ["--json", str(path), "--work-dir", str(out / "work")]
    proc = subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"gpu_check exited {proc.returncode}:\n{proc.stdout[-3000:]}"
    assert "not measured:" in proc.stdout  # the table ends with what was not measured
    return json.loads(path.read_text())


def items(record: dict, section: str) -> dict[str, dict]:
    return {i["item"]: i for i in record["sections"][section]["items"]}


def test_record_says_where_and_what(record):
    assert record["benchmark"] == "gpu_check"
    assert record["device"] == "cpu" and record["quick"] is True
    assert record["started_at"].endswith("UTC") and record["seconds"] > 0
    assert "--device cpu --quick" in record["command"]
    machine = record["machine"]
    assert machine["versions"]["torch"].startswith("2.13.0") and machine["gpu"] is None
    assert record["packages"]["torch"]["found"] is True
    assert list(record["sections"]) == list(cli.SECTIONS)
    for section in record["sections"].values():
        assert section["status"] in STATUSES and section["seconds"] >= 0
        assert section["status"] != "failed", section.get("why")


def test_parity_holds_on_every_named_objective(record):
    """Chunked vs naive at fp32 differ by summation order only (~1e-7 here; tolerance 1e-4);
    at bf16 the head's matmul is rounded to 8 mantissa bits on both paths, so the chunked
    path's distance to the naive one must stay within bf16's own error (its naive path's
    distance to fp32 on the same inputs), which is what the bf16 tolerance is sized on."""
    section = record["sections"]["parity"]
    rows = items(record, "parity")
    names = [f"{o} {d}" for d in ("fp32", "bf16") for o in parity.PARITY_OBJECTIVES]
    assert list(rows) == names and section["all_ok"] is True
    for row in rows.values():
        tol = parity.PARITY_TOL[row["dtype"]]
        assert row["measured"] and row["ok"], row
        assert row["loss_rel"] <= tol["loss"]
        assert row["kept_agree"] >= parity.KEPT_TOL[row["dtype"]]
        if row["flips"]:  # a near tie at the K-th place decided differently: allowed, rare
            continue
        assert max(row["grad_hidden_rel"], row["grad_weight_rel"]) <= tol["grad"]
        if row["dtype"] == "fp32":
            assert max(row["loss_rel"], row["grad_hidden_rel"], row["grad_weight_rel"]) < 1e-5
            continue
        floor = row["bf16_vs_fp32"]
        if floor["flips"] == 0:  # bf16 against fp32 on the same selection: bf16's own error
            assert row["grad_weight_rel"] <= 2 * floor["grad_weight_rel"]
            assert floor["grad_weight_rel"] <= tol["grad"]  # the tolerance covers it


def test_loss_memory_measures_with_the_cpu_fallback(record):
    section = record["sections"]["loss_memory"]
    rows = items(record, "loss_memory")
    for tokens in section["config"]["tokens"]:
        for kind in ("ce", "ce_kl"):
            naive, chunked = (
                rows[f"naive_{kind} {tokens} tokens"],
                rows[f"chunked_{kind} {tokens} tokens"],
            )
            # the same loss on both paths (bf16 weights, fp32 arithmetic after the matmul)
            assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-4)
            for row in (naive, chunked):
                assert row["memory"] == "cpu_rss_high_water_mark" and row["extra_mb"] > 0
                assert row["ms"]["n"] == check.QUICK.loss_reps and row["ms"]["min"] > 0
            # full [T, V] logits vs one chunk at a time: the point of the chunked path
            assert chunked["extra_mb"] < naive["extra_mb"]
            liger = rows[f"liger_{kind} {tokens} tokens"]
            assert not liger["measured"] and "CUDA only" in liger["why"]
    ratio = section["ratios"]
    key = f"mem chunked_ce_kl/naive_ce_kl {section['config']['tokens'][0]}"
    first = rows[f"chunked_ce_kl {section['config']['tokens'][0]} tokens"]
    assert ratio[key] == pytest.approx(
        first["extra_mb"] / rows[f"naive_ce_kl {section['config']['tokens'][0]} tokens"]["extra_mb"]
    )


def test_train_step_compares_objectives_and_transformers(record):
    section = record["sections"]["train_step"]
    rows = items(record, "train_step")
    assert list(rows) == [*train_step.VARIANTS, "transformers.Trainer mle"]
    sizes = check.QUICK
    for row in rows.values():
        assert row["measured"], row
        assert (
            row["steps"] == sizes.steps and row["steady_steps"] == sizes.steps - sizes.warmup_steps
        )
        assert row["tokens_per_step"] == sizes.batch * sizes.seq
        assert row["tokens_per_s"]["median"] > 0 and row["peak_mem_mb"] > 0
    for name in train_step.VARIANTS:
        assert rows[name]["status"] == "completed" and rows[name]["rows_cut_to_seq"] is True
        assert "python -m uapt.train" in rows[name]["command"]
    cache = rows["masked_mle_distill_cached"]["teacher_cache"]
    assert cache["rows_computed"] + cache["rows_reused"] > 0
    mle = rows["mle"]["tokens_per_s"]["median"]
    for name, ratio in section["ratios_vs_mle"].items():
        assert ratio["ratio"] == pytest.approx(mle / rows[name]["tokens_per_s"]["median"])
        target = train_step.TARGETS.get(name)
        assert ratio["met"] == (None if target is None else ratio["ratio"] <= target)
    hf = rows["transformers.Trainer mle"]
    assert hf["ratio_uapt_over_hf"]["ratio"] == pytest.approx(mle / hf["tokens_per_s"]["median"])
    # uapt built the architecture of the override (Llama-3.2-1B's config at smoke size), and
    # the Trainer trained what uapt's record says it built
    built = rows["mle"]["model_config"]
    assert built["path"] is None
    for key, value in check.LLAMA_QUICK.items():
        if key == "rope_scaling":  # transformers adds rope_theta into the dict it is given
            assert built["config"][key].items() >= value.items()
        else:
            assert built["config"][key] == value, key
    assert section["config"]["model_config"] == check.LLAMA_QUICK


def test_end_to_end_run_and_ddp(record):
    (run,) = record["sections"]["e2e"]["items"]
    assert run["ok"] and run["exit_code"] == 0, run.get("output_tail")
    # the venv has lm-eval and wandb: the embedded eval and W&B offline ran
    assert {"eval_scores", "wandb_offline_run"} <= set(run["checks"])
    assert all(run["checks"].values())
    ddp = record["sections"]["ddp"]
    assert ddp["status"] == "not measured" and "--device cpu" in ddp["why"]


def test_every_unmeasured_item_is_named(record):
    named = {(g["section"], g["item"]) for g in record["not_measured"]}
    for name, section in record["sections"].items():
        for row in section.get("items", []):
            assert row["measured"] or (name, row["item"]) in named
    assert ("ddp", "(whole section)") in named
    assert all(g["why"] for g in record["not_measured"])


def test_markdown_says_no_gpu_and_keeps_the_rest_of_the_page(record, tmp_path):
    text = gpu_report.render_markdown(record)
    assert text.startswith("## GPU\n") and "**No GPU figures yet.**" in text
    assert f"Date: {record['started_at']}" in text and "no GPU:" in text
    for name in cli.SECTIONS:
        assert f"### GPU: {name}" in text
    assert "liger_ce 128 tokens" in text and "CUDA only" in text
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nintro\n\n## Results\n\nfigures\n")
    gpu_report.update_doc(record, doc, tmp_path / "gpu_check.json")
    once = doc.read_text()
    assert once.startswith("# Performance\n\nintro\n\n## Results\n\nfigures\n\n## GPU\n")
    gpu_report.update_doc(record, doc, tmp_path / "gpu_check.json")
    assert doc.read_text() == once  # replaced, not appended twice
    doc.write_text(once + "\n## Later\n\nkept\n")
    gpu_report.update_doc(record, doc, tmp_path / "gpu_check.json")
    assert doc.read_text().endswith("\n## Later\n\nkept\n")
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == record


# ----------------------------------------------------------------------------- degradation
def test_missing_packages_leave_sections_out_by_name(tmp_path):
    packages = check.package_table()
    packages["hydra"] = {**packages["hydra"], "found": False}
    state = check.Check(torch_device("cpu"), True, check.QUICK, tmp_path, deadline=None)
    for section in ("train_step", "e2e"):
        result = cli.run_section(section, state, packages)
        assert result["status"] == "not measured" and "hydra-core" in result["why"]
    gaps = cli.unmeasured({"e2e": result})
    assert gaps == [{"section": "e2e", "item": "(whole section)", "why": result["why"]}]


def test_time_budget_names_what_it_skips(tmp_path):
    state = check.Check(torch_device("cpu"), True, check.QUICK, tmp_path, deadline=0.0)
    result = cli.run_section("parity", state, check.package_table())
    assert result["status"] == "not measured"
    assert all("--deadline-s" in row["why"] for row in result["items"])


def test_a_rerun_record_replaces_only_its_sections():
    first = {
        "started_at": "first",
        "command": "all",
        "sections": {
            "parity": {"status": "measured", "items": []},
            "e2e": {"status": "failed", "why": "boom", "items": []},
        },
    }
    rerun = {
        "started_at": "rerun",
        "command": "--sections e2e",
        "sections": {"e2e": {"status": "not measured", "why": "no time", "items": []}},
    }
    merged = gpu_report.merge_records([first, rerun])
    assert list(merged["sections"]) == ["parity", "e2e"]
    assert merged["sections"]["e2e"]["why"] == "no time"
    assert merged["runs"] == [
        {"started_at": "first", "command": "all", "sections": ["parity"]},
        {"started_at": "rerun", "command": "--sections e2e", "sections": ["e2e"]},
    ]
    assert merged["not_measured"] == [
        {"section": "e2e", "item": "(whole section)", "why": "no time"}
    ]
    alone = gpu_report.merge_records([first])
    assert "runs" not in alone and alone["sections"] == first["sections"]
    assert alone["not_measured"] == [{"section": "e2e", "item": "(whole section)", "why": "boom"}]


def test_hydra_values_and_failed_items():
    assert (
        train_step.hydra_value({"a": 1e-05, "b": {"c": True}, "d": "x"})
        == "{a:1e-05,b:{c:true},d:x}"
    )
    row = check.guarded("boom", lambda: 1 / 0)
    assert row == {
        "item": "boom",
        "measured": False,
        "error": True,
        "why": "ZeroDivisionError: division by zero",
    }
    assert cli.section_status([row]) == "failed"
    ok = {"item": "a", "measured": True}
    assert cli.section_status([ok, {"item": "b", "measured": False}]) == "partly measured"
    assert check.spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def torch_device(name: str):
    import torch

    return torch.device(name)
