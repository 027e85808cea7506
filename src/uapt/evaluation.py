"""Evaluation suites through lm-evaluation-harness, on the in-memory model or standalone (`uapt-eval`).

A suite (conf/eval/<name>.yaml) lists lm-eval tasks with their few-shot count, sample limit,
chat-template use and generation length. A task is either

- a task lm-eval registers (`gsm8k`, `ifeval`, `mmlu`, ...), optionally pointed at local files
  (`data_files`) or given other config `overrides`, on top of lm-eval's own task YAML; or
- a task uapt builds offline: `arith` (held-out problems of the synthetic task, with GSM8K's prompt
  stop words, filters and metrics) and `ifeval_embedded` (prompts generated in IFEval's format,
  scored by lm-eval's IFEval checker).

Results follow docs/run_record.md: ``{"eval": {task: {metric: value, metric + "_stderr": value}},
"eval_meta": {...}}`` with lm-eval's metric keys, minus the ``,none`` suffix of unfiltered metrics.
See docs/evaluation.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uapt import outcomes
from uapt.config import ConfigError
from uapt.paths import CONF_DIR

log = logging.getLogger(__name__)

BUILTIN_TASKS = ("arith", "ifeval_embedded")
DEFAULT_SIZE = {"arith": 64, "ifeval_embedded": 48}  # rows a builtin task generates
NON_SEMANTIC = ("batch_size", "max_batch_size", "log_samples")  # keys that do not change scores


# ----------------------------------------------------------------------------- config
def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _limit_ok(v: Any) -> bool:
    if v is None or _is_int(v):
        return v is None or v >= 1
    return isinstance(v, float) and 0 < v <= 1


def _batch_ok(v: Any) -> bool:
    return (_is_int(v) and v >= 1) or (
        isinstance(v, str) and re.fullmatch(r"auto(:\d+)?", v) is not None
    )


def _opt(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


_BOOL = (lambda v: isinstance(v, bool), "true or false")
SUITE_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "tasks": (lambda v: isinstance(v, list | tuple), "a list of tasks"),
    "batch_size": (_batch_ok, "an integer >= 1, 'auto' or 'auto:N'"),
    "max_batch_size": (lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    "max_length": (
        _opt(lambda v: _is_int(v) and v >= 1),
        "an integer >= 1 (or null: from the model config)",
    ),
    "limit": (_limit_ok, "an integer >= 1, a fraction in (0, 1], or null"),
    "apply_chat_template": _BOOL,
    "fewshot_as_multiturn": _BOOL,
    "system_instruction": (_opt(lambda v: isinstance(v, str)), "a string (or null)"),
    "bootstrap_iters": (lambda v: _is_int(v) and v >= 0, "an integer >= 0"),
    "log_samples": _BOOL,
    "subtasks": _BOOL,
    "include_path": (
        _opt(lambda v: isinstance(v, str | list | tuple)),
        "a folder or list of folders (or null)",
    ),
}
TASK_SCHEMA: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (
        lambda v: isinstance(v, str) and re.fullmatch(r"[\w.:-]+", v) is not None,
        "a task name (letters, digits, _ . : -)",
    ),
    "task": (
        _opt(lambda v: isinstance(v, str) and v != ""),
        "an lm-eval task name (or null: same as name)",
    ),
    "num_fewshot": (
        _opt(lambda v: _is_int(v) and v >= 0),
        "an integer >= 0 (or null: the task's default)",
    ),
    "limit": (_limit_ok, "an integer >= 1, a fraction in (0, 1], or null"),
    "apply_chat_template": (
        _opt(lambda v: isinstance(v, bool)),
        "true, false or null (the suite's)",
    ),
    "fewshot_as_multiturn": (
        _opt(lambda v: isinstance(v, bool)),
        "true, false or null (the suite's)",
    ),
    "max_gen_toks": (
        _opt(lambda v: _is_int(v) and v >= 1),
        "an integer >= 1 (or null: the task's)",
    ),
    "data_files": (
        _opt(lambda v: isinstance(v, str | list | tuple | Mapping)),
        "a file, a list of files, or a mapping split -> file(s)",
    ),
    "overrides": (_opt(lambda v: isinstance(v, Mapping)), "a mapping of lm-eval task config keys"),
    "size": (_opt(lambda v: _is_int(v) and v >= 1), "an integer >= 1 (builtin tasks only)"),
    "seed": (_is_int, "an integer"),
}
SUITE_DEFAULTS: dict[str, Any] = {
    "tasks": [],
    "batch_size": 8,
    "max_batch_size": 64,
    "max_length": None,
    "limit": None,
    "apply_chat_template": True,
    "fewshot_as_multiturn": True,
    "system_instruction": None,
    "bootstrap_iters": 100_000,
    "log_samples": False,
    "subtasks": False,
    "include_path": None,
}


@dataclass(frozen=True)
class TaskSpec:
    """One task of a suite, with the suite's defaults filled in."""

    name: str  # key in the results (and the lm-eval task name it runs under)
    task: str  # lm-eval task (or uapt builtin) it is built from
    num_fewshot: int | None = None
    limit: int | float | None = None
    apply_chat_template: bool = True
    fewshot_as_multiturn: bool = True
    max_gen_toks: int | None = None
    data_files: Any = None
    overrides: dict[str, Any] = field(default_factory=dict)
    size: int | None = None
    seed: int = 0

    @property
    def builtin(self) -> bool:
        return self.task in BUILTIN_TASKS


def _check(
    prefix: str, node: Mapping[str, Any], schema: Mapping[str, tuple[Callable[[Any], bool], str]]
) -> None:
    for key, value in node.items():
        if key not in schema:
            raise ConfigError(f"{prefix}.{key} is not a known option; known: {', '.join(schema)}")
        ok, allowed = schema[key]
        if not ok(value):
            raise ConfigError(f"{prefix}.{key}={value!r} is not {allowed}")


def validate_suite(suite_cfg: Mapping[str, Any]) -> None:
    """Raise ConfigError naming the first bad key of an `eval` node (files must exist)."""
    suite_tasks(suite_cfg)


def suite_tasks(suite_cfg: Mapping[str, Any]) -> list[TaskSpec]:
    """The suite's tasks as TaskSpecs (validated; empty for the `none` suite)."""
    if not isinstance(suite_cfg, Mapping):
        raise ConfigError(f"eval must be a mapping, got {type(suite_cfg).__name__}")
    _check("eval", suite_cfg, SUITE_SCHEMA)
    if "name" not in suite_cfg:
        raise ConfigError("eval.name is missing")
    suite = {**SUITE_DEFAULTS, **suite_cfg}
    if suite["name"] == "none":
        return []
    specs, seen = [], set()
    for i, raw in enumerate(suite["tasks"]):
        spec = _task_spec(f"eval.tasks[{i}]", raw, suite)
        if spec.name in seen:
            raise ConfigError(f"eval.tasks[{i}].name={spec.name!r} appears twice in the suite")
        seen.add(spec.name)
        specs.append(spec)
    return specs


def _task_spec(prefix: str, raw: Any, suite: Mapping[str, Any]) -> TaskSpec:
    node = {"name": raw} if isinstance(raw, str) else raw
    if not isinstance(node, Mapping) or "name" not in node:
        raise ConfigError(f"{prefix} must be a task name or a mapping with a `name`, got {raw!r}")
    _check(prefix, node, TASK_SCHEMA)
    task = node.get("task") or node["name"]
    if task not in BUILTIN_TASKS and node.get("size") is not None:
        raise ConfigError(
            f"{prefix}.size applies to the builtin tasks ({', '.join(BUILTIN_TASKS)}) only"
        )
    if task in BUILTIN_TASKS and node.get("data_files") is not None:
        raise ConfigError(f"{prefix}.data_files: the builtin task {task!r} generates its data")
    return TaskSpec(
        name=node["name"],
        task=task,
        num_fewshot=node.get("num_fewshot"),
        limit=_cap(node.get("limit"), suite["limit"]),
        apply_chat_template=_pick(node.get("apply_chat_template"), suite["apply_chat_template"]),
        fewshot_as_multiturn=_pick(node.get("fewshot_as_multiturn"), suite["fewshot_as_multiturn"]),
        max_gen_toks=node.get("max_gen_toks"),
        data_files=_resolve_files(f"{prefix}.data_files", node.get("data_files")),
        overrides=dict(node.get("overrides") or {}),
        size=node.get("size"),
        seed=node.get("seed", 0),
    )


def _pick(value: Any, default: Any) -> Any:
    return default if value is None else value


def _cap(task_limit: int | float | None, suite_limit: int | float | None) -> int | float | None:
    """The suite's limit caps every task's (so `eval.limit=5` makes any suite a smoke test)."""
    if task_limit is None or suite_limit is None:
        return suite_limit if task_limit is None else task_limit
    if type(task_limit) is type(suite_limit):
        return min(task_limit, suite_limit)
    return suite_limit if _is_int(suite_limit) else task_limit


def _resolve_files(key: str, files: Any) -> Any:
    """Local data files as absolute paths (relative ones are relative to the working directory)."""
    if files is None:
        return None
    if isinstance(files, Mapping):
        return {str(split): _resolve_files(f"{key}.{split}", f) for split, f in files.items()}
    if isinstance(files, list | tuple):
        return [_resolve_files(f"{key}[{i}]", f) for i, f in enumerate(files)]
    path = Path(str(files)).expanduser()
    if "://" in str(files):
        return str(files)
    if not path.exists():
        raise ConfigError(f"{key}: no such file {files} (relative paths start at {Path.cwd()})")
    return str(path.resolve())


# ----------------------------------------------------------------------------- task configs
def lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm_eval")


def _tasks_root() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def _lm_eval_yaml(path: Path) -> dict[str, Any]:
    """lm-eval's own task config (includes merged, `!function`s resolved)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(path, resolve_func=True)
    for key in ("tag", "group"):
        cfg.pop(key, None)
    return cfg


def arith_dataset(size: int, seed: int, fewshot_rows: int = 50, **_: Any):
    """Held-out synthetic problems as a DatasetDict; `train` only feeds few-shot examples."""
    from datasets import Dataset, DatasetDict

    from uapt.arith import arith_rows

    return DatasetDict(
        {
            "train": Dataset.from_list(arith_rows(fewshot_rows, seed, "train")),
            "test": Dataset.from_list(arith_rows(size, seed, "test")),
        }
    )


def ifeval_dataset(size: int, seed: int, **_: Any):
    from datasets import Dataset, DatasetDict

    from uapt.ifeval import KWARG_KEYS, ifeval_prompts

    rows = ifeval_prompts(size, seed)
    for row in rows:  # one Arrow schema for all rows; the checker drops the None-valued keys
        row["kwargs"] = [{k: kw.get(k) for k in KWARG_KEYS} for kw in row["kwargs"]]
    return DatasetDict({"test": Dataset.from_list(rows)})


def _builtin_config(spec: TaskSpec) -> dict[str, Any]:
    size = spec.size or DEFAULT_SIZE[spec.task]
    if spec.task == "arith":  # scored exactly like GSM8K: same stop words, filters and metrics
        cfg = _lm_eval_yaml(_tasks_root() / "gsm8k" / "gsm8k.yaml")
        cfg.update(
            dataset_path="uapt/arith",
            doc_to_text="{{question}}",
            num_fewshot=0,
            custom_dataset=functools.partial(arith_dataset, size=size, seed=spec.seed),
        )
    else:  # IFEval's prompt, generation settings, checker and metrics on generated prompts
        cfg = _lm_eval_yaml(_tasks_root() / "ifeval" / "ifeval.yaml")
        cfg.update(
            dataset_path="uapt/ifeval_embedded",
            test_split="test",
            custom_dataset=functools.partial(ifeval_dataset, size=size, seed=spec.seed),
        )
    cfg.update(
        dataset_name=None, dataset_kwargs=None, metadata={"version": 1.0, "uapt_builtin": spec.task}
    )
    return cfg


@functools.lru_cache(maxsize=1)
def _task_files() -> dict[str, Path]:
    """name -> YAML file for every `task:`/`group:` line in lm-eval's task folder (a text scan:
    about 1 s, where indexing every task with TaskManager takes 15 s on a laptop CPU)."""
    pattern = re.compile(r"^(?:task|group):\s*['\"]?([\w.:-]+)['\"]?\s*$", re.MULTILINE)
    found: dict[str, Path] = {}
    for path in sorted(_tasks_root().rglob("*.yaml")):
        for name in pattern.findall(path.read_text(errors="ignore")):
            found.setdefault(name, path)
    return found


@functools.lru_cache(maxsize=16)
def _task_manager(paths: tuple[str, ...], defaults: bool):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=defaults, include_path=list(paths) or None)


def _manager_for(task: str, include_path: list[str]):
    """A TaskManager indexing only the lm-eval task family that defines `task` (plus the user's
    include paths); the full index when the name is not found by the text scan (e.g. a tag)."""
    root = _tasks_root()
    path = _task_files().get(task)
    if path is None:
        return _task_manager(tuple(include_path), True)
    family = root / path.relative_to(root).parts[0]
    return _task_manager((str(family), *include_path), False)


def task_request(spec: TaskSpec, include_path: list[str] | None = None) -> tuple[Any, Any, bool]:
    """(what to hand simple_evaluate as the task, its TaskManager, whether it is a config dict)."""
    include_path = list(include_path or [])
    if spec.builtin:
        cfg = _builtin_config(spec)
        manager = _task_manager(tuple(include_path), False)
    else:
        manager = _manager_for(spec.task, include_path)
        entry = manager.task_index.get(spec.task)
        if entry is None:
            raise ConfigError(
                f"eval task {spec.task!r} is not an lm-eval task, group or tag "
                f"(nor a uapt builtin: {', '.join(BUILTIN_TASKS)})"
            )
        custom = spec.overrides or spec.data_files is not None or spec.name != spec.task
        if not custom:
            return spec.task, manager, False
        if entry.yaml_path is None or entry.kind.name != "TASK":
            raise ConfigError(
                f"eval task {spec.name!r}: data_files/overrides/renaming apply to single "
                f"tasks; {spec.task!r} is a {entry.kind.name.lower()}"
            )
        cfg = _lm_eval_yaml(entry.yaml_path)
    if spec.data_files is not None:
        cfg.update(
            dataset_path="json",
            dataset_name=None,
            custom_dataset=None,
            dataset_kwargs={"data_files": spec.data_files},
        )
    cfg.update(spec.overrides)
    cfg["task"] = spec.name
    # in the config itself: simple_evaluate's num_fewshot is ignored where a config says 0
    if spec.num_fewshot is not None:
        cfg["num_fewshot"] = spec.num_fewshot
    return cfg, manager, True


# ----------------------------------------------------------------------------- running
def evaluate_lm(
    lm: Any,
    suite_cfg: Mapping[str, Any],
    *,
    out_dir: Path | None = None,
    seed: int = 0,
    device: str | None = None,
) -> dict[str, Any]:
    """Run every task of the suite on an lm-eval LM; {} for the `none` suite or no tasks.

    This is the whole scoring path: run_suite wraps the model in HFLM and calls this.
    Seeds: lm-eval's defaults (0, 1234, 1234, 1234) shifted by `seed`.
    """
    specs = suite_tasks(suite_cfg)
    if not specs:
        return {}
    from lm_eval.evaluator import simple_evaluate

    from uapt.ifeval import prepare_ifeval

    suite = {**SUITE_DEFAULTS, **suite_cfg}
    prepare_ifeval()  # lm-eval's IFEval code downloads punkt_tab at import unless NLTK finds it
    include = suite["include_path"]
    include = [include] if isinstance(include, str) else list(include or [])
    scores: dict[str, dict[str, float | None]] = {}
    meta: dict[str, Any] = {"n_samples": {}, "task_versions": {}, "seconds": {}}
    kept: list[dict[str, Any]] = []
    dropped: list[str] = []
    for spec in specs:
        started = time.perf_counter()
        request, manager, is_cfg = task_request(spec, include)
        raw = simple_evaluate(
            model=lm,
            tasks=[request],
            task_manager=manager,
            limit=spec.limit,
            num_fewshot=None if is_cfg else spec.num_fewshot,
            gen_kwargs={"max_gen_toks": spec.max_gen_toks} if spec.max_gen_toks else None,
            apply_chat_template=spec.apply_chat_template,
            fewshot_as_multiturn=spec.fewshot_as_multiturn,
            system_instruction=suite["system_instruction"],
            bootstrap_iters=suite["bootstrap_iters"],
            log_samples=True,  # per-sample outcomes are always kept (uapt.outcomes)
            device=device,
            random_seed=seed,
            numpy_random_seed=1234 + seed,
            torch_random_seed=1234 + seed,
            fewshot_random_seed=1234 + seed,
        )
        if raw is None:  # not rank 0 (lm-eval returns results on rank 0 only)
            continue
        keep = None if suite["subtasks"] else {spec.name}
        # a tag (e.g. ai2_arc) has no aggregate of its own: then every task it expanded to
        scores.update(flatten_results(raw, keep) or flatten_results(raw))
        meta["n_samples"].update(raw.get("n-samples", {}))
        meta["task_versions"].update(
            {k: v for k, v in raw.get("versions", {}).items() if v is not None}
        )
        meta["seconds"][spec.name] = round(time.perf_counter() - started, 2)
        lines, skipped = outcomes.from_samples(raw.get("samples") or {}, scores)
        kept, dropped = kept + lines, dropped + skipped
        if out_dir is not None and suite["log_samples"]:
            write_samples(Path(out_dir) / "eval_samples", raw.get("samples") or {})
    if out_dir is not None:
        outcomes.write(Path(out_dir), kept)
    meta["outcomes"] = {"file": outcomes.FILE, "lines": len(kept), "not_per_sample": dropped}
    meta_out = {
        "suite": _plain(suite_cfg),
        "lm_eval_version": lm_eval_version(),
        "seed": seed,
        **meta,
    }
    return {"eval": scores, "eval_meta": json.loads(json.dumps(meta_out, default=str))}


def run_suite(
    model: Any,
    tokenizer: Any,
    suite_cfg: Mapping[str, Any],
    *,
    device: Any,
    out_dir: Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Evaluate an in-memory model (on `device` already) with a suite: {"eval", "eval_meta"} or {}.

    The model goes to eval mode for the duration and back to its previous mode afterwards.
    Per-sample outputs go to <out_dir>/eval_samples/<task>.jsonl when `eval.log_samples` is true.
    """
    if not suite_tasks(suite_cfg):
        return {}
    from lm_eval.models.huggingface import HFLM

    suite = {**SUITE_DEFAULTS, **suite_cfg}
    was_training = model.training
    try:
        # simple_evaluate ignores its batch_size for a model object: the HFLM carries it.
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=suite["batch_size"],
            max_batch_size=suite["max_batch_size"],
            max_length=suite["max_length"],
        )
        return evaluate_lm(lm, suite_cfg, out_dir=out_dir, seed=seed, device=str(device))
    finally:
        model.train(was_training)


def flatten_results(
    raw: Mapping[str, Any], keep: set[str] | None = None
) -> dict[str, dict[str, float | None]]:
    """lm-eval's results -> {task: {metric: value, metric + "_stderr": value}}.

    Keys are lm-eval's "metric,filter" with ",none" dropped: "acc", "exact_match,strict-match",
    "exact_match,strict-match_stderr". Stderrs lm-eval could not compute ("N/A") become None.
    """
    out: dict[str, dict[str, float | None]] = {}
    for section in ("groups", "results"):  # a group's aggregate appears in both; results win
        for task, metrics in (raw.get(section) or {}).items():
            if keep is not None and task not in keep:
                continue
            row = out.setdefault(task, {})
            for key, value in metrics.items():
                if "," not in key:  # "alias", "sample_len", ...
                    continue
                metric, filt = key.split(",", 1)
                stderr = metric.endswith("_stderr")
                metric = metric.removesuffix("_stderr")
                name = (metric if filt == "none" else f"{metric},{filt}") + (
                    "_stderr" if stderr else ""
                )
                row[name] = _number(value)
    return out


def _number(value: Any) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _plain(node: Any) -> Any:
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(node, DictConfig | ListConfig):
            return OmegaConf.to_container(node, resolve=True)
    except ImportError:
        pass
    return json.loads(json.dumps(node, default=str))


def write_samples(folder: Path, samples: Mapping[str, list[dict[str, Any]]]) -> None:
    from lm_eval.utils import handle_non_serializable

    from uapt import files

    for task, rows in samples.items():
        lines = (
            json.dumps(row, default=handle_non_serializable, ensure_ascii=False) + "\n"
            for row in rows
        )
        files.write_text(folder / f"{task}.jsonl", "".join(lines))


# ----------------------------------------------------------------------------- base scores
def score_delta(
    scores: Mapping[str, Mapping[str, Any]], base: Mapping[str, Mapping[str, Any]]
) -> dict[str, dict[str, float]]:
    """scores - base for every (task, metric) both have (stderrs excluded)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in scores.items():
        for metric, value in metrics.items():
            ref = (base.get(task) or {}).get(metric)
            if metric.endswith("_stderr") or _number(value) is None or _number(ref) is None:
                continue
            out.setdefault(task, {})[metric] = float(value) - float(ref)
    return out


def suite_hash(suite_cfg: Mapping[str, Any]) -> str:
    """Identity of what a suite computes (not batch size or sample logging), with lm-eval's version."""
    node = {k: v for k, v in _plain(suite_cfg).items() if k not in NON_SEMANTIC}
    blob = json.dumps({"suite": node, "lm_eval": lm_eval_version()}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def base_scores(
    model_cfg: Mapping[str, Any],
    suite_cfg: Mapping[str, Any],
    cache_dir: str | Path,
    evaluate_fn: Callable[[], dict[str, Any]],
    *,
    init_seed: int | None = None,
    inputs: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The initial model's run_suite result, computed once per (model, suite) and cached as JSON.

    `evaluate_fn()` runs the suite on the initial model; it is called only on a cache miss.
    A random-init model (no `model.path`) depends on its init seed: pass it as `init_seed`.
    `inputs`: the run's content fingerprints (uapt.inputs); those of the model and the suite's
    data files enter the key, so an edited local model or eval file is scored again.
    """
    if not suite_tasks(suite_cfg):
        return {}
    from uapt import files
    from uapt.models import model_fingerprint

    key = f"{model_fingerprint(model_cfg)}-{suite_hash(suite_cfg)}"
    if not model_cfg.get("path") and init_seed is not None:
        key += f"-s{init_seed}"
    local = {k: v for k, v in (inputs or {}).items() if k.startswith(("model.", "eval."))}
    if local:
        key += "-" + hashlib.sha256(json.dumps(local, sort_keys=True).encode()).hexdigest()[:12]
    path = Path(cache_dir).expanduser() / "base_scores" / f"{key}.json"
    if path.exists():
        try:
            cached = files.read_json(path)
            log.info("base scores from cache %s", path)
            return cached
        except files.DamagedFile as e:
            log.warning("base-score cache %s is damaged (%s); evaluating again", path, e.why)
    result = evaluate_fn()
    files.write_json(path, result)
    return result


# ----------------------------------------------------------------------------- reporting
def result_rows(results: Mapping[str, Any]) -> list[list[Any]]:
    """[task, metric, value, stderr, base, delta] per metric, from a run_suite result or run record."""
    base, delta = results.get("eval_base") or {}, results.get("eval_delta") or {}
    rows = []
    for task, metrics in (results.get("eval") or {}).items():
        for metric, value in metrics.items():
            if metric.endswith("_stderr"):
                continue
            rows.append(
                [
                    task,
                    metric,
                    value,
                    metrics.get(metric + "_stderr"),
                    (base.get(task) or {}).get(metric),
                    (delta.get(task) or {}).get(metric),
                ]
            )
    return rows


def _fmt(x: Any) -> str:
    return "" if _number(x) is None else f"{float(x):.4f}"


def rich_table(results: Mapping[str, Any], title: str | None = None):
    """Every metric with its stderr (and base and delta when the results carry them)."""
    from rich.table import Table

    suite = ((results.get("eval_meta") or {}).get("suite") or {}).get("name", "")
    rows = result_rows(results)
    extra = any(r[4] is not None or r[5] is not None for r in rows)
    table = Table(title=title or f"eval: {suite}")
    for col in ("task", "metric", "value", "± stderr", *(("base", "delta") if extra else ())):
        table.add_column(col, justify="left" if col in ("task", "metric") else "right")
    for task, metric, value, stderr, base, delta in rows:
        table.add_row(
            task, metric, _fmt(value), _fmt(stderr), *((_fmt(base), _fmt(delta)) if extra else ())
        )
    return table


# ----------------------------------------------------------------------------- uapt-eval
CLI_KEYS = ("checkpoint", "output")


def _pop_cli_keys(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """uapt-eval's own keys (not in train.yaml) out of the Hydra overrides."""
    own, rest = {}, []
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep and key in CLI_KEYS:
            own[key] = value
        else:
            rest.append(arg)
    return own, rest


def latest_checkpoint(folder: Path) -> Path:
    """A run folder resolves to its final model/ when it saved one, else (like its checkpoints/)
    to the newest step-<N>/ whose files match their manifest; any other folder is taken as is."""
    from uapt import checkpoint as ckpt

    if (folder / "run.json").is_file() and (folder / "model").is_dir():
        return folder / "model"
    for candidate in (folder / "checkpoints", folder):
        if any(candidate.glob("step-*")):
            found = ckpt.latest(candidate)
            if found is None:
                raise FileNotFoundError(
                    f"checkpoint={folder}: no step-* folder in {candidate} matches its manifest"
                )
            return found
    return folder


def load_for_eval(
    model_cfg: Mapping[str, Any],
    cache_dir: str | Path,
    device: Any,
    checkpoint: str | Path | None = None,
) -> tuple[Any, Any]:
    """(model, tokenizer) from the model config, or from a checkpoint folder of that model:
    a saved Hugging Face model (config.json), a PEFT adapter (adapter_config.json) or bare
    weights (model.safetensors) for the architecture `model_cfg` describes."""
    from uapt.models import load_model, load_tokenizer

    if checkpoint is None:
        tokenizer = load_tokenizer(model_cfg, cache_dir)
        return load_model(model_cfg, tokenizer, cache_dir, device), tokenizer
    if not Path(checkpoint).expanduser().is_dir():
        raise FileNotFoundError(f"checkpoint={checkpoint}: no such folder")
    folder = latest_checkpoint(Path(checkpoint).expanduser())
    has_tokenizer = (folder / "tokenizer_config.json").exists()
    if (folder / "config.json").exists():
        cfg = {
            **model_cfg,
            "path": str(folder),
            **({"tokenizer": str(folder)} if has_tokenizer else {}),
        }
        tokenizer = load_tokenizer(cfg, cache_dir)
        return load_model(cfg, tokenizer, cache_dir, device), tokenizer
    tok_cfg = {**model_cfg, "tokenizer": str(folder)} if has_tokenizer else model_cfg
    tokenizer = load_tokenizer(tok_cfg, cache_dir)
    model = load_model(model_cfg, tokenizer, cache_dir, device)
    if (folder / "adapter_config.json").exists():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder)).to(device), tokenizer
    weights_file = folder / "model.safetensors"
    if not weights_file.exists():
        raise FileNotFoundError(
            f"checkpoint={checkpoint}: {folder} has no config.json, "
            "adapter_config.json or model.safetensors"
        )
    from safetensors.torch import load_file

    # uapt checkpoints hold the trainable tensors only (all weights, or the LoRA adapters)
    weights = load_file(str(weights_file), device=str(device))
    unknown = sorted(set(weights) - set(model.state_dict()))
    if unknown:
        raise ValueError(
            f"checkpoint={checkpoint}: {len(unknown)} tensors the model {model_cfg.get('name')!r} "
            f"does not have, e.g. {unknown[0]}: it belongs to another model"
        )
    model.load_state_dict(weights, strict=False)
    return model, tokenizer


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def evaluate_cli(
    cfg: Mapping[str, Any], checkpoint: str | None = None, output: str | None = None
) -> int:
    """uapt-eval's body on a resolved config; returns the exit status."""
    from rich.console import Console

    suite = cfg["eval"]
    try:
        specs = suite_tasks(suite)
    except ConfigError as e:
        log.error("bad configuration: %s", e)
        return 2
    if not specs:
        log.error(
            "eval=%s has no tasks: choose a suite, e.g. eval=embedded or eval=paper",
            suite.get("name"),
        )
        return 2
    device = _device((cfg.get("trainer") or {}).get("device", "auto"))
    try:
        model, tokenizer = load_for_eval(cfg["model"], cfg["cache_dir"], device, checkpoint)
    except (FileNotFoundError, ValueError) as e:
        log.error("%s", e)
        return 2
    out_file = Path(output).expanduser() if output else None
    if out_file is not None and out_file.suffix != ".json":
        out_file = out_file / "eval.json"
    results = run_suite(
        model,
        tokenizer,
        suite,
        device=device,
        out_dir=out_file.parent if out_file else None,
        seed=cfg.get("seed", 0),
    )
    title = f"{cfg['model'].get('name')}{f' @ {checkpoint}' if checkpoint else ''} on eval={suite['name']}"
    Console().print(rich_table(results, title))
    if out_file is not None:
        from uapt import files

        files.write_json(out_file, {"model": cfg["model"], "checkpoint": checkpoint, **results})
        log.info("wrote %s", out_file)
    return 0


def main() -> None:
    """uapt-eval model=<name> eval=<suite> [checkpoint=<folder>] [output=<file.json>] [key=value ...]"""
    import hydra
    from omegaconf import DictConfig, OmegaConf

    own, rest = _pop_cli_keys(sys.argv[1:])
    sys.argv[1:] = rest

    @hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
    def app(cfg: DictConfig) -> None:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        logging.getLogger("lm_eval").setLevel(
            logging.WARNING
        )  # its per-task INFO lines drown the table
        from uapt.errors import UserError, show_traceback

        try:
            status = evaluate_cli(OmegaConf.to_container(cfg, resolve=True), **own)
        except UserError as e:  # named in one line (HYDRA_FULL_ERROR=1: the traceback too)
            if show_traceback():
                raise
            log.error("%s", e)
            raise SystemExit(2) from None
        if status:
            raise SystemExit(status)

    app()


if __name__ == "__main__":
    main()
