"""Tasks as lm-eval runs them: a task lm-eval registers (optionally on local files or with config
overrides), or one uapt builds offline: `arith` (held-out synthetic problems scored like GSM8K) and
`ifeval_embedded` (prompts in IFEval's format, scored by lm-eval's IFEval checker)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from uapt.schema import ConfigError
from uapt.sections.eval import BUILTIN_TASKS, DEFAULT_SIZE, TaskSpec


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
    cfg.update(spec.overrides or {})
    cfg["task"] = spec.name
    # in the config itself: simple_evaluate's num_fewshot is ignored where a config says 0
    if spec.num_fewshot is not None:
        cfg["num_fewshot"] = spec.num_fewshot
    return cfg, manager, True
