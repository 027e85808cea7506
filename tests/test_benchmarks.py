"""Smoke tests of benchmarks/: every benchmark runs at --quick sizes on the tiny model and writes
the JSON fields docs/performance.md is rendered from. No timing is asserted (the machine is
shared); the summaries are recomputed here from the raw figures."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import env

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(BENCH))

import common  # noqa: E402
import run_all  # noqa: E402

pytestmark = pytest.mark.slow

MACHINE_KEYS = {"cpu_model", "cores", "torch_threads", "versions", "device", "load_average"}


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench")


def run_quick(name: str, out_dir: Path, *extra: str) -> tuple[dict, str]:
    path = out_dir / f"{name}.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick", *extra, "--json", str(path)],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"{name} exited {proc.returncode}:\n{proc.stderr[-4000:]}"
    return json.loads(path.read_text()), proc.stdout


def paired_median(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b, strict=True))


def check_machine(payload: dict) -> None:
    machine = payload["machine"]
    assert set(machine) >= MACHINE_KEYS
    assert machine["torch_threads"] == 1  # --threads default
    assert machine["versions"]["torch"].startswith("2.13.0")
    assert machine["versions"]["transformers"]
    assert payload["quick"] is True


# ----------------------------------------------------------------------------- benchmarks
@pytest.fixture(scope="module")
def overhead(out_dir):
    return run_quick("objective_overhead", out_dir, "--run-level")


def test_objective_overhead_quick(overhead):
    payload, stdout = overhead
    check_machine(payload)
    assert payload["benchmark"] == "objective_overhead"
    assert isinstance(payload["cached_teacher"]["available"], bool)
    if not payload["cached_teacher"]["available"]:
        assert "teacher" in payload["cached_teacher"]["why_not"]
    (result,) = payload["results"]
    assert result["model"] == "tiny"
    steps = result["step_s"]
    assert len(steps["mle"]) == len(steps["masked_mle_distill"]) == result["rounds"] == 2
    assert all(t > 0 for t in steps["mle"] + steps["masked_mle_distill"])
    # every step the two loops took saw the same real tokens (batches in lockstep)
    assert len(result["tokens_per_step"]) == result["warmup_steps"] + result["rounds"]
    ratio = result["ratio_live"]
    assert ratio["median"] == pytest.approx(
        paired_median(steps["masked_mle_distill"], steps["mle"])
    )
    assert ratio["met"] == (ratio["median"] <= 1.40)
    run_level = result["run_level"]
    assert set(run_level["s_per_token"]) >= {"mle", "live"}
    live = run_level["ratios"]["live"]
    assert live["median"] == pytest.approx(
        paired_median(run_level["s_per_token"]["live"], run_level["s_per_token"]["mle"])
    )
    assert "masked_mle_distill step s" in stdout


@pytest.fixture(scope="module")
def throughput(out_dir):
    return run_quick("trainer_throughput", out_dir)


def test_trainer_throughput_quick(throughput):
    payload, stdout = throughput
    check_machine(payload)
    (result,) = payload["results"]
    tokens = result["tokens_per_block"]
    assert len(tokens) == result["rounds"] and all(t > 0 for t in tokens)
    for side in ("uapt", "transformers"):
        expect = [t / s for t, s in zip(tokens, result["block_s"][side], strict=True)]
        assert result["tokens_per_s"][side] == pytest.approx(expect)
    tps = result["tokens_per_s"]
    assert result["ratio"]["median"] == pytest.approx(
        paired_median(tps["uapt"], tps["transformers"])
    )
    assert result["ratio"]["target_rule"] == ">="
    assert "transformers tokens/s" in stdout


def test_eval_inprocess_quick(out_dir):
    payload, _ = run_quick("eval_inprocess", out_dir)
    check_machine(payload)
    (result,) = payload["results"]
    seconds = result["seconds"]
    assert len(seconds["cli"]) == len(seconds["in_process"]) == result["rounds"]
    assert seconds["in_process_cold"] > 0
    assert "lm_eval run --model hf" in result["cli_command"]
    assert "--include_path" in result["cli_command"]
    # greedy decoding of the same problems: the command line and run_suite score alike
    scores = result["scores"]
    assert "exact_match,strict-match" in scores["in_process"]
    assert (
        scores["in_process"]["exact_match,strict-match"]
        == scores["cli"]["exact_match,strict-match"]
    )
    assert scores["agree"] is True
    generations = result["generations"]
    assert generations["rows"] == 2 * 2  # limit 2 problems x the task's 2 filters
    assert generations["agree"] is True  # token for token the same outputs
    assert result["ratio_cli_over_in_process"]["median"] == pytest.approx(
        paired_median(seconds["cli"], seconds["in_process"])
    )


def test_eval_generation_quick(out_dir):
    payload, stdout = run_quick("eval_generation", out_dir)
    check_machine(payload)
    (result,) = payload["results"]
    assert result["model"] == "tiny" and result["suite"] == "repro_real"
    tasks = {t["task"]: t for t in result["tasks"]}
    assert set(tasks) == {"gsm8k", "ifeval"}
    for t in tasks.values():
        assert t["samples"] == 3 and t["max_gen_toks"] == 8
        for clock in ("cpu", "wall"):
            gen = t["generation_s"][clock]
            assert len(gen["fast"]) == len(gen["today"]) == len(gen["plain"]) == result["rounds"]
        cpu, wall = t["generation_s"]["cpu"], t["generation_s"]["wall"]
        assert t["ratio_fast_over_today"]["median"] == pytest.approx(
            paired_median(cpu["today"], cpu["fast"])
        )
        assert t["wall"]["ratio_fast_over_today"]["median"] == pytest.approx(
            paired_median(wall["today"], wall["fast"])
        )
        assert t["samples_per_s"]["fast"]["median"] == pytest.approx(3 / cpu["fast"][0])
        # greedy decoding of the same prompts: the same outputs, outcomes and scores
        assert t["outputs"] == {"differing": [], "outcomes_equal": True, "scores_equal": True}
        # the loop runs only the prompts' real tokens; lm-eval's model.generate their padding too
        ran = t["positions_run"]
        assert ran["fast"]["prefill"] == t["prompt_tokens"] < ran["today"]["prefill"]
        assert ran["plain"]["prefill"] == ran["today"]["prefill"]
        flops = t["bound"]["flops"]
        body, head = result["linear_weights"]["body"], result["linear_weights"]["head"]
        tokens = t["prompt_tokens"] + t["kept_tokens"]
        assert flops == 2 * body * tokens + 2 * head * (t["kept_tokens"] + t["samples"])
        assert t["bound"]["seconds"] == pytest.approx(flops / (result["matmul_gflops"] * 1e9))
    total = result["total"]
    assert total["samples"] == 6 and total["differing_samples"] == 0
    assert total["ratio_fast_over_today"]["target"] == 2.0
    assert len(run_all.rows_eval_generation(payload)) == 2
    assert "fast / today" in stdout


def test_eval_generation_profile_quick(out_dir):
    """--profile: both paths' forward seconds by phase within their CPU seconds, the same decoding
    steps (greedy, the same outputs), and the logits' rounding across batch shapes far below
    generate.NEAR_TIE."""
    from uapt.evaluation.generate import NEAR_TIE

    payload, stdout = run_quick("eval_generation", out_dir, "--profile", "ifeval")
    found = payload["profile"]
    assert found["task"] == "ifeval" and found["samples"] == 3
    today, fast = found["paths"]["today"], found["paths"]["fast"]
    for p in (today, fast):
        assert 0 < sum(p["forward_s"].values()) <= p["cpu_s"] and p["decode_steps"] > 0
    assert fast["decode_steps"] <= today["decode_steps"]  # finished rows leave the loop's batch
    assert found["rounding"]["max_abs_logit_change"] < NEAR_TIE / 100
    assert "rounding:" in stdout and "fast:" in stdout


def test_grid_walltime_quick(out_dir):
    payload, _ = run_quick("grid_walltime", out_dir)
    check_machine(payload)
    (result,) = payload["results"]
    (grid,) = result["grids"]["live"]
    assert grid["runs"] == len(result["objectives"]) * len(result["seeds"]) == 2
    assert grid["wall_s"] > grid["train_s"] > 0  # the wall time holds every run's training
    assert "uapt-train" in grid["command"] or "uapt.train" in grid["command"]
    assert ("cached" in result["grids"]) == payload["cached_teacher"]["available"]


def test_teacher_topk_gap_quick(out_dir):
    payload, stdout = run_quick("teacher_topk_gap", out_dir, "--out", str(out_dir / "gap"))
    check_machine(payload)
    results = payload["results"]
    assert [r["k"] for r in results] == [4, 16, 64] and payload["tokens"] > 0
    assert len({r["kl_exact"] for r in results}) == 1 and results[0]["kl_exact"] > 0
    # each top-k partition refines the one before: the bucketed KL can only grow toward the
    # exact one (data processing inequality), and the teacher's rest mass only shrink
    ratios = [r["ratio"] for r in results]
    assert 0 < ratios[0] <= ratios[1] <= ratios[2] <= 1 + 1e-9
    rest = [r["teacher_rest_mass"] for r in results]
    assert 1 > rest[0] >= rest[1] >= rest[2] > 0
    assert all(-1 <= r["grad_cosine"] <= 1 for r in results)
    assert "cached / exact" in stdout
    rows = run_all.rows_teacher_topk_gap(payload)
    assert len(rows) == 3 and rows[0][0].startswith("cached top-4 KL / exact KL (tiny")


def test_global_selection_quick(out_dir):
    payload, stdout = run_quick("global_selection", out_dir)
    check_machine(payload)
    assert [r["objective"] for r in payload["results"]] == [
        "masked_mle (select nll)",
        "rho1 (select excess)",
    ]
    for result in payload["results"]:
        steps = result["step_s"]
        assert len(steps["global"]) == len(steps["in_forward"]) == result["rounds"] == 2
        ratio = result["ratio"]
        assert ratio["median"] == pytest.approx(paired_median(steps["global"], steps["in_forward"]))
        assert ratio["target"] is None and ratio["met"] is None  # a figure, no target
    assert "global / in-forward" in stdout
    assert len(run_all.rows_global_selection(payload)) == 2


def test_packing_quick(out_dir):
    payload, stdout = run_quick("packing", out_dir)
    check_machine(payload)
    for r in payload["packing"]:
        speed = r["assistant_tokens_per_s"]
        assert set(speed) == {"padded", "packed", "packed_budget"}
        assert r["pad_frac"]["packed"] == 0 < r["pad_frac"]["padded"]
        assert r["ratio"]["median"] == pytest.approx(
            paired_median(speed["packed"], speed["padded"])
        )
        # the three train the same steps: float rounding apart, the same losses
        assert r["loss_max_rel_diff"] < 1e-5
    (c,) = payload["compile"]
    assert c["compile_s"] > 0 and len(c["step_s"]["compiled"]) == c["rounds"]
    assert c["loss_max_rel_diff"] < 1e-5  # compiled kernels, the same numbers
    assert len(run_all.rows_packing(payload)) == 5
    assert "packed / padded" in stdout


def test_bootstrap_draws_quick(out_dir):
    payload, stdout = run_quick("bootstrap_draws", out_dir)
    check_machine(payload)
    assert [r["samples"] for r in payload["results"]] == [1319, 817]
    for r in payload["results"]:
        seconds = r["seconds"]
        assert len(seconds["uapt"]) == len(seconds["loop"]) == r["rounds"] == 2
        ratio = r["ratio"]
        assert ratio["median"] == pytest.approx(paired_median(seconds["loop"], seconds["uapt"]))
        assert ratio["target_rule"] == ">=" and ratio["met"] == (ratio["median"] >= 10)
        # One law, two algorithms: the ends agree up to Monte Carlo error. At 1,000 draws an
        # end's standard error is about 4 % of the half-width (quantile_se in test_bootstrap.py),
        # their difference's about 6 %: 25 % is over 4 standard errors.
        (lo, hi), (loop_lo, loop_hi) = r["interval"]["uapt"], r["interval"]["loop"]
        half = (hi - lo) / 2
        assert abs(lo - loop_lo) < 0.25 * half and abs(hi - loop_hi) < 0.25 * half
    assert "loop / uapt" in stdout
    assert len(run_all.rows_bootstrap_draws(payload)) == 2


def test_plan_accuracy_quick(out_dir):
    payload, stdout = run_quick("plan_accuracy", out_dir)
    check_machine(payload)
    cpu = payload["cpu"]
    assert 0 < cpu["peak_tflops"]["min"] <= cpu["peak_tflops"]["max"] and cpu["mfu"]["median"] > 0
    (tiny,) = payload["runs"].values()
    predicted = tiny["predicted"]
    assert predicted["seconds"] > 0 and predicted["tokens"] > 0
    assert tiny["factor_measured_over_predicted"]["median"] == pytest.approx(
        statistics.median(s / predicted["seconds"] for s in tiny["loop_s"])
    )
    grid = payload["paper_grid"]
    assert grid["points"] == 108 and grid["device"] == "h100"
    hours = grid["uapt_hours"]
    assert hours["total"] == pytest.approx(sum(v for k, v in hours.items() if k != "total"))
    assert grid["ratio_naive_over_uapt"] == pytest.approx(grid["naive_hours"] / hours["total"])
    assert grid["ratio_naive_over_uapt"] > 1  # every naive factor costs more
    assert len(run_all.rows_plan_accuracy(payload)) == 4
    assert "measured / predicted" in stdout and "paper grid (108 runs)" in stdout


def test_run_all_renders_every_summary(overhead, throughput, tmp_path):
    by_name = {b.name: b for b in run_all.BENCHMARKS}
    outcomes = {
        name: run_all.Outcome(
            by_name[name], ["python", "-", "--quick", "--json", "x"], 1.0, 0, stdout, "", p,
            "2026-12-01 00:00 UTC", ["CPU: test"],
        )
        for name, (p, stdout) in (("objective_overhead", overhead), ("trainer_throughput", throughput))
    }  # fmt: skip
    outcomes["grid_walltime"] = run_all.Outcome(
        by_name["grid_walltime"], ["python", "-", "--json", "x"], 2.0, 1, "", "boom", None
    )
    every = [outcomes.get(b.name) for b in run_all.BENCHMARKS]  # the others: not measured yet
    doc = run_all.render_doc(every, True)
    assert doc.startswith("# Performance")
    assert "## Results" in doc and "### Summary" in doc
    assert "### objective_overhead" in doc and "### trainer_throughput" in doc
    assert "measured 2026-12-01 00:00 UTC" in doc and "- CPU: test" in doc  # each its own
    assert "live teacher (tiny)" in doc and "uapt / transformers.Trainer tokens/s" in doc
    assert "**failed**" in doc and "boom" in doc  # a failed benchmark is reported, not hidden
    assert "not measured yet" in doc
    # the raw figures are linked, not pasted
    link = "[docs/results/benchmarks/objective_overhead.json](results/benchmarks/objective_overhead.json)"
    assert link in doc and "```json" not in doc


def test_run_all_keeps_the_stored_runs(tmp_path, monkeypatch):
    """A benchmark re-run alone replaces its own stored run; the page keeps the others'."""
    monkeypatch.setattr(run_all, "STORE", tmp_path)
    bench = run_all.BENCHMARKS[0]
    o = run_all.Outcome(bench, ["python", "x"], 3.0, 0, "out", "", {"k": 1.5}, "then", ["CPU: x"])
    run_all.save(o)
    back = run_all.stored(bench)
    assert back is not None and back.__dict__ == o.__dict__
    assert run_all.stored(run_all.BENCHMARKS[1]) is None


def test_run_all_rejects_unknown_benchmark():
    with pytest.raises(SystemExit) as e:
        run_all.main(["--only", "nope"])
    assert e.value.code == 2


# ----------------------------------------------------------------------------- helpers
def test_interleave_alternates_after_warmup():
    calls: list[str] = []
    times = common.interleave(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 2, 1
    )
    assert calls == ["a", "b", "a", "b", "a", "b"]
    assert [len(v) for v in times.values()] == [2, 2]


def test_ratio_summary_pairs_rounds_and_applies_target():
    # per-round ratios 2/1, 3/2, 8/4 = 2.0, 1.5, 2.0: median 2.0
    s = common.ratio_summary([2.0, 3.0, 8.0], [1.0, 2.0, 4.0], target=1.4, higher_is_better=False)
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.5, 2.0, 3)
    assert s["met"] is False
    assert common.ratio_summary([1.0], [1.0], 1.0, True)["met"] is True
    with pytest.raises(ValueError, match="3 vs 2"):
        common.paired_ratios([1.0, 2.0, 3.0], [1.0, 2.0])


def test_published_figures_name_no_path_of_the_machine(tmp_path):
    """A checkout at /work/main with its environment in .venv, home /home/me: what a benchmark
    prints or stores is written relative to the checkout, temporary folders as <tmp>."""
    paths = common.machine_paths(Path("/work/main"), "/work/main/.venv")
    paths[-1] = ("/home/me", "~")  # this machine's home folder, made explicit
    tmp = tempfile.gettempdir()
    value = {
        "command": ["/work/main/.venv/bin/python", "/work/main/benchmarks/x.py", "--json",
                    "/work/main/runs/benchmarks/x.json"],
        "cli": f"python -m lm_eval --model_args pretrained={tmp}/uapt-bench-ab12_x/model,dtype=f",
        "data": "dataset.source=/work/shared/data/gsm8k/train.jsonl",
        "home": "/home/me/.cache/uapt and /home/mere/x",
        "other": ["/work/mainly", "https://example.org/work/main/x", 3, None],
    }  # fmt: skip
    assert common.publishable(value, paths) == {
        "command": ["python", "benchmarks/x.py", "--json", "runs/benchmarks/x.json"],
        "cli": "python -m lm_eval --model_args pretrained=<tmp>/model,dtype=f",
        "data": "dataset.source=../shared/data/gsm8k/train.jsonl",
        "home": "~/.cache/uapt and /home/mere/x",
        "other": ["../mainly", "https://example.org/work/main/x", 3, None],
    }
    out = tmp_path / "x.json"
    common.write_json(out, {"json": str(common.REPO / "runs" / "x.json")})
    assert json.loads(out.read_text()) == {"json": "runs/x.json"}


def test_nll_task_quick(out_dir):
    payload, _ = run_quick("nll_task", out_dir)
    check_machine(payload)
    seconds, speedup = payload["seconds"], payload["speedup"]
    assert len(seconds["chunked"]) == len(seconds["full_logits"]) == speedup["n"]
    assert speedup["median"] == pytest.approx(
        paired_median(seconds["full_logits"], seconds["chunked"])
    )
    assert speedup["met"] == (speedup["median"] >= speedup["target"] == 1.3)
    # the same NLLs: both paths take a float32 log-softmax of the same hidden states; the full
    # path's batched cross-entropy is ~1e-4 nats off a float64 reference (module docstring)
    assert payload["max_abs_difference"] < 1e-3
    assert len(run_all.rows_nll_task(payload)) == 1
