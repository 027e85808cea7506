"""The README's demo, end to end and narrowed for CI: sweep=demo on SmolLM2, then its table and plot."""

from __future__ import annotations

import pytest
from helpers import records, run_cli, train

pytestmark = pytest.mark.slow


def test_demo_sweep_table_and_plot(tmp_path):
    runs, plots = tmp_path / "runs", tmp_path / "plots"
    proc = train(
        "sweep=demo",
        "objective=mle,masked_mle_distill",
        "trainer.max_steps=2",
        "dataset.num_train=16",
        "eval.limit=2",
        "eval.tasks.0.max_gen_toks=48",
        "eval.tasks.1.max_gen_toks=48",
        "logger=none",
        f"runs_dir={runs}",
        check=True,
    )
    assert "sweep: 2 completed, 0 skipped, 0 failed" in proc.stdout
    done = records(runs)
    assert {r["summary"]["objective"] for r in done} == {"mle", "masked_mle_distill"}
    for record in done:
        assert record["status"] == "completed" and record["summary"]["experiment"] == "demo"
        assert set(record["eval"]) == {"arith", "ifeval_embedded"}
        assert set(record["eval_base"]) == {"arith", "ifeval_embedded"}
        assert "prompt_level_strict_acc" in record["eval_delta"]["ifeval_embedded"]

    table = run_cli(
        "uapt.table",
        "experiments/demo.yaml",
        "--runs",
        str(runs),
        "--plot",
        str(plots),
        "--format",
        "markdown",
        check=True,
    )
    assert "| mle" in table.stdout or "mle" in table.stdout
    assert "masked_mle_distill" in table.stdout
    pngs = list(plots.glob("*.png"))
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs)
