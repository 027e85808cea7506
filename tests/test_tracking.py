"""W&B as users see it, read back from the files W&B writes: real tiny-model runs and the study's
table run (offline `.wandb` record logs, read by tests/wandb_records.py), the study's workspace
(from the object wandb-workspaces builds, no server), and W&B failures that never fail a run."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import REPO, TINY, env, records, run_cli, train
from wandb_records import BLOCK, FIRST, LAST, MIDDLE, OfflineRun, chunks, offline_run_file, read_run

from uapt.errors import one_line
from uapt.evaluation import result_rows
from uapt.table import build_table, grid, load_runs, load_table_spec
from uapt.table.render import _md_escape
from uapt.table.wandb_run import study_target, table_run_id
from uapt.tracking import log_eval_results, tags
from uapt.wandb_report import build_workspace, first_hop, read_workspace, write_workspace

EXPERIMENT = "wbtest"
OBJECTIVES = ("mle", "masked_mle_distill")
STEPS = 3
WANDB_RUN = [
    *(a for a in TINY if a != "logger=none"),
    "logger=wandb",
    "logger.mode=offline",
    f"trainer.max_steps={STEPS}",
    f"experiment={EXPERIMENT}",
]
# The smallest eval that puts eval, eval_base and eval_delta keys in the summary.
TINY_EVAL = ["eval=embedded", "eval.limit=1", "eval.tasks.0.max_gen_toks=8"]
TINY_EVAL += ["eval.tasks.1.max_gen_toks=8"]
TRAINING_KEYS = {"loss", "loss/mle", "loss/distill", "kept_frac", "nll/kept", "nll/unkept"}
TRAINING_KEYS |= {"lr", "grad_norm", "tokens_per_s", "peak_mem_mb"}
TRAINING_CURVES = ["loss", "loss/mle", "loss/distill", "kept_frac", "kept_overlap"]
TRAINING_CURVES += ["nll/kept", "nll/unkept"]
CONFIG_KEYS = {"model", "dataset", "objective", "variant", "mask_ratio", "distill_weight", "seed"}
CONFIG_KEYS |= {"experiment", "eval_suite", "run_id", "full"}
STUDY_FILE = f"""\
title: "W&B test: two objectives (mean ± std over seeds)"
runs:
  experiment: {EXPERIMENT}
rows: [model, dataset]
columns:
  field: objective
  values: [{", ".join(OBJECTIVES)}]
cells:
  - label: arith EM
    path: eval.arith.exact_match,strict-match
    scale: 100
  - label: val loss
    path: metrics.val/loss
    decimals: 3
baseline: mle
plots:
  - kind: id_vs_ood
    x: arith EM
    y: val loss
"""
# A W&B server that is not there: a closed port on this machine, and W&B's timeouts short.
UNREACHABLE = {
    "WANDB_BASE_URL": "http://127.0.0.1:9",
    "WANDB_INIT_TIMEOUT": "3",
    "NO_PROXY": "127.0.0.1",  # a machine's HTTP proxy must not stand in for the missing server
    "no_proxy": "127.0.0.1",
}
PLACEHOLDER_KEY = "0" * 40  # a well-formed key that no server knows; not a credential


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    """Two real tiny-model runs of one sweep group, logged to W&B offline and evaluated."""
    runs = tmp_path_factory.mktemp("study") / "runs"
    for objective in OBJECTIVES:
        train(*WANDB_RUN, *TINY_EVAL, f"objective={objective}", f"runs_dir={runs}", check=True)
    return runs


def history_of(run: OfflineRun, key: str) -> list:
    return [row[key] for row in run.history if key in row]


def media(run_file: Path, ref: dict) -> Path:
    """The file a logged table or image reference points to, in the run's files/ folder."""
    return run_file.parent / "files" / ref["path"]


# --------------------------------------------------------------------------- units


def test_eval_results_go_to_the_summary_only():
    import wandb

    class FakeRun:
        def __init__(self):
            self.summary, self.logged = {}, []

        def log(self, data):
            self.logged.append(data)

    results = {
        "eval": {
            "gsm8k": {"exact_match,strict-match": 0.5, "exact_match,strict-match_stderr": 0.1}
        },
        "eval_base": {"gsm8k": {"exact_match,strict-match": 0.25}},
        "eval_delta": {"gsm8k": {"exact_match,strict-match": 0.25}},
    }
    run = FakeRun()
    log_eval_results(run, results)
    table = run.summary.pop("eval/results")
    assert run.summary == {
        "eval/gsm8k/exact_match,strict-match": 0.5,
        "eval/gsm8k/exact_match,strict-match_stderr": 0.1,
        "eval_base/gsm8k/exact_match,strict-match": 0.25,
        "eval_delta/gsm8k/exact_match,strict-match": 0.25,
    }
    assert run.logged == []  # an evaluation is one point: no history row
    assert isinstance(table, wandb.Table)
    assert table.data == [["gsm8k", "exact_match,strict-match", 0.5, 0.1, 0.25, 0.25]]
    log_eval_results(None, results)  # no W&B run: nothing happens


def test_tags_are_key_value_and_errors_one_line():
    summary = {"model": "tiny", "objective": "masked_mle_distill", "mask_ratio": 0.5, "seed": 0}
    assert tags({**summary, "distill_weight": None}, ["mine"]) == [
        "mine",
        "model:tiny",
        "objective:masked_mle_distill",
        "mask_ratio:0.5",
        "seed:0",
    ]
    error = RuntimeError("Timed out\nConsider increasing the init_timeout setting:\n  wandb.init()")
    assert one_line(error) == "RuntimeError: Timed out"


@pytest.mark.slow
def test_reader_follows_records_across_blocks(tmp_path):
    """Records that span W&B's 32 KiB blocks (first, middle and last chunks) read back whole."""
    import wandb

    run = wandb.init(
        project="reader",
        id="reader-test",
        dir=str(tmp_path),
        mode="offline",
        config={"blob": "x" * (3 * BLOCK)},  # one record over three blocks
        settings=wandb.Settings(console="off", silent=True),
    )
    for step in range(200):
        run.log({"value": step, "text": f"{step:04d}" * 50}, step=step)
    run.finish()
    # finish() returns once the exit record is handled; W&B's service closes the file when it
    # stops, as it does when a process exits (every other run here is a process of its own)
    wandb.teardown()
    path = offline_run_file(tmp_path / "wandb", "reader-test")
    kinds = {kind for kind, _ in chunks(path.read_bytes())}
    assert {FIRST, MIDDLE, LAST} <= kinds
    read = read_run(path)
    assert read.config["blob"] == "x" * (3 * BLOCK)
    assert [row["value"] for row in read.history] == list(range(200))
    assert read.history[-1]["text"] == "0199" * 50


# --------------------------------------------------------------------------- a run's file


@pytest.mark.slow
def test_offline_run_file_holds_identity_config_history_and_summary(study):
    done = records(study)
    assert sorted(r["summary"]["objective"] for r in done) == sorted(OBJECTIVES)
    for record in done:
        run_file = offline_run_file(study / "wandb", record["id"])
        run = read_run(run_file)
        summary = record["summary"]
        assert (run.id, run.name, run.group) == (record["id"], record["slug"], EXPERIMENT)
        assert (run.project, run.job_type) == ("uapt", summary["objective"])
        assert run.exit_code == 0
        assert set(run.config) >= CONFIG_KEYS
        assert {k: run.config[k] for k in summary} == summary
        assert run.config["run_id"] == record["id"]
        assert f"mask_ratio:{summary['mask_ratio']}" in run.tags
        assert f"seed:{summary['seed']}" in run.tags
        assert f"objective:{summary['objective']}" in run.tags
        assert "model:tiny" in run.tags and "0.5" not in run.tags

        assert len(run.history) == STEPS
        assert history_of(run, "step") == history_of(run, "_step") == list(range(1, STEPS + 1))
        assert TRAINING_KEYS | {"step"} <= run.user_history_keys()
        if summary["mask_ratio"] > 0:
            assert "kept_overlap" in run.user_history_keys()
        assert not any(k.startswith("eval") for k in run.user_history_keys())

        defined = run.metrics
        assert defined["*"].step_metric == "step"
        assert defined["loss"].summary.min and defined["val/loss"].summary.last
        assert run.summary["loss"] == {"min": min(history_of(run, "loss"))}
        assert run.summary["val/loss"] == pytest.approx(record["metrics"]["val/loss"])
        expected = {
            f"{section}/{task}/{metric}"
            for section in ("eval", "eval_base", "eval_delta")
            for task, metrics in record[section].items()
            for metric, value in metrics.items()
            if isinstance(value, int | float)
        }
        assert {k for k in run.summary if k.split("/")[0].startswith("eval")} == expected | {
            "eval/results"
        }
        assert expected >= {
            "eval/arith/exact_match,strict-match",
            "eval_delta/arith/exact_match,strict-match",
        }
        logged = json.loads(media(run_file, run.summary["eval/results"]).read_text())
        assert logged["data"] == json.loads(json.dumps(result_rows(record)))

        dumped = json.dumps(record) + run_file.read_bytes().decode("latin-1")
        assert "WANDB_API_KEY" not in dumped and "api_key" not in dumped.lower()


# --------------------------------------------------------------------------- the table run


@pytest.mark.slow
def test_table_run_holds_the_terminal_tables_cells_notes_and_plots(study, tmp_path):
    experiment = tmp_path / "study.yaml"
    experiment.write_text(STUDY_FILE)
    proc = run_cli(
        "uapt.table", str(experiment), "--runs", str(study), "--wandb", "--format", "markdown",
        check=True,
    )  # fmt: skip
    exp = load_table_spec(experiment)
    runs, problems = load_runs([study])
    assert problems == []  # <runs>/wandb, W&B's own folder, is not taken for a run
    table = build_table(exp, runs, problems)
    header, body, _ = grid(table)
    shown = proc.stdout.splitlines()  # the table as printed (markdown), its notes as bullets

    def md(cells) -> str:
        return "| " + " | ".join(_md_escape(c) for c in cells) + " |"

    assert md(header) in shown
    assert all(md(line) in shown for line in body)
    assert all(f"- {_md_escape(note, table_cell=False)}" in shown for note in table.notes)
    run_id = table_run_id(study_target(exp, runs, study), exp)
    assert f"W&B: table run {run_id} logged offline" in proc.stderr

    run_file = offline_run_file(study / "wandb", run_id)
    run = read_run(run_file)
    assert (run.id, run.group, run.job_type, run.name) == (
        run_id,
        EXPERIMENT,
        "table",
        "table-study",
    )
    assert run.project == "uapt" and run.exit_code == 0
    assert run.config["experiment_file"] == str(experiment)
    assert run.config["cells"] == ["arith EM", "val loss"]
    assert run.config["columns"] == list(OBJECTIVES)
    assert len(run.history) == 1
    assert run.user_history_keys() == {"study/table", "study/notes", "study/plots"}
    assert run.notes.splitlines() == table.notes

    logged = json.loads(media(run_file, run.summary["study/table"]).read_text())
    assert logged["columns"] == header
    keys = len(exp.rows) + 1
    assert [row[keys:] for row in logged["data"]] == [line[keys:] for line in body]
    assert [row[:keys] for row in logged["data"]] == [
        ["tiny", "arith", "arith EM"],
        ["tiny", "arith", "val loss"],
    ]
    notes = json.loads(media(run_file, run.summary["study/notes"]).read_text())
    assert notes["data"] == [[n] for n in table.notes]

    plots = run.summary["study/plots"]
    assert plots["count"] == 1 and plots["captions"][0].endswith(".png")
    assert (run_file.parent / "files" / plots["filenames"][0]).stat().st_size > 10_000


# --------------------------------------------------------------------------- the workspace


def test_demo_workspace_has_its_sections_panels_filter_and_grouping(tmp_path):
    import wandb_workspaces.reports.v2 as wr

    exp = load_table_spec(REPO / "experiments" / "demo.yaml")
    target = study_target(exp, [], tmp_path)  # no runs: the file's experiment, the default project
    assert (target.group, target.project, target.entity) == ("demo", "uapt", None)
    workspace = build_workspace(exp, target)
    check_demo_workspace(workspace)

    again = read_workspace(write_workspace(workspace, tmp_path / "demo.json"))
    check_demo_workspace(again)
    assert [s.name for s in again.sections] == [s.name for s in workspace.sections]
    bars = workspace.sections[0].panels
    assert all(b.groupby == wr.Config("variant") for b in bars)


def named(metric) -> str:
    return getattr(metric, "name", metric)


def check_demo_workspace(workspace) -> None:
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    assert workspace.project == "uapt" and workspace.name == "uapt: demo (demo.yaml)"
    assert workspace.runset_settings.filters == "Metric(\"Group\") == 'demo'"
    assert workspace.runset_settings.groupby == [ws.Config("variant")]
    assert workspace.settings.x_axis == "step"
    evals, curves, ablation, study = workspace.sections
    assert [type(p) for p in evals.panels] == [wr.BarPlot] * 3
    assert [(p.title, p.metrics) for p in evals.panels] == [
        ("arith EM", [wr.SummaryMetric("eval/arith/exact_match,strict-match")]),
        (
            "IFEval prompt strict",
            [wr.SummaryMetric("eval/ifeval_embedded/prompt_level_strict_acc")],
        ),
        ("val loss", [wr.SummaryMetric("val/loss")]),
    ]
    assert {(p.groupby_aggfunc, p.groupby_rangefunc) for p in evals.panels} == {("mean", "stddev")}
    # a built panel holds the names given; one read back holds wr.Metric(name)
    assert [(named(p.x), [named(y) for y in p.y]) for p in curves.panels] == [
        ("step", [key]) for key in TRAINING_CURVES
    ]
    (parallel,) = ablation.panels
    assert [c.metric for c in parallel.columns] == [
        wr.Config("mask_ratio"),
        wr.Config("distill_weight"),
        wr.SummaryMetric("eval/arith/exact_match,strict-match"),
    ]
    assert [getattr(p, "table_name", None) for p in study.panels[:2]] == [
        "study/table",
        "study/notes",
    ]
    assert study.panels[2].media_keys == ["study/plots"]


def test_workspace_offline_is_written_for_later_in_one_line(tmp_path):
    proc = run_cli(
        "uapt.wandb_report", "experiments/demo.yaml", "--runs", str(tmp_path), check=True
    )
    written = tmp_path / "wandb" / "workspaces" / "demo.json"
    assert proc.stdout.splitlines() == [
        f"W&B workspace for group demo offline: written to {written}; "
        f"save it when W&B is reachable: uapt-workspace --save {written}"
    ]
    check_demo_workspace(read_workspace(written))


# --------------------------------------------------------------------------- W&B failures


def cli(
    module: str, *args: str, extra_env: dict[str, str], timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**env(), **extra_env},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class Refuse(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_error(401, "no such key")

    do_POST = do_GET

    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@contextlib.contextmanager
def refusing_server():
    """A local HTTP server answering 401 to everything: a W&B server that knows no key."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(
    ("proxies", "expected"),
    [
        ({}, ("api.wandb.ai", 443)),
        ({"HTTPS_PROXY": "http://proxy.example:3128"}, ("proxy.example", 3128)),
        ({"HTTPS_PROXY": "proxy.example:3128", "NO_PROXY": "wandb.ai"}, ("api.wandb.ai", 443)),
    ],
)
def test_the_reachability_probe_connects_where_requests_would(monkeypatch, proxies, expected):
    """Behind a proxy the probe tries the proxy (a direct connection may be blocked there)."""
    for var in ("HTTPS_PROXY", "https_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    for var, value in proxies.items():
        monkeypatch.setenv(var, value)
    assert first_hop("https://api.wandb.ai") == expected


@pytest.mark.slow
def test_an_unreachable_server_is_one_warning_and_everything_goes_on(study, tmp_path):
    online = {**UNREACHABLE, "WANDB_API_KEY": PLACEHOLDER_KEY}
    runs = tmp_path / "runs"
    args = [*WANDB_RUN, "logger.mode=online", "objective=masked_mle", f"runs_dir={runs}"]
    proc = cli("uapt.train", *args, extra_env=online)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (record,) = records(runs)
    assert record["status"] == "completed"
    output = proc.stdout + proc.stderr
    warnings = [line for line in output.splitlines() if "W&B disabled" in line]
    assert len(warnings) == 1 and "training goes on" in warnings[0], output[-3000:]

    experiment = tmp_path / "study.yaml"
    experiment.write_text(STUDY_FILE)
    table = ["uapt.table", str(experiment), "--runs", str(study), "--format", "csv", "--wandb"]
    proc = cli(*table, "--wandb-mode", "online", extra_env=online)
    assert proc.returncode == 0 and proc.stdout.startswith("model,dataset,metric"), proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("uapt-table: warning")]
    assert len(lines) == 1 and "W&B: the table was not logged" in lines[0], proc.stderr

    for extra in (online, UNREACHABLE):  # a placeholder key, then no key at all
        out = tmp_path / "ws.json"
        ws_args = ["experiments/demo.yaml", "--runs", str(runs), "--mode", "online"]
        proc = cli("uapt.wandb_report", *ws_args, "--output", str(out), extra_env=extra)
        assert proc.returncode == 0, proc.stderr
        (line,) = proc.stdout.splitlines()
        assert line.startswith("W&B workspace for group demo not saved (") and str(out) in line
        check_demo_workspace(read_workspace(out))

    with refusing_server() as url:  # no server, then a server that refuses every request
        for server in (UNREACHABLE["WANDB_BASE_URL"], url):
            extra = {**online, "WANDB_BASE_URL": server}
            proc = cli("uapt.wandb_report", "--save", str(out), extra_env=extra, timeout=60)
            assert proc.returncode == 1
            (line,) = proc.stderr.splitlines()
            assert line.startswith(f"uapt-workspace: error: {out} not saved: "), line
    leaked = [
        p for p in tmp_path.rglob("*") if p.is_file() and PLACEHOLDER_KEY in p.read_text("latin-1")
    ]
    assert leaked == []
