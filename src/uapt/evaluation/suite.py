"""An evaluation suite (conf/eval/<name>.yaml) checked into TaskSpecs: which lm-eval tasks, with
which few-shot count, sample limit, chat template and generation length (docs/evaluation.md)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uapt.config import ConfigError

BUILTIN_TASKS = ("arith", "ifeval_embedded")

DEFAULT_SIZE = {"arith": 64, "ifeval_embedded": 48}  # rows a builtin task generates

NON_SEMANTIC = ("batch_size", "max_batch_size", "log_samples")  # keys that do not change scores


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
