"""Run identity: semantic keys change the id, execution details do not; run.json is atomic."""

from __future__ import annotations

import copy
import json

import pytest

from uapt import records


def base_cfg() -> dict:
    return {
        "seed": 0,
        "runs_dir": "runs",
        "cache_dir": "c",
        "experiment": None,
        "force": False,
        "model": {"name": "tiny", "path": None},
        "dataset": {"name": "arith", "max_length": 256},
        "objective": {
            "name": "masked_mle",
            "mask_ratio": 0.5,
            "distill_weight": 0.0,
            "chunk_size": 0,
        },
        "trainer": {"max_steps": 3, "lr": 1e-3, "log_every": 1, "device": "auto"},
        "eval": {"name": "none", "tasks": [], "batch_size": 8},
        "logger": {"name": "wandb", "mode": "offline"},
    }


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("trainer", "log_every", 10),
        ("trainer", "device", "cpu"),
        ("objective", "chunk_size", 512),
        ("logger", "mode", "online"),
        ("eval", "batch_size", 32),
        (None, "runs_dir", "elsewhere"),
        (None, "experiment", "sweep-a"),
        (None, "force", True),
    ],
)
def test_execution_details_keep_the_id(section, key, value):
    cfg = base_cfg()
    (cfg[section] if section else cfg)[key] = value
    assert records.run_id(cfg) == records.run_id(base_cfg())


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("objective", "mask_ratio", 0.3),
        ("trainer", "lr", 2e-3),
        ("dataset", "max_length", 128),
        ("model", "path", "x/y"),
        (None, "seed", 1),
        ("eval", "name", "embedded"),
    ],
)
def test_semantic_changes_change_the_id(section, key, value):
    cfg = base_cfg()
    (cfg[section] if section else cfg)[key] = value
    assert records.run_id(cfg) != records.run_id(base_cfg())


def test_teacher_knobs_count_only_for_a_cached_teacher():
    def run_id(**objective) -> str:
        cfg = base_cfg()
        cfg["objective"].update(objective)
        return records.run_id(cfg)

    distil = {"distill_weight": 1.0}
    # live (the default) or no teacher at all: the id is the one from before these options
    assert run_id(teacher="live", teacher_topk=16) == run_id()
    assert run_id(teacher="cached", teacher_topk=16) == run_id()  # masked_mle needs no teacher
    assert run_id(**distil, teacher="live", teacher_topk=16) == run_id(**distil)
    # a cached teacher is another approximation, and k another one
    cached = run_id(**distil, teacher="cached", teacher_topk=16)
    assert cached != run_id(**distil)
    assert cached != run_id(**distil, teacher="cached", teacher_topk=64)
    assert run_id(select="excess", teacher="cached", teacher_topk=16) != run_id(select="excess")


def test_slug_and_dir():
    cfg = base_cfg()
    assert records.run_slug(cfg) == "tiny-arith-masked_mle-r0.5-l0-s0"
    folder = records.run_dir(cfg)
    assert folder.name == f"tiny-arith-masked_mle-r0.5-l0-s0-{records.run_id(cfg)}"
    assert len(records.run_id(cfg)) == 10


def test_record_lifecycle(tmp_path):
    cfg = base_cfg()
    record = records.RunRecord.start(tmp_path, copy.deepcopy(cfg))
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["status"] == "running" and data["id"] == records.run_id(cfg)
    assert data["versions"]["torch"] and "git_commit" in data
    record.fail(RuntimeError("boom"))
    data = json.loads((tmp_path / "run.json").read_text())
    assert data["status"] == "failed" and data["error"] == "RuntimeError: boom"
    again = records.RunRecord.start(tmp_path, copy.deepcopy(cfg))
    assert again.data["attempts"] == 2
    again.complete()
    assert records.read_record(tmp_path)["status"] == "completed"
    assert not list(tmp_path.glob("*.tmp"))
