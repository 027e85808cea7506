"""Run identity and the run record: `<runs_dir>/<slug>-<id>/run.json`, the source of truth.

The id hashes the *semantic* config only (what changes the numbers), so the same command never
trains twice and a re-launched sweep finds its finished points. See docs/run_record.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from uapt import files, provenance, schema
from uapt.paths import publishable
from uapt.sections.run import RunConfig

# The run id's keys, from the sections' declarations (uapt.sections): a top-level key or a
# section's key enters the id unless it is declared `semantic=False` (how a run is executed or
# observed, not what it computes); micro_batch_size is not dropped but canonicalised (see
# semantic_config). NON_SEMANTIC: the sections' dropped keys, by section.
SEMANTIC_KEYS = {name: f for name, f in schema.options(RunConfig).items() if f.metadata["semantic"]}
SEMANTIC_SECTIONS = tuple(k for k, f in SEMANTIC_KEYS.items() if f.metadata["section"] is not None)
NON_SEMANTIC = {
    name: dropped
    for name in SEMANTIC_SECTIONS
    if (dropped := schema.non_semantic(SEMANTIC_KEYS[name].metadata["section"]))
}
PACKAGES = (
    "uapt",
    "torch",
    "transformers",
    "datasets",
    "tokenizers",
    "lm_eval",
    "hydra-core",
    "omegaconf",
    "wandb",
    "peft",
)


def semantic_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a resolved config that determines a run's results."""
    out: dict[str, Any] = {}
    for name, f in SEMANTIC_KEYS.items():
        if f.metadata["section"] is not None:  # a section: its semantic keys (none is absent)
            out[name] = _semantic_keys(f.metadata["section"], cfg.get(name) or {})
        elif f.default is dataclasses.MISSING:  # a required key (the seed)
            out[name] = cfg[name]
        elif cfg.get(name):  # an optional key counts when given (`inputs`: uapt.inputs)
            out[name] = dict(cfg[name]) if isinstance(cfg[name], Mapping) else cfg[name]
    _drop_unused_teacher_keys(out["objective"])
    _canonical_batch_keys(out)
    _hashed_under_old_names(out)
    return out


def _semantic_keys(section: type[schema.Section], node: Mapping[str, Any]) -> dict[str, Any]:
    """`node` without the keys `section` declares non-semantic (a key it does not know, e.g. an
    old record's, is kept: it was hashed when the record was made)."""
    fields = schema.options(section)
    out = {}
    for key, value in node.items():
        f = fields.get(key)
        if f is not None and not f.metadata["semantic"]:
            continue
        nested = f.metadata["section"] if f is not None else None
        out[key] = _semantic_keys(nested, value) if nested and isinstance(value, Mapping) else value
    return out


def _canonical_batch_keys(semantic: dict[str, Any]) -> None:
    """Ids across the global-batch rule (objective semantics v2).

    Before it, each micro-batch's loss was a token mean of that micro-batch and scope=batch
    selected within one micro-batch: a run with one micro-batch on one process computed what it
    computes now, any other split did not. micro_batch_size is therefore set to batch_size (it no
    longer matters): a single-micro-batch run keeps its old id, and a split run, whose numbers
    changed, gets a new one. scope_size (new) enters only when set, and select=random, whose
    noise is now drawn per row, is marked as v2 (its numbers changed at every split).
    """
    trainer, objective = semantic["trainer"], semantic["objective"]
    if "batch_size" in trainer:
        trainer["micro_batch_size"] = trainer["batch_size"]
    if objective.get("scope_size", "absent") is None:
        del objective["scope_size"]
    if objective.get("select") == "random" and float(objective.get("mask_ratio") or 0) > 0:
        objective["semantics"] = 2


# Renamed keys, new name -> the name a run's id hashes them under (declared `hashed_as` on the
# field): the name they had when the committed records were made, so that a renamed key changes
# no id.
HASHED_AS = {
    name: renamed
    for name in SEMANTIC_SECTIONS
    if (renamed := schema.hashed_as(SEMANTIC_KEYS[name].metadata["section"]))
}


def _hashed_under_old_names(semantic: dict[str, Any]) -> None:
    """trainer.val_every (validation loss every n steps) was trainer.eval_every: a config with
    the new name hashes as a record made with the old one (which is read back as it is)."""
    for section, names in HASHED_AS.items():
        node = semantic[section]
        for new, old in names.items():
            if new in node:
                node[old] = node.pop(new)


def _drop_unused_teacher_keys(objective: dict[str, Any]) -> None:
    """The cached teacher's knobs count only when a cached teacher runs: a live-teacher (or
    teacher-less) run has the id it had before these options existed, and k does not split it."""
    needs = float(objective.get("distill_weight") or 0) > 0 or objective.get("select") == "excess"
    if not needs or objective.get("teacher", "live") == "live":
        objective.pop("teacher", None)
        objective.pop("teacher_topk", None)


def run_id(cfg: Mapping[str, Any]) -> str:
    blob = json.dumps(semantic_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def _num(x: float) -> str:
    return f"{float(x):g}"


def run_slug(cfg: Mapping[str, Any]) -> str:
    obj = cfg["objective"]
    parts = [
        cfg["model"]["name"],
        cfg["dataset"]["name"],
        obj["name"],
        f"r{_num(obj['mask_ratio'])}",
        f"l{_num(obj['distill_weight'])}",
        f"s{cfg['seed']}",
    ]
    return "-".join(str(p).replace("/", "_") for p in parts)


def run_dir(cfg: Mapping[str, Any]) -> Path:
    return Path(cfg["runs_dir"]).expanduser() / f"{run_slug(cfg)}-{run_id(cfg)}"


def objective_variant(obj: Mapping[str, Any]) -> str:
    """The objective with the knobs that tell its settings apart, e.g. masked_mle_distill-r0.5-l0.3."""
    parts = [str(obj["name"])]
    if float(obj["mask_ratio"]) > 0:
        parts.append(f"r{float(obj['mask_ratio']):g}")
    if float(obj["distill_weight"]) > 0:
        parts.append(f"l{float(obj['distill_weight']):g}")
    return "-".join(parts)


def run_summary(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Flat keys to filter and group runs by (tables, W&B)."""
    obj = cfg["objective"]
    return {
        "model": cfg["model"]["name"],
        "dataset": cfg["dataset"]["name"],
        "objective": obj["name"],
        "variant": objective_variant(obj),
        "mask_ratio": float(obj["mask_ratio"]),
        "distill_weight": float(obj["distill_weight"]),
        "seed": int(cfg["seed"]),
        "experiment": cfg.get("experiment"),
        "eval_suite": (cfg.get("eval") or {}).get("name"),
    }


def read_record(folder: Path) -> dict[str, Any] | None:
    """The run record of `folder`, or None when there is none; DamagedFile (naming the file)
    when it cannot be read back."""
    path = Path(folder) / "run.json"
    if not path.exists():
        return None
    data = files.read_json(path)
    if not isinstance(data, dict):
        raise files.DamagedFile(path, f"not a run record (a JSON {type(data).__name__})")
    return data


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    """HEAD of the checkout uapt runs from, with '-dirty' when its tree differs from it."""
    return provenance.tree_state().git_commit()


def publishable_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The config as the record keeps it: where this machine keeps runs, caches and logs
    (`runs_dir`, `cache_dir`, `logger.dir`; none of them semantic) with its home folder as `~`.
    Semantic values stay exactly as given: the record's config must give the run's id."""
    out = dict(cfg)
    for key in ("runs_dir", "cache_dir"):
        if isinstance(out.get(key), str):
            out[key] = publishable(out[key])
    logger = out.get("logger")
    if isinstance(logger, Mapping) and isinstance(logger.get("dir"), str):
        out["logger"] = {**logger, "dir": publishable(logger["dir"])}
    return out


def save_diff(folder: Path, snapshot: provenance.Snapshot) -> None:
    """The uncommitted changes beside the record (code.diff), or no such file for a clean tree
    (a resumed attempt may run from other code than the first)."""
    path = folder / provenance.DIFF_FILE
    if snapshot.diff:
        files.write_bytes(path, snapshot.diff)
    else:
        path.unlink(missing_ok=True)


def _earlier_attempt(folder: Path) -> dict[str, Any]:
    """The record of the run's last attempt: run.json, or the completed one a forced re-run set
    aside in previous/ (so attempts keep counting)."""
    for where in (folder, folder / "previous"):
        try:
            found = read_record(where)
        except files.DamagedFile:
            found = None
        if found:
            return found
    return {}


class RunRecord:
    """The mutable record of one run, flushed atomically to run.json on every change of state."""

    def __init__(self, folder: Path, data: dict[str, Any]):
        self.folder, self.data = folder, data

    @classmethod
    def start(
        cls,
        folder: Path,
        cfg: Mapping[str, Any],
        world_size: int = 1,
        snapshot: provenance.Snapshot | None = None,
    ) -> RunRecord:
        """The record of a new attempt; `snapshot`: the code it runs (uapt.provenance), taken
        now when not given."""
        previous = _earlier_attempt(folder)
        snapshot = provenance.snapshot() if snapshot is None else snapshot
        save_diff(folder, snapshot)
        data = {
            "id": run_id(cfg),
            "slug": run_slug(cfg),
            "status": "running",
            "error": None,
            "summary": run_summary(cfg),
            "config": publishable_config(cfg),
            "metrics": {},
            "data": {},
            "eval": {},
            "started_at": now(),
            "finished_at": None,
            "attempts": int(previous.get("attempts", 0)) + 1,
            "timings": {},
            "versions": versions(),
            "git_commit": snapshot.state.git_commit(),
            "provenance": snapshot.record(),
            "hostname": socket.gethostname(),
            "world_size": world_size,
        }
        record = cls(folder, data)
        record.flush()
        return record

    def update(self, **fields: Any) -> None:
        self.data.update(fields)
        self.flush()

    def complete(self) -> None:
        self.update(status="completed", finished_at=now())

    def fail(self, error: BaseException) -> None:
        self.update(status="failed", error=f"{type(error).__name__}: {error}", finished_at=now())

    def flush(self) -> None:
        files.write_json(self.folder / "run.json", self.data)


# ----------------------------------------------------------------------------- reading runs back
@dataclass(frozen=True)
class Run:
    folder: Path
    data: Mapping[str, Any]

    @property
    def status(self) -> str:
        return str(self.data.get("status") or "unknown")

    @property
    def completed(self) -> bool:
        return self.status == "completed"

    @property
    def name(self) -> str:
        return str(self.data.get("slug") or self.folder.name)

    @property
    def seed(self) -> Any:
        return (self.data.get("summary") or {}).get("seed")

    def identity(self) -> dict[str, Any]:
        """What a run computes apart from its seed (equal identities differ by seed only)."""
        config = self.data.get("config")
        try:
            ident = semantic_config(config) if isinstance(config, Mapping) else None
        except (KeyError, TypeError, AttributeError):
            ident = None
        if ident is None:
            ident = {"summary": dict(self.data.get("summary") or {})}
            ident["summary"].pop("experiment", None)
        ident.pop("seed", None)
        ident.get("summary", {}).pop("seed", None)
        return ident


def load_runs(dirs: Iterable[str | Path]) -> tuple[list[Run], list[str]]:
    """Every `<dir>/*/run.json` (or `<dir>/run.json`); returns the runs and load problems."""
    runs: list[Run] = []
    problems: list[str] = []
    for d in map(Path, dirs):
        folders = (
            [d]
            if (d / "run.json").is_file()
            # wandb/: W&B's own folder (logger.dir defaults to the runs directory), not a run
            else sorted(
                p
                for p in d.iterdir()
                if p.is_dir() and not p.name.startswith(".") and p.name != "wandb"
            )
        )
        for folder in folders:
            path = folder / "run.json"
            if not path.is_file():
                problems.append(f"{folder}: no run.json (skipped)")
                continue
            try:
                data = files.read_json(path)
            except OSError as e:
                problems.append(f"{path}: unreadable ({e}) (skipped)")
                continue
            except files.DamagedFile as e:
                problems.append(f"{e} (skipped)")
                continue
            if not isinstance(data, dict) or not isinstance(data.get("summary"), dict):
                problems.append(f"{path}: not a run record (no summary) (skipped)")
                continue
            runs.append(Run(folder, data))
    return runs, problems
