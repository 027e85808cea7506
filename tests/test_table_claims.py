"""uapt-table for published claims: the deltas' marks adjusted for multiple comparisons (Holm,
Benjamini-Hochberg) from the bootstrap p-values, and notes on cells whose runs come from
different code. Golden values are computed here by hand or by naive references (and scipy's
own Benjamini-Hochberg), never by uapt."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import false_discovery_control
from test_table import EXPERIMENT, RUNS, _ci_runs

from uapt.table import build_table, load_runs, load_table_spec, to_markdown
from uapt.table.adjust import adjusted
from uapt.table.cli import main

GEMMA = ("gemma2_2b", "alpaca")


def naive_holm(p: list[float]) -> list[float]:
    """Holm's step-down adjustment by its definition: the i-th smallest p times (m - i + 1),
    made monotone from the smallest up, capped at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    out, running = [0.0] * m, 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def naive_bh(p: list[float]) -> list[float]:
    """Benjamini-Hochberg's step-up adjustment: the i-th smallest p times m / i, made monotone
    from the largest down, capped at 1."""
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i], reverse=True)
    out, running = [0.0] * m, 1.0
    for k, i in enumerate(order):
        running = min(running, m / (m - k) * p[i])
        out[i] = min(1.0, running)
    return out


CONSTRUCTED = [
    [0.01, 0.04, 0.03, 0.2],  # by hand: Holm 0.04, 0.09, 0.09, 0.2; BH 0.04, 0.0533, 0.0533, 0.2
    [2 / 10001] * 5 + [0.3, 0.6],  # ties at the bootstrap floor, like the golden table's
    list(np.random.default_rng(3).uniform(0, 0.2, 40)),
    [1.0, 1.0, 0.5],
    [0.049],
]


@pytest.mark.parametrize("p", CONSTRUCTED)
@pytest.mark.parametrize("alpha", [0.05, 0.1])
def test_adjusted_p_values_equal_the_definitions_and_scipy(p, alpha):
    holm, holm_kept = adjusted(p, "holm", alpha)
    bh, bh_kept = adjusted(p, "bh", alpha)
    assert holm == pytest.approx(naive_holm(p), abs=1e-15)
    assert bh == pytest.approx(naive_bh(p), abs=1e-15)
    assert bh == pytest.approx(list(false_discovery_control(p, method="bh")), abs=1e-15)
    assert holm_kept == [x <= alpha for x in naive_holm(p)]
    assert bh_kept == [x <= alpha for x in naive_bh(p)]
    assert adjusted(p, "none", alpha) == (p, [x <= alpha for x in p])


def test_adjustment_by_hand():
    holm, kept = adjusted([0.01, 0.04, 0.03, 0.2], "holm", 0.05)
    assert holm == pytest.approx([0.04, 0.09, 0.09, 0.2]) and kept == [True, False, False, False]
    bh, kept = adjusted([0.01, 0.04, 0.03, 0.2], "bh", 0.05)
    assert bh == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2]) and kept == [True] + [False] * 3
    with pytest.raises(ValueError, match="bonferroni"):
        adjusted([0.1], "bonferroni", 0.05)


@pytest.mark.parametrize("method", ["holm", "bh", "none"])
def test_a_table_of_identical_runs_has_no_survivor(tmp_path, method):
    exp = _ci_runs(tmp_path / "runs", same=True)
    runs, _ = load_runs([tmp_path / "runs"])
    table = build_table(load_table_spec(exp), runs, adjust=method)
    tested = [c for c in table.cells.values() if c.ci is not None]
    assert len(tested) == 3 and not any(c.marked for c in tested)
    assert all(c.ci.p_value == 1.0 and c.p_adjusted == 1.0 for c in tested)
    md = to_markdown(table)
    assert "\\*" not in md.split("\n- ")[0]  # no delta marked
    survive = "interval that excludes 0, 0 of 3;" if method == "none" else "0 of 3 survive"
    assert survive in md


def csv_rows(argv: list[str], capsys) -> dict[tuple[str, str, str], dict[str, str]]:
    assert main([str(EXPERIMENT), "--runs", str(RUNS), "--format", "csv", *argv]) == 0
    rows = csv.DictReader(io.StringIO(capsys.readouterr().out))
    return {(r["model"], r["metric"], r["objective"]): r for r in rows}


def test_the_golden_tables_p_values_by_hand(capsys):
    """The golden table tests 7 deltas; six are seeds-only, tested by the exact sign-flip test.
    masked_mle pairs 2 seeds that moved the same way on IFEval, GSM8K and val loss: 2 of the 4
    sign patterns are as extreme, p = 0.5. masked_mle_distill pairs 3 seeds that moved the same
    way on IFEval and GSM8K: p = 2/8 = 0.25; on val loss its per-seed differences are -0.05, -0.05,
    +0.03 (1.45-1.50, 1.47-1.52, 1.49-1.46), and |±0.05 ±0.05 ±0.03| >= 0.07 for 4 of the 8
    patterns: p = 0.5. The seventh (tiny, one seed, per-sample outcomes) has a bootstrap p above
    0.05. Holm multiplies the smallest (0.25) by 7: every adjusted p is 1. BH: 7/j times the j-th
    smallest, running minimum from the top: 7/6 x 0.5 = 7/12 for all six, the largest stays."""
    six = {
        ("gemma2_2b", "IFEval", "masked_mle"): 0.5,
        ("gemma2_2b", "GSM8K", "masked_mle"): 0.5,
        ("gemma2_2b", "val loss", "masked_mle"): 0.5,
        ("gemma2_2b", "IFEval", "masked_mle_distill"): 0.25,
        ("gemma2_2b", "GSM8K", "masked_mle_distill"): 0.25,
        ("gemma2_2b", "val loss", "masked_mle_distill"): 0.5,
    }
    by_method = {m: csv_rows(["--adjust", m], capsys) for m in ("holm", "bh", "none")}
    for key, p in six.items():
        for method, adjusted_p in (("holm", 1.0), ("bh", 7 / 12), ("none", p)):
            row = by_method[method][key]
            assert row["ci_method"] == "seeds"
            assert float(row["p_value"]) == pytest.approx(p, rel=1e-9)
            assert float(row["p_adjusted"]) == pytest.approx(adjusted_p, rel=1e-9)
            assert (row["adjust"], row["marked"]) == (method, "false")
    tiny = by_method["holm"][("tiny", "IFEval", "masked_mle_distill")]
    assert float(tiny["p_value"]) > 0.05 and tiny["marked"] == "false"
    baseline = by_method["holm"][("gemma2_2b", "IFEval", "mle")]
    assert baseline["p_value"] == baseline["p_adjusted"] == baseline["marked"] == ""


def test_too_few_draws_for_holm_are_named(capsys):
    """With 20 draws no p-value is below 2/21, above Holm's first threshold 0.05/7: nothing
    can survive, and the note says how many draws would lift that floor (2 * 7 / 0.05 - 1)."""
    assert main([str(EXPERIMENT), "--runs", str(RUNS), "--format", "markdown",
                 "--bootstrap", "20"]) == 0  # fmt: skip
    md = capsys.readouterr().out
    assert "0 of 7 survive; 5 of 7 intervals exclude 0 without adjustment" in md
    assert "no delta can survive; --bootstrap 279 or more lifts that floor" in md
    assert "\\*" not in md.split("\n- ")[0]


# --------------------------------------------------------------------------- mixed code
EXP = """title: code
runs: {experiment: code}
rows: [model]
columns: {field: objective, values: [A, B]}
cells: [{label: acc, path: eval.qa.acc, scale: 100}]
baseline: A
base: false
"""


def write_run(root: Path, objective: str, seed: int, acc: float, **code) -> None:
    slug = f"m-{objective}-s{seed}"
    folder = root / f"{slug}-{objective}{seed:09d}"
    folder.mkdir(parents=True)
    record = {
        "id": folder.name[-10:], "slug": slug, "status": "completed", "error": None,
        "summary": {"model": "m", "objective": objective, "seed": seed, "experiment": "code"},
        "config": {}, "eval": {"qa": {"acc": acc}},
        "versions": {"torch": code.pop("torch", "2.13.0"), "uapt": "0.1.0"}, **code,
    }  # fmt: skip
    (folder / "run.json").write_text(json.dumps(record))


def code_table(tmp_path: Path, runs: list[tuple[str, int, dict]]) -> list[str]:
    root = tmp_path / "runs"
    for i, (objective, seed, code) in enumerate(runs):
        write_run(root, objective, seed, 0.5 + 0.01 * i, **code)
    (tmp_path / "code.yaml").write_text(EXP)
    found, _ = load_runs([root])
    return build_table(load_table_spec(tmp_path / "code.yaml"), found).notes


CLEAN = {"provenance": {"commit": "a" * 40, "dirty": False, "diff_sha256": None}}
DIRTY = {"provenance": {"commit": "b" * 40, "dirty": True, "diff_sha256": "d" * 64}}


def test_a_dirty_and_a_clean_run_in_one_cell_are_noted_and_named(tmp_path):
    notes = code_table(
        tmp_path, [("A", 0, CLEAN), ("A", 1, CLEAN), ("B", 0, CLEAN), ("B", 1, DIRTY)]
    )
    assert (
        "cell m / B pools runs of different code (differing in commit, diff_sha256, dirty): "
        "m-B-s0: aaaaaaa; m-B-s1: bbbbbbb+diff dddddddd." in notes
    )
    assert not any(n.startswith("cell m / A pools") for n in notes)  # one code in A
    assert "Runs from a dirty tree (uncommitted changes): m-B-s1 (bbbbbbb+diff dddddddd)." in notes
    assert any(n.startswith("The 4 runs come from 2 commits (runs per commit): aaaaaaa (3), "
                            "bbbbbbb (1)") for n in notes)  # fmt: skip


def test_records_from_before_provenance_say_dirty_without_a_diff(tmp_path):
    old_dirty, old_clean = {"git_commit": "c" * 40 + "-dirty"}, {"git_commit": "c" * 40}
    notes = code_table(tmp_path, [("A", 0, old_clean), ("A", 1, old_dirty), ("B", 0, old_clean)])
    assert "cell m / A pools runs of different code (differing in dirty): m-A-s0: ccccccc; " \
        "m-A-s1: ccccccc-dirty." in notes  # fmt: skip
    assert (
        "Runs from a dirty tree (uncommitted changes; 1 without a saved diff, so what changed "
        "is unknown): m-A-s1 (ccccccc-dirty)." in notes
    )
    assert not any("commits (runs per commit)" in n for n in notes)  # one commit


def test_package_versions_that_differ_in_a_cell_are_named(tmp_path):
    other_torch = {**CLEAN, "torch": "2.12.0"}
    notes = code_table(tmp_path, [("A", 0, CLEAN), ("A", 1, other_torch), ("B", 0, CLEAN)])
    assert (
        "cell m / A pools runs of different code (differing in versions.torch): "
        "m-A-s0: aaaaaaa torch 2.13.0; m-A-s1: aaaaaaa torch 2.12.0." in notes
    )
    same = code_table(tmp_path / "same", [("A", 0, CLEAN), ("A", 1, CLEAN), ("B", 0, CLEAN)])
    assert not any("code" in n or "dirty" in n or "commits" in n for n in same)


def test_the_csv_carries_raw_and_adjusted_p_values(capsys):
    rows = csv_rows([], capsys)
    header = next(iter(rows.values())).keys()
    assert list(header)[-4:] == ["p_value", "p_adjusted", "adjust", "marked"]
    tested = [r for r in rows.values() if r["p_value"]]
    assert len(tested) == 7 and {r["adjust"] for r in tested} == {"holm"}
    assert all(float(r["p_adjusted"]) >= float(r["p_value"]) for r in tested)
