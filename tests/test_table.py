"""uapt-table: hand-written run records in, hand-written golden table out (no GPU, no models)."""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from uapt.table import (
    TableSpecError,
    build_table,
    load_runs,
    load_table_spec,
    make_plots,
    split_path,
    to_csv,
    to_latex,
    to_markdown,
    to_text,
)
from uapt.table.cli import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
RUNS = FIXTURES / "table_runs" / "runs"
EXPERIMENT = FIXTURES / "table_runs" / "experiment.yaml"
GOLDEN = FIXTURES / "table_golden.md"
SHIPPED = sorted((REPO / "experiments").glob("*.yaml"))
GEMMA, TINY = ("gemma2_2b", "alpaca"), ("tiny", "alpaca")


@pytest.fixture(scope="module")
def golden_table():
    runs, problems = load_runs([RUNS])
    assert problems == []
    return build_table(load_table_spec(EXPERIMENT), runs, problems)


def test_markdown_matches_hand_written_golden(golden_table):
    assert to_markdown(golden_table) == GOLDEN.read_text()


def test_cli_markdown_matches_golden():
    proc = subprocess.run(
        [sys.executable, "-m", "uapt.table", str(EXPERIMENT), "--runs", str(RUNS),
         "--format", "markdown"],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == GOLDEN.read_text()


def test_cells_match_a_naive_reference(golden_table):
    """Recompute every cell straight from the JSON files with the statistics module."""
    groups = defaultdict(list)
    for path in RUNS.glob("*/run.json"):
        rec = json.loads(path.read_text())
        s = rec["summary"]
        if rec["status"] == "completed" and s["experiment"] == "golden":
            groups[(s["model"], s["dataset"], s["objective"])].append(rec)
    checked = 0
    for (model, dataset, objective), recs in groups.items():
        ifeval = [100 * r["eval"]["ifeval"]["prompt_level_strict_acc"] for r in recs]
        loss = [r["metrics"]["val/loss"] for r in recs]
        for label, values in (("IFEval", ifeval), ("val loss", loss)):
            cell = golden_table.cells[((model, dataset), label, objective)]
            assert cell.n == len(values)
            assert cell.mean == pytest.approx(statistics.mean(values))
            if len(values) > 1:
                assert cell.std == pytest.approx(statistics.stdev(values))
            else:
                assert cell.std is None
            checked += 1
    assert checked == 2 * 5  # two metrics x (3 gemma objectives with results + 2 tiny)


def test_failed_and_running_runs_are_counted_not_aggregated(golden_table):
    masked = golden_table.cells[(GEMMA, "IFEval", "masked_mle")]
    assert masked.n == 2 and dict(masked.incomplete) == {"failed": 1}
    running = golden_table.cells[(GEMMA, "IFEval", "self_distill")]
    assert running.n == 0 and dict(running.incomplete) == {"running": 1}
    assert "Not aggregated: 1 failed, 1 running." in golden_table.notes
    # a run of another experiment (seed 3, IFEval 0.90) never reaches the table
    assert golden_table.cells[(GEMMA, "IFEval", "mle")].n == 3


def test_expected_cells_without_runs_read_missing(tmp_path):
    text = EXPERIMENT.read_text().replace(
        "values: [mle, masked_mle, self_distill, masked_mle_distill]",
        "values: [mle, masked_mle, self_distill, masked_mle_distill, rho1]",
    )
    exp_file = tmp_path / "exp.yaml"
    exp_file.write_text(text)
    runs, _ = load_runs([RUNS])
    table = build_table(load_table_spec(exp_file), runs)
    md = to_markdown(table)
    assert "| masked_mle_distill | rho1 | paper |" in md
    assert all(table.cells[(rk, m, "rho1")].n == 0 for rk in table.rows for m in ("IFEval",))
    tiny_gsm8k = next(line for line in md.splitlines() if "| GSM8K | missing |" in line)
    assert tiny_gsm8k.count("missing") == 6  # base + 5 columns
    # a whole expected row (full product of listed row values) with no runs at all
    text = text.replace("rows: [model, dataset]",
                        "rows:\n  - {field: model, values: [gemma2_2b, tiny, phi2]}\n"
                        "  - {field: dataset, values: [alpaca]}")  # fmt: skip
    exp_file.write_text(text)
    table = build_table(load_table_spec(exp_file), runs)
    assert table.rows == [GEMMA, TINY, ("phi2", "alpaca")]
    assert "| phi2 | alpaca | IFEval | missing | missing |" in to_markdown(table)


def test_pooling_runs_that_differ_in_more_than_the_seed_is_flagged(tmp_path):
    runs_dir = tmp_path / "runs"
    shutil.copytree(RUNS, runs_dir)
    src = next(runs_dir.glob("gemma2_2b-alpaca-mle-r0-l0-s0-*"))
    rec = json.loads((src / "run.json").read_text())
    rec["id"], rec["config"]["trainer"]["lr"] = "0123456789", 3e-5
    (runs_dir / "copy-0123456789").mkdir()
    (runs_dir / "copy-0123456789" / "run.json").write_text(json.dumps(rec))
    runs, _ = load_runs([runs_dir])
    table = build_table(load_table_spec(EXPERIMENT), runs)
    note = next(n for n in table.notes if n.startswith("cell gemma2_2b / alpaca / mle pools"))
    assert "4 runs of 2 configurations (differing in trainer.lr)" in note
    assert "repeated seed(s) 0" in note


def test_a_run_found_twice_is_counted_once():
    runs, _ = load_runs([RUNS, RUNS])
    table = build_table(load_table_spec(EXPERIMENT), runs)
    assert table.cells[(GEMMA, "IFEval", "mle")].n == 3
    assert any("found twice" in n for n in table.notes)


def test_unreadable_records_are_reported(tmp_path):
    (tmp_path / "broken-1").mkdir()
    (tmp_path / "broken-1" / "run.json").write_text("{not json")
    (tmp_path / "empty-2").mkdir()
    (tmp_path / ".sweeps").mkdir()  # hidden: the sweep bookkeeping, not a run
    runs, problems = load_runs([tmp_path])
    assert runs == [] and len(problems) == 2
    table = build_table(load_table_spec(EXPERIMENT), runs, problems)
    assert any(n.startswith("not loaded:") and "broken-1" in n for n in table.notes)
    assert "No run matched the experiment's `runs` filter." in table.notes


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("metrics.val/loss", ("metrics", "val/loss")),
        ("eval.gsm8k.exact_match,strict-match", ("eval", "gsm8k", "exact_match,strict-match")),
        ('eval."task.v2".acc', ("eval", "task.v2", "acc")),
        ('"a.b"', ("a.b",)),
    ],
)
def test_split_path(text, expected):
    assert split_path(text) == expected


@pytest.mark.parametrize("text", ["eval..acc", "eval.", '"open', '"a"b'])
def test_split_path_rejects(text):
    with pytest.raises(ValueError):
        split_path(text)


def test_csv_is_tidy_with_full_precision(golden_table):
    rows = list(csv.DictReader(io.StringIO(to_csv(golden_table))))
    assert len(rows) == 2 * 3 * 4  # row groups x metrics x columns
    by_key = {(r["model"], r["metric"], r["objective"]): r for r in rows}
    md = by_key[("gemma2_2b", "IFEval", "masked_mle_distill")]
    assert (md["mean"], md["std"], md["n"], md["delta"], md["base"], md["paper_delta"]) == (
        "50", "1", "3", "8", "35", "7.5")  # fmt: skip
    # seeds-only over 3 paired seeds: the range of the differences 9, 6, 9 (test_bootstrap.py)
    assert float(md["delta_lo"]) == pytest.approx(6) and float(md["delta_hi"]) == pytest.approx(9)
    assert (md["delta_significant"], md["ci_method"], md["ci_paired_seeds"]) == (
        "true",
        "seeds",
        "3",
    )
    assert (md["ci_level"], md["ci_draws"], md["ci_seed"]) == ("0.95", "10000", "0")
    tiny = by_key[("tiny", "IFEval", "masked_mle_distill")]
    assert (tiny["delta_lo"], tiny["delta_hi"], tiny["delta_significant"], tiny["ci_method"]) == (
        "0", "7.5", "false", "samples")  # fmt: skip
    for key in (("gemma2_2b", "IFEval", "mle"), ("tiny", "val loss", "masked_mle_distill")):
        assert by_key[key]["delta_lo"] == by_key[key]["ci_method"] == ""  # baseline; no interval
    assert float(by_key[("gemma2_2b", "val loss", "mle")]["mean"]) == pytest.approx(4.48 / 3)
    assert by_key[("gemma2_2b", "IFEval", "masked_mle")]["not_aggregated"] == "1 failed"
    assert by_key[("tiny", "GSM8K", "mle")]["mean"] == "" and by_key[("tiny", "GSM8K", "mle")][
        "n"] == "0"  # fmt: skip


def with_a_mark(table):
    """The golden table with one delta marked: its seeds-only deltas cannot earn a mark (the
    sign-flip test over 2-3 seeds), so the renderers' marker is checked on a copy."""
    marked = copy.deepcopy(table)
    marked.cells[(("gemma2_2b", "alpaca"), "IFEval", "masked_mle_distill")].marked = True
    return marked


def test_latex_is_booktabs_and_escaped(golden_table):
    tex = to_latex(with_a_mark(golden_table))
    assert tex.startswith("\\begin{table}") and tex.rstrip().endswith("\\end{table}")
    for rule in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}{lllrrrrrl}"):
        assert rule in tex
    assert "masked\\_mle\\_distill" in tex
    assert "50.0 $\\pm$ 1.0 (+8.0* [+6.0, +9.0]) [n=3]" in tex
    body = [line for line in tex.splitlines() if line.rstrip().endswith("\\\\")]
    assert len(body) == 1 + 6 and all(line.count("&") == 8 for line in body)


def test_rich_rendering_keeps_cells_whole(golden_table):
    text = to_text(with_a_mark(golden_table))
    assert "Golden fixture table" in text
    assert "50.0 ± 1.0 (+8.0* [+6.0, +9.0]) [n=3]" in text
    assert "• [lo, hi]: 95 % percentile interval of Δ from a paired bootstrap (10000 draws" in text
    assert "• Not aggregated: 1 failed, 1 running." in text


def test_cli_writes_output_and_plots(tmp_path, capsys):
    out, plots = tmp_path / "t" / "table.tex", tmp_path / "plots"
    argv = [str(EXPERIMENT), "--runs", str(RUNS), "--format", "latex", "--output", str(out),
            "--plot", str(plots)]  # fmt: skip
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert out.read_text().startswith("\\begin{table}")
    pngs = sorted(plots.glob("*.png"))
    assert [p.name for p in pngs] == [
        "experiment-distill_weight-gsm8k.png",
        "experiment-id_vs_ood-gsm8k-ifeval.png",
        "experiment-mask_ratio-ifeval.png",
    ]
    for png in pngs:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"wrote {png}" in err
    assert f"wrote {out}" in err


def test_cli_errors(tmp_path, capsys):
    assert main([str(EXPERIMENT), "--runs", str(tmp_path / "nope")]) == 2
    assert "runs directory not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: t\nrows: [model]\ncolumns: objective\n")
    assert main([str(bad), "--runs", str(RUNS)]) == 2
    assert f"{bad}: cells: required key is missing" in capsys.readouterr().err


GOOD = """title: t
rows: [model]
columns: {field: objective, values: [mle, masked_mle]}
cells:
  - {label: a, path: eval.ifeval.prompt_level_strict_acc}
"""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("colour: red\n", ":6: colour: unknown key"),
        ("title: again\n", ":6: duplicate key 'title'"),
        ("baseline: sft\n", ":6: baseline: 'sft' is not among columns.values"),
        ("runs: {mask_ratio: {gtt: 0.1}}\n", ":6: runs.mask_ratio.gtt: unknown operator"),
        ("runs: {mask_ratio: {in: 0.1}}\n", ":6: runs.mask_ratio.in: expected a list"),
        ("plots: [{kind: bar, metric: a}]\n", ":6: plots[0].kind: 'bar' is not one of"),
        ("plots: [{kind: mask_ratio, metric: b}]\n", ":6: plots[0].metric: 'b' is not a cell"),
        ("plots: [{kind: id_vs_ood, x: a}]\n", ":6: plots[0].y: required for kind id_vs_ood"),
        ("plots: [{kind: mask_ratio}]\n", ":6: plots[0].metric: required"),
        (
            "paper: [{metric: a, row: {seed: 0}, column: mle, delta: 1, vs: mle}]\n",
            ":6: paper[0].row.seed: not a row field",
        ),
        ("paper: [{metric: a, column: mle, delta: 1}]\n", ":6: paper[0]: vs (the column"),
        ("paper: [{metric: zz, column: mle, value: 1}]\n", ":6: paper[0].metric: 'zz' is not"),
        ("cells: [{label: a, path: accuracy}]\n", None),
    ],
)
def test_bad_experiment_files_name_the_key(tmp_path, extra, message):
    path = tmp_path / "exp.yaml"
    if message is None:  # replace the cells instead of adding a key
        path.write_text(GOOD.split("cells:")[0] + extra)
        message = ":4: cells[0].path: a metric path needs at least two segments"
    else:
        path.write_text(GOOD + extra)
    with pytest.raises(TableSpecError) as info:
        load_table_spec(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("cells", "message"),
    [
        ("  - {label: a, path: eval..acc}\n", "cells[0].path: empty segment"),
        ("  - {label: a, path: eval.x.y, decimals: -1}\n", "cells[0].decimals: expected an int"),
        ("  - {label: a, path: eval.x.y, paths: [eval.x.z]}\n", "cells[0]: give exactly one"),
        ("  - {label: a, path: eval.x.y}\n  - {label: a, path: eval.x.z}\n", "labels must be"),
        ("  - {path: eval.x.y}\n", "cells[0].label: required key is missing"),
    ],
)
def test_bad_cells_name_the_key(tmp_path, cells, message):
    path = tmp_path / "exp.yaml"
    path.write_text(GOOD.split("cells:")[0] + "cells:\n" + cells)
    with pytest.raises(TableSpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_table_spec(path)


def test_invalid_yaml_and_non_mapping(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("title: [unclosed\n")
    with pytest.raises(TableSpecError, match="invalid YAML"):
        load_table_spec(path)
    path.write_text("- a\n- b\n")
    with pytest.raises(TableSpecError, match="expected a mapping"):
        load_table_spec(path)


# --------------------------------------------------------------------------- shipped experiments


def _write_run(folder: Path, summary: dict, eval_: dict, eval_base: dict, val_loss: float) -> None:
    folder.mkdir(parents=True)
    record = {
        "id": folder.name[-10:], "slug": folder.name[:-11], "status": "completed", "error": None,
        "summary": summary, "config": {}, "metrics": {"val/loss": val_loss},
        "eval": eval_, "eval_base": eval_base,
    }  # fmt: skip
    (folder / "run.json").write_text(json.dumps(record))
    curve_keys = ("val/loss", "kept_overlap", "nll/kept", "nll/unkept")
    rows = [{"step": step, **{k: val_loss + 1 / step for k in curve_keys}} for step in (1, 2, 3)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _synthetic_runs(exp, root: Path) -> int:
    """Two seeds of every expected column value (and of lambda = 0 and > 0 where rows split on
    it), with every metric the experiment reads."""
    experiment = next(cond.tests[0][1] for name, _, cond in exp.filters if name == "experiment")
    column = exp.column.path[-1]
    variants = []
    for value in exp.column.expected():
        v = {"objective": "masked_mle_distill", "mask_ratio": 0.5, "distill_weight": 1.0}
        v[column] = value
        if column == "variant":  # e.g. masked_mle_distill-r0.5-l0.3: the knobs it names
            name, *knobs = value.split("-")
            knob = {k[0]: float(k[1:]) for k in knobs}
            v.update(
                objective=name, mask_ratio=knob.get("r", 0.0), distill_weight=knob.get("l", 0.0)
            )
        variants.append(v)
        if any(a.name == "distill_weight" for a in exp.rows):
            variants.append({**v, "distill_weight": 0.0})
    paths = {p for m in exp.cells for p in m.paths if p[0] == "eval"}
    count = 0
    for i, v in enumerate(variants):
        for seed in (0, 1):
            score = 0.2 + 0.05 * i + 0.01 * seed
            eval_, base = {}, {}
            for _, task, metric in paths:
                eval_.setdefault(task, {})[metric] = score
                base.setdefault(task, {})[metric] = 0.1
            summary = {"model": "tiny", "dataset": "arith", "seed": seed,
                       "experiment": experiment, **v}  # fmt: skip
            _write_run(root / f"run{i}-s{seed}-{i:08d}{seed:02d}", summary, eval_, base, 2 - score)
            count += 1
    return count


@pytest.mark.slow  # measured over 2 s (make test-fast stays under 90 s)
@pytest.mark.parametrize("path", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_experiments_validate_render_and_plot(path, tmp_path):
    exp = load_table_spec(path)
    assert any(name == "experiment" for name, _, _ in exp.filters), "filter by summary.experiment"
    n_runs = _synthetic_runs(exp, tmp_path / "runs")
    runs, problems = load_runs([tmp_path / "runs"])
    assert len(runs) == n_runs and problems == []
    table = build_table(exp, runs, problems)
    assert table.rows and all(cell.n == 2 for cell in table.cells.values())
    assert not any("pools" in n for n in table.notes)
    assert "Mean ± sample std (ddof=1) over seeds; n = 2 per cell." in table.notes
    for metric in exp.cells:  # base scores exist for eval metrics, "—" for the rest
        expected = float if metric.base_paths else type(None)
        assert all(isinstance(table.base[(rk, metric.label)], expected) for rk in table.rows)
    for render in (to_markdown, to_csv, to_latex, to_text):
        assert "missing" not in render(table)
    written, notes = make_plots(exp, runs, tmp_path / "plots")
    assert len(written) == len(exp.plots) and notes == []
    assert all(p.stat().st_size > 10_000 for p in written)


def test_operators_list_paths_labels_and_a_single_row_group(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        "title: quick\n"
        "runs: {experiment: golden, model: gemma2_2b, mask_ratio: {ge: 0, lt: 0.5}}\n"
        "rows: []\n"
        "columns: {field: objective, labels: {mle: SFT}}\n"
        "cells:\n"
        "  - {label: IFEval, path: [eval, ifeval, prompt_level_strict_acc], scale: 100}\n"
        '  - {label: GSM8K, path: "eval.gsm8k.exact_match,strict-match", scale: 100}\n'
        "baseline: mle\n"
        "base: false\n"
    )
    runs, _ = load_runs([RUNS])
    table = build_table(load_table_spec(path), runs)
    # mask_ratio < 0.5 keeps mle (rho 0) and self_distill (rho 0, running); baseline first
    assert table.rows == [()] and table.columns == ["mle", "self_distill"]
    md = to_markdown(table)
    assert "| metric | SFT | self_distill |" in md
    assert "| IFEval | 42.0 ± 2.0 | missing (1 running) |" in md
    assert "| GSM8K | 22.0 ± 2.0 | missing (1 running) |" in md


def test_curve_plots_mean_and_band_over_seeds_per_column(tmp_path):
    rows = {  # (variant, seed) -> val/loss per step; s1 of "b" misses step 3 (killed)
        ("a", 0): {1: 2.0, 2: 1.0, 3: 0.5},
        ("a", 1): {1: 4.0, 2: 3.0, 3: 1.5},
        ("b", 0): {1: 1.0, 2: 0.8, 3: 0.7},
        ("b", 1): {1: 3.0, 2: 1.2},
    }
    for (variant, seed), curve in rows.items():
        folder = tmp_path / "runs" / f"{variant}-s{seed}-{seed:010d}"
        summary = {"model": "tiny", "dataset": "arith", "variant": variant, "seed": seed,
                   "experiment": "curves"}  # fmt: skip
        _write_run(folder, summary, {}, {}, 0.0)
        lines = [json.dumps({"step": s, "val/loss": v}) for s, v in curve.items()]
        (folder / "metrics.jsonl").write_text("\n".join([*lines, '{"step": 9, "val/lo']))
    exp_path = tmp_path / "curves.yaml"
    exp_path.write_text(
        "title: curves\nruns: {experiment: curves}\nrows: [model]\n"
        "columns: {field: variant, values: [a, b]}\n"
        "cells: [{label: val, path: metrics.val/loss}]\n"
        "plots: [{kind: curve, metric: val/loss, file: c.png}]\n"
    )
    runs, _ = load_runs([tmp_path / "runs"])
    from matplotlib.figure import Figure

    from uapt.table.plots import _draw_curve

    spec = load_table_spec(exp_path).plots[0]
    fig = Figure()
    assert _draw_curve(fig, spec, runs, [])
    (ax,) = fig.axes
    drawn = {
        line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines
    }
    # by hand: means over the two seeds at the steps both logged (b: steps 1 and 2 only)
    assert drawn == {"a (n=2)": ([1, 2, 3], [3.0, 2.0, 1.0]), "b (n=2)": ([1, 2], [2.0, 1.0])}
    band = ax.collections[0].get_paths()[0].vertices[:, 1]
    std_a1 = statistics.stdev([2.0, 4.0])
    assert min(band) == pytest.approx(min(3.0 - std_a1, 1.0 - statistics.stdev([0.5, 1.5])))
    written, notes = make_plots(load_table_spec(exp_path), runs, tmp_path / "plots")
    assert [p.name for p in written] == ["c.png"] and notes == []


def test_curve_metric_must_be_a_metrics_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "title: t\nrows: []\ncolumns: {field: variant}\ncells: [{label: v, path: metrics.x}]\n"
        "plots: [{kind: curve, metric: 3}]\n"
    )
    with pytest.raises(TableSpecError, match=r"expected a metrics\.jsonl key"):
        load_table_spec(path)


def test_the_published_cpu_reproduction_is_regenerated_from_its_records():
    """docs/results/cpu_repro.md quotes this table: the committed records must still give it."""
    exp = load_table_spec(REPO / "experiments" / "cpu_repro.yaml")
    runs, problems = load_runs([REPO / "docs" / "results" / "cpu_repro" / "runs"])
    assert len(runs) == 12 and problems == []
    md = to_markdown(build_table(exp, runs, problems))
    # records made before per-sample outcomes were kept: seeds-only intervals, which over two
    # seeds span the two paired differences (37.5 - 37.5, 43.75 - 42.1875), and a note
    assert "| arith EM | 0.0 | 39.8 ± 3.3 | 40.6 ± 4.4 (+0.8 [+0.0, +1.6]) |" in md
    assert "Seeds-only intervals (no per-sample outcomes: runs without eval_outcomes.jsonl" in md
    assert "missing" not in md and "n = 2 per cell" in md
    doc = (REPO / "docs" / "results" / "cpu_repro.md").read_text()
    assert md.strip() in doc  # quoted byte for byte: title, table, notes


def test_the_published_real_data_pilot_is_regenerated_from_its_records():
    """docs/results/cpu_repro_real.md quotes the pilot's table: its committed records must still
    give it, per-sample intervals where both columns kept outcomes."""
    exp = load_table_spec(REPO / "experiments" / "cpu_repro_real_pilot.yaml")
    runs, problems = load_runs([REPO / "docs" / "results" / "cpu_repro_real" / "pilot"])
    assert len(runs) == 5 and problems == []
    table = to_markdown(build_table(exp, runs, problems))
    # the paper's objective (seed 0) against MLE's two-seed mean; the interval resamples the 96
    # prompts of seed 0, the one seed both columns have
    assert (
        "| IFEval inst loose | 29.9 | 20.7 ± 2.3 [n=2] | 19.1 ± — (-1.6 [-7.9, +1.4]) [n=1] |"
        in table
    )
    doc = (REPO / "docs" / "results" / "cpu_repro_real.md").read_text()
    assert table.split("\n- ")[0].strip() in doc  # the title and table, byte for byte


# The grid's objectives as their records' slugs spell them, in each study table's column order.
GRID_OBJECTIVES = [
    "mle-r0-l0",
    "masked_mle-r0.5-l0",
    "self_distill-r0-l1",
    "masked_mle_distill-r0.5-l1",
]
STUDY_COLUMNS = {
    "cpu_repro_real": GRID_OBJECTIVES,
    "cpu_repro_real_vs_base": GRID_OBJECTIVES,
    "cpu_repro_real_sd_effect": GRID_OBJECTIVES[1::2],  # masked, masked+SD
}


def _inst_loose_by_objective(runs_dir: Path) -> dict[str, list[float]]:
    """IFEval instruction-level loose accuracy (%) per run, pooled by hand from its per-prompt
    outcomes (every instruction of every prompt counts once), grouped by objective."""
    scores: dict[str, list[float]] = defaultdict(list)
    for folder in sorted(runs_dir.iterdir()):
        checks = []
        for line in (folder / "eval_outcomes.jsonl").read_text().splitlines():
            row = json.loads(line)
            if (row["task"], row["metric"]) == ("ifeval", "inst_level_loose_acc"):
                checks += row["value"]
        objective = folder.name.split("-gsm8k-")[1].rsplit("-s", 1)[0]
        scores[objective].append(100 * sum(checks) / len(checks))
    return scores


@pytest.mark.parametrize("experiment", sorted(STUDY_COLUMNS))
def test_the_published_real_data_grid_is_regenerated_from_its_records(experiment):
    """docs/results/cpu_repro_real.md quotes the grid's three tables: the committed records must
    still give each of them, and each column's IFEval inst loose is the mean ± std (ddof=1) over
    its 3 seeds of the scores pooled by hand from the per-prompt outcomes."""
    runs_dir = REPO / "docs" / "results" / "cpu_repro_real" / "runs"
    exp = load_table_spec(REPO / "experiments" / f"{experiment}.yaml")
    runs, problems = load_runs([runs_dir])
    assert len(runs) == 12 and problems == []
    table = to_markdown(build_table(exp, runs, problems))
    scores = _inst_loose_by_objective(runs_dir)
    row = next(line for line in table.splitlines() if "| IFEval inst loose |" in line)
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    columns = STUDY_COLUMNS[experiment]
    for objective, cell in zip(columns, cells[-len(columns) :], strict=True):
        values = scores[objective]
        assert len(values) == 3
        assert cell.startswith(f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}")
    doc = (REPO / "docs" / "results" / "cpu_repro_real.md").read_text()
    assert table.split("\n- ")[0].strip() in doc  # the title and table, byte for byte


# --------------------------------------------------------------------------- paired intervals

CI_EXPERIMENT = """title: intervals
runs: {experiment: ci}
rows: [model]
columns: {field: objective, values: [A, B]}
cells:
  - {label: acc, path: eval.qa.acc, scale: 100}
  - {label: two tasks, paths: [eval.qa.acc, eval.mc.acc], scale: 100}
  - {label: val loss, path: metrics.val/loss, decimals: 3}
baseline: A
base: false
"""
NORMAL = statistics.NormalDist()


def _pooled(values) -> float:
    """lm-eval's score from per-sample outcomes: the mean, lists' items pooled."""
    items = [x for v in values for x in (v if isinstance(v, list) else [v])]
    return sum(items) / len(items)


def _ci_run(root: Path, objective: str, seed: int, outcomes: dict, val_loss: float) -> Path:
    """A completed run whose eval scores are the pooled means of its per-sample outcomes
    ({(task, metric): {doc_id: value}}), with eval_outcomes.jsonl beside run.json."""
    folder = root / f"m-{objective}-s{seed}-{objective}{seed:09d}"
    folder.mkdir(parents=True)
    scores: dict = defaultdict(dict)
    for (task, metric), by_doc in outcomes.items():
        scores[task][metric] = _pooled(by_doc.values())
    record = {
        "id": folder.name[-10:], "slug": folder.name[:-11], "status": "completed", "error": None,
        "summary": {"model": "m", "objective": objective, "seed": seed, "experiment": "ci"},
        "config": {}, "metrics": {"val/loss": val_loss}, "eval": scores,
    }  # fmt: skip
    (folder / "run.json").write_text(json.dumps(record))
    lines = [
        json.dumps({"task": task, "metric": metric, "doc_id": doc, "value": value})
        for (task, metric), by_doc in outcomes.items()
        for doc, value in by_doc.items()
    ]
    (folder / "eval_outcomes.jsonl").write_text("".join(line + "\n" for line in lines))
    return folder


def _ci_runs(root: Path, seeds=(0, 1, 2), size: int = 100, same: bool = False) -> Path:
    """Objectives A and B on the same `size` qa questions and 30 mc ones per seed: B right more
    often than A, and right where A is on most questions (paired)."""
    import numpy as np

    for seed in seeds:
        rng = np.random.default_rng(seed)
        runs = {}
        for task, n in (("qa", size), ("mc", 30)):
            a = (rng.random(n) < 0.5).astype(float)
            b = a if same else np.where(rng.random(n) < 0.7, a, (rng.random(n) < 0.8) * 1.0)
            runs[task] = (a, b)
        for objective, side in (("A", 0), ("B", 1)):
            outcomes = {(t, "acc"): dict(enumerate(map(float, v[side]))) for t, v in runs.items()}
            loss = 1.0 + 0.01 * seed - (0 if same else 0.05 * side * (1 + seed % 2))
            _ci_run(root, objective, seed, outcomes, loss)
    exp = root.parent / "ci.yaml"
    exp.write_text(CI_EXPERIMENT)
    return exp


def _csv_rows(text: str) -> dict[tuple[str, str], dict[str, str]]:
    return {(r["metric"], r["objective"]): r for r in csv.DictReader(io.StringIO(text))}


def test_cli_interval_matches_the_normal_approximation(tmp_path, capsys):
    """One seed: the interval of B - A is mean(d) ± z sd(d) / sqrt(n) (ddof=0), d the per-question
    differences, within Monte Carlo error (see tests/test_bootstrap.py for the derivation)."""
    size, level, draws = 3000, 0.9, 20_000
    exp = _ci_runs(tmp_path / "runs", seeds=(0,), size=size)
    argv = [str(exp), "--runs", str(tmp_path / "runs"), "--format", "csv",
            "--ci", str(level), "--bootstrap", str(draws), "--seed", "3"]  # fmt: skip
    assert main(argv) == 0
    rows = _csv_rows(capsys.readouterr().out)
    by_side = {}
    for path in (tmp_path / "runs").glob("*/eval_outcomes.jsonl"):
        side = path.parent.name.split("-")[1]
        lines = map(json.loads, path.read_text().splitlines())
        by_side[side] = {o["doc_id"]: o["value"] for o in lines if o["task"] == "qa"}
    d = [100 * (by_side["B"][i] - by_side["A"][i]) for i in range(size)]
    mean, sd_d = statistics.fmean(d), statistics.pstdev(d)
    sd = sd_d / size**0.5
    z, tail = NORMAL.inv_cdf(1 - (1 - level) / 2), (1 - level) / 2
    # as in tests/test_bootstrap.py: 4 Monte Carlo standard errors of a quantile, the
    # Cornish-Fisher shift of the bootstrap law's skewness skew(d)/sqrt(n), the lattice step
    skew = statistics.fmean((x - mean) ** 3 for x in d) / sd_d**3 / size**0.5
    mc = sd * (tail * (1 - tail) / draws) ** 0.5 / NORMAL.pdf(z)
    tol = 4 * mc + sd * abs(skew) * (z * z - 1) / 6 + 100 / size
    row = rows[("acc", "B")]
    assert float(row["delta"]) == pytest.approx(mean, abs=1e-9)
    assert float(row["delta_lo"]) == pytest.approx(mean - z * sd, abs=tol)
    assert float(row["delta_hi"]) == pytest.approx(mean + z * sd, abs=tol)
    assert row["delta_significant"] == ("true" if float(row["delta_lo"]) > 0 else "false")
    assert [row[k] for k in ("ci_method", "ci_level", "ci_draws", "ci_seed", "ci_paired_seeds")] \
        == ["samples", "0.9", "20000", "3", "1"]  # fmt: skip
    assert rows[("two tasks", "B")]["ci_method"] == "samples"
    assert rows[("val loss", "B")]["delta_lo"] == ""  # one seed, no per-sample outcomes
    assert rows[("acc", "A")]["delta_lo"] == ""  # the baseline itself


def test_identical_columns_give_a_zero_width_interval_at_zero(tmp_path):
    exp = _ci_runs(tmp_path / "runs", same=True)
    runs, _ = load_runs([tmp_path / "runs"])
    table = build_table(load_table_spec(exp), runs)
    md = to_markdown(table)
    for label in ("acc", "two tasks"):
        cell = table.cells[(("m",), label, "B")]
        assert (cell.ci.lo, cell.ci.hi, cell.ci.method) == (0.0, 0.0, "samples+seeds")
        assert f"| {label} | " in md
    assert md.count("(+0.0 [+0.0, +0.0])") == 2 and "(+0.000 [+0.000, +0.000])" in md
    assert "\\*" not in md.split("\n- ")[0]  # no delta marked


def test_swapping_the_baseline_negates_every_interval(tmp_path):
    exp = _ci_runs(tmp_path / "runs")
    swapped = tmp_path / "swapped.yaml"
    swapped.write_text(exp.read_text().replace("baseline: A", "baseline: B"))
    runs, _ = load_runs([tmp_path / "runs"])
    b_vs_a = build_table(load_table_spec(exp), runs)
    a_vs_b = build_table(load_table_spec(swapped), runs)
    for label, method in (("acc", "samples+seeds"), ("two tasks", "samples+seeds"),
                          ("val loss", "seeds")):  # fmt: skip
        one = b_vs_a.cells[(("m",), label, "B")].ci
        other = a_vs_b.cells[(("m",), label, "A")].ci
        assert one.method == other.method == method
        assert (other.lo, other.hi, other.estimate) == (-one.hi, -one.lo, -one.estimate)


@pytest.mark.slow  # measured over 2 s (make test-fast stays under 90 s)
def test_the_same_seed_gives_the_same_table_in_any_process(tmp_path):
    exp = _ci_runs(tmp_path / "runs", seeds=(0, 1), size=2000)  # fine steps: ends move with seed

    def table(seed: str, hash_seed: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "uapt.table", str(exp), "--runs", str(tmp_path / "runs"),
             "--format", "csv", "--seed", seed],
            capture_output=True, text=True, check=True, timeout=120,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
        ).stdout  # fmt: skip

    first = table("0", "1")
    assert first == table("0", "2")
    other = table("1", "1")
    assert other != first
    ends = [
        {k: (r["delta_lo"], r["delta_hi"]) for k, r in _csv_rows(t).items()} for t in (first, other)
    ]
    assert ends[0] != ends[1]


def test_seeds_and_samples_left_out_of_the_pairing_are_named(tmp_path):
    exp = _ci_runs(tmp_path / "runs")
    shutil.rmtree(next((tmp_path / "runs").glob("m-B-s2-*")))  # A's seed 2 has no partner
    out = next((tmp_path / "runs").glob("m-B-s1-*"))
    lines = (out / "eval_outcomes.jsonl").read_text().splitlines()
    kept = [line for line in lines if json.loads(line)["doc_id"] not in (3, 4)]  # B skipped two
    (out / "eval_outcomes.jsonl").write_text("".join(line + "\n" for line in kept))
    record = json.loads((out / "run.json").read_text())
    for task in ("qa", "mc"):
        values = [json.loads(x)["value"] for x in kept if json.loads(x)["task"] == task]
        record["eval"][task]["acc"] = _pooled(values)
    (out / "run.json").write_text(json.dumps(record))
    runs, _ = load_runs([tmp_path / "runs"])
    table = build_table(load_table_spec(exp), runs)
    assert table.cells[(("m",), "acc", "B")].ci.seeds == 2
    assert (
        "m / B vs A: intervals pair seeds 0, 1, leaving out seed 2 of A, which Δ includes "
        "(acc, two tasks, val loss)." in table.notes
    )
    for task, size in (("qa", 100), ("mc", 30)):
        note = (
            f"m / B vs A, task {task}: compared on the samples both runs scored "
            f"(seed 1: {size - 2} shared, of {size - 2} and {size})."
        )
        assert note in table.notes


def test_paired_runs_sharing_no_sample_are_an_error(tmp_path, capsys):
    exp = _ci_runs(tmp_path / "runs")
    out = next((tmp_path / "runs").glob("m-B-s1-*")) / "eval_outcomes.jsonl"
    moved = [{**json.loads(line), "doc_id": 1000 + json.loads(line)["doc_id"]}
             for line in out.read_text().splitlines()]  # fmt: skip
    out.write_text("".join(json.dumps(o) + "\n" for o in moved))
    assert main([str(exp), "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(
        "uapt-table: error: bootstrap over zero samples: cell m / B vs A, acc, task qa, seed 1: "
        "the two runs' eval_outcomes.jsonl share no scored doc_id (they hold 100 and 100 samples)"
    )


@pytest.mark.parametrize("damage", ["old record", "damaged file", "other scores"])
def test_cells_without_usable_outcomes_resample_seeds_and_say_so(tmp_path, damage):
    exp = _ci_runs(tmp_path / "runs")
    folder = next((tmp_path / "runs").glob("m-A-s2-*"))
    if damage == "old record":
        (folder / "eval_outcomes.jsonl").unlink()
        reason = "no per-sample outcomes: runs without eval_outcomes.jsonl"
    elif damage == "damaged file":
        (folder / "eval_outcomes.jsonl").write_text('{"task": "qa", "met\n')
        reason = "a damaged eval_outcomes.jsonl"
    else:  # outcomes of another evaluation than the one the record reports
        record = json.loads((folder / "run.json").read_text())
        record["eval"]["qa"]["acc"] += 0.01
        (folder / "run.json").write_text(json.dumps(record))
        reason = "per-sample outcomes that do not reproduce the recorded score"
    runs, _ = load_runs([tmp_path / "runs"])
    table = build_table(load_table_spec(exp), runs)
    for label in ("acc", "two tasks"):
        assert table.cells[(("m",), label, "B")].ci.method == "seeds"
    note = next(n for n in table.notes if n.startswith("Seeds-only intervals ("))
    assert reason in note and note.endswith(": m: acc, two tasks (B).")
    if damage == "damaged file":
        assert any(n.startswith("not loaded: ") and "line 1 is not an outcome" in n
                   for n in table.notes)  # fmt: skip
    assert "seeds" in [r["ci_method"] for r in _csv_rows(to_csv(table)).values()]


def test_an_unknown_metric_is_an_error_naming_the_key(tmp_path, capsys):
    exp = _ci_runs(tmp_path / "runs")
    exp.write_text(CI_EXPERIMENT.replace("paths: [eval.qa.acc, eval.mc.acc]",
                                         "paths: [eval.qa.acc, eval.mc.accuracy]"))  # fmt: skip
    assert main([str(exp), "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"uapt-table: error: {exp}:7: cells[1].paths: unknown metric 'eval.mc.accuracy': none of "
        "the 6 completed run(s) selected by `runs` has it (eval.mc has: acc)\n"
    )
    for path in (tmp_path / "runs").glob("*/run.json"):  # nothing finished yet: not an error
        path.write_text(path.read_text().replace('"completed"', '"running"'))
    runs, _ = load_runs([tmp_path / "runs"])
    table = build_table(load_table_spec(exp), runs)
    assert "Not aggregated: 6 running." in table.notes


@pytest.mark.parametrize(
    ("option", "value"),
    [("--ci", "1.5"), ("--ci", "0"), ("--ci", "1"), ("--ci", "nan"), ("--ci", "high"),
     ("--bootstrap", "0"), ("--bootstrap", "-5"), ("--bootstrap", "2.5"),
     ("--bootstrap", "1000001"), ("--seed", "-1"), ("--seed", "x"), ("--adjust", "bonferroni"),
     ("--adjust", "HOLM")],
)  # fmt: skip
def test_bad_interval_options_are_one_error_naming_the_option(option, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([str(EXPERIMENT), "--runs", str(RUNS), option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"uapt-table: error: argument {option}: ")
    assert repr(value) in err
