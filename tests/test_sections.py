"""The config sections are one light layer (uapt.sections): checking a config loads no heavy
library, and each field declares whether it enters a run's id (`semantic=False` when not)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from test_configs import compose_plain
from test_records import base_cfg

from uapt import records, schema
from uapt.schema import BOOL, Section, option
from uapt.sections import LoraConfig, RunConfig, SuiteConfig, TaskSpec

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "datasets", "lm_eval")

# The hand-kept lists the declarations replaced, as they were (uapt.records.NON_SEMANTIC and
# uapt.evaluation.suite.NON_SEMANTIC before uapt.sections).
OLD_NON_SEMANTIC = {
    "trainer": {
        "device",
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "nproc",
        "fsdp",
        "val_batches",
        "save_model",
        "packing",
        "max_tokens_per_micro_batch",
        "compile",
    },
    "objective": {"chunk_size"},
    "eval": {"batch_size", "max_batch_size", "log_samples", "generate"},
}
OLD_SUITE_NON_SEMANTIC = ("batch_size", "max_batch_size", "log_samples", "generate")
OLD_SEMANTIC_SECTIONS = ("model", "dataset", "objective", "trainer", "eval")


def test_checking_a_config_imports_no_heavy_library(tmp_path):
    """uapt.config.validate (and the run id) in a fresh interpreter: torch, transformers,
    datasets and lm_eval stay unloaded, so `--help` and every config error are quick."""
    plain = compose_plain([f"runs_dir={tmp_path}", "eval=embedded", "plan=on"])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(plain))
    code = (
        "import json, sys\n"
        "from uapt import records\n"
        "from uapt.config import validate\n"
        "run = validate(json.load(open(sys.argv[1])))\n"
        "print(json.dumps({'id': records.run_id(run.plain), 'tasks': len(run.eval.task_specs),\n"
        f"    'heavy': sorted(m for m in {HEAVY!r} if m in sys.modules)}}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["heavy"] == []
    assert out["id"] == records.run_id(plain) and out["tasks"] > 0  # it did check the config


def test_the_declared_keys_are_the_old_hand_kept_lists():
    """The refactor changes no id: the keys declared non-semantic are the lists they replace,
    the same top-level keys are hashed, and the renamed val_every still hashes as eval_every."""
    assert {k: set(v) for k, v in records.NON_SEMANTIC.items()} == OLD_NON_SEMANTIC
    assert schema.non_semantic(SuiteConfig) == set(OLD_SUITE_NON_SEMANTIC)
    assert records.SEMANTIC_SECTIONS == OLD_SEMANTIC_SECTIONS
    assert set(records.SEMANTIC_KEYS) == {*OLD_SEMANTIC_SECTIONS, "seed", "inputs"}
    assert records.HASHED_AS == {"trainer": {"val_every": "eval_every"}}
    assert not schema.non_semantic(LoraConfig) and not schema.non_semantic(TaskSpec)


def old_semantic_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """uapt.records.semantic_config before the declarations, written out (its first lines: the
    hand-kept lists; the rules after them, which this refactor kept, are called as they are)."""
    out: dict[str, Any] = {"seed": cfg["seed"]}
    for section in OLD_SEMANTIC_SECTIONS:
        node = dict(cfg.get(section) or {})
        for key in OLD_NON_SEMANTIC.get(section, ()):
            node.pop(key, None)
        out[section] = node
    records._drop_unused_teacher_keys(out["objective"])
    records._canonical_batch_keys(out)
    records._hashed_under_old_names(out)
    if cfg.get("inputs"):
        out["inputs"] = dict(cfg["inputs"])
    return out


def test_the_semantic_config_is_the_old_one(tmp_path):
    """On composed configs (every top-level key set), the test records' base config and every
    committed record: the same semantic config as the hand-kept lists gave."""
    configs = [
        compose_plain([f"runs_dir={tmp_path}", *overrides])
        for overrides in (
            [],
            ["model=tiny", "objective=masked_mle_distill", "eval=embedded", "plan=on"],
            ["trainer.packing=true", "objective.chunk_size=64", "logger=none", "seed=3"],
        )
    ]
    configs.append({**base_cfg(), "inputs": {"model.path": "sha256:0"}})
    configs += [
        json.loads(p.read_text())["config"]
        for p in sorted((REPO / "docs/results").glob("*/runs/*/run.json"))
    ]
    assert len(configs) > 10
    for cfg in configs:
        assert records.semantic_config(cfg) == old_semantic_config(cfg)


def test_only_the_semantic_top_level_keys_change_the_id():
    cfg = base_cfg()
    same = {
        **cfg,
        "runs_dir": "elsewhere",
        "cache_dir": "c2",
        "experiment": "x",
        "force": True,
        "require_clean": True,
        "logger": {"name": "none"},
        "sweep": {"a": 1},
        "tuned": {"best": {}},
        "plan": {"enabled": True},
    }
    assert records.run_id(same) == records.run_id(cfg)
    assert records.run_id({**cfg, "inputs": {"model.path": "sha256:0"}}) != records.run_id(cfg)
    assert records.run_id({**cfg, "inputs": {}}) == records.run_id(cfg)
    assert records.run_id({**cfg, "seed": 1}) != records.run_id(cfg)


@dataclass(frozen=True)
class Toy(Section):
    SECTION: ClassVar[str] = "toy"

    undecided: bool = option(BOOL, default=False)
    observed: bool = option(BOOL, default=False, semantic=False)
    renamed: bool = option(BOOL, default=False, hashed_as="old_name")


def test_a_field_is_semantic_unless_it_says_otherwise():
    """An undecided key enters the id: it may split ids, it never merges two different runs."""
    assert schema.non_semantic(Toy) == {"observed"}
    assert schema.hashed_as(Toy) == {"renamed": "old_name"}
    assert records._semantic_keys(Toy, {"undecided": True, "observed": True, "gone": 1}) == {
        "undecided": True,
        "gone": 1,  # a key the section no longer knows (an old record's): hashed as it was
    }


def test_every_run_config_key_has_a_decision_on_record():
    """The top-level keys outside the id are exactly these (a new one is semantic by default:
    add it here when it is not)."""
    dropped = {n for n, f in schema.options(RunConfig).items() if not f.metadata["semantic"]}
    assert dropped == {
        "logger",
        "runs_dir",
        "cache_dir",
        "experiment",
        "force",
        "require_clean",
        "sweep",
        "tuned",
        "plan",
    }


def test_the_plan_section_names_the_device_kinds_of_the_table():
    from uapt.devices import DEVICES
    from uapt.sections.plan import DEVICE_KINDS

    assert tuple(DEVICES) == DEVICE_KINDS
