"""`eval.*` (conf/eval/<name>.yaml): an evaluation suite checked into a SuiteConfig of TaskSpecs:
which lm-eval tasks, with which few-shot count, sample limit, chat template and generation length
(docs/evaluation.md). Running it is uapt.evaluation."""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from uapt.schema import (
    BOOL,
    MAPPING,
    STRING,
    TEXT,
    ConfigError,
    Section,
    number,
    one_of,
    option,
    optional,
    satisfies,
)

GENERATED_TASKS = ("arith", "ifeval_embedded")  # uapt generates their rows; lm-eval scores them
NLL_TASK = "nll"  # uapt's own forward-only task: per-sample NLL of reference responses (nll.py)
BUILTIN_TASKS = (*GENERATED_TASKS, NLL_TASK)

DEFAULT_SIZE = {"arith": 64, "ifeval_embedded": 48}  # rows a builtin task generates
NLL_ONLY = ("prompt_field", "response_field", "max_length")  # TaskSpec keys of the nll task alone

# How generation tasks decode: uapt's greedy loop, or lm-eval's model.generate (uapt.evaluation.generate)
GENERATORS = ("fast", "hf")


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


def _task_name_ok(v: Any) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[\w.:-]+", v) is not None


LIMIT = satisfies(_limit_ok, "an integer >= 1, a fraction in (0, 1], or null")
NLL_SUFFIXES = (".json", ".jsonl")
SUITE_OR_BOOL = optional(satisfies(lambda v: isinstance(v, bool), "true, false (the suite's)"))


@dataclass(frozen=True)
class TaskSpec(Section):
    """One task of a suite (`eval.tasks[i]`; a bare string is its name). Keys left null take the
    suite's value when the suite is parsed (SuiteConfig.task_specs)."""

    SECTION: ClassVar[str] = "eval.tasks[]"

    name: str = option(satisfies(_task_name_ok, "a task name (letters, digits, _ . : -)"))
    task: str | None = option(optional(TEXT), default=None)  # lm-eval task; null: same as name
    num_fewshot: int | None = option(optional(number(0, integer=True)), default=None)
    limit: int | float | None = option(LIMIT, default=None)
    apply_chat_template: bool | None = option(SUITE_OR_BOOL, default=None)
    fewshot_as_multiturn: bool | None = option(SUITE_OR_BOOL, default=None)
    max_gen_toks: int | None = option(optional(number(1, integer=True)), default=None)
    data_files: Any = option(
        optional(
            satisfies(
                lambda v: isinstance(v, str | list | tuple | Mapping),
                "a file, a list of files, or a mapping split -> file(s)",
            )
        ),
        default=None,
    )
    overrides: Mapping[str, Any] | None = option(optional(MAPPING), default=None)
    size: int | None = option(optional(number(1, integer=True)), default=None)  # builtins only
    seed: int = option(number(integer=True), default=0)
    # the nll task only: which fields of a row hold the prompt and the reference response, and
    # the token length a rendered row is cut to (from the right, as training rows are)
    prompt_field: str | None = option(optional(TEXT), default=None)
    response_field: str | None = option(optional(TEXT), default=None)
    max_length: int | None = option(optional(number(2, integer=True)), default=None)

    @classmethod
    def parse(cls, node: Any, where: str | None = None) -> TaskSpec:
        if isinstance(node, str):
            node = {"name": node}
        if not isinstance(node, Mapping | TaskSpec) or (
            isinstance(node, Mapping) and "name" not in node
        ):
            raise ConfigError(
                f"{where} must be a task name or a mapping with a `name`, got {node!r}"
            )
        return super().parse(node, where)

    def check(self, where: str) -> None:
        task = self.task or self.name
        if task not in GENERATED_TASKS and self.size is not None:
            raise ConfigError(
                f"{where}.size applies to the generated tasks ({', '.join(GENERATED_TASKS)}) only"
            )
        if task in GENERATED_TASKS and self.data_files is not None:
            raise ConfigError(f"{where}.data_files: the builtin task {task!r} generates its data")
        if task == NLL_TASK:
            self._check_nll(where)
        else:
            for key in NLL_ONLY:
                if getattr(self, key) is not None:
                    raise ConfigError(f"{where}.{key} applies to the {NLL_TASK} task only")
        _resolve_files(f"{where}.data_files", self.data_files)  # fail on a missing file now

    def _check_nll(self, where: str) -> None:
        """The nll task reads one local file and generates nothing: generation and few-shot keys
        would be ignored, so they are errors; the chat template is always applied (as in training)."""
        if not isinstance(self.data_files, str) or not self.data_files.endswith(NLL_SUFFIXES):
            raise ConfigError(
                f"{where}.data_files: the {NLL_TASK} task reads one local .json or .jsonl file "
                f"of prompts and reference responses, got {self.data_files!r}"
            )
        for key in ("num_fewshot", "max_gen_toks", "fewshot_as_multiturn", "overrides"):
            if getattr(self, key) is not None:
                raise ConfigError(f"{where}.{key} does not apply to the {NLL_TASK} task")
        if self.apply_chat_template is False:
            raise ConfigError(
                f"{where}.apply_chat_template=false: the {NLL_TASK} task renders every row with "
                "the chat template, as training does"
            )

    @property
    def builtin(self) -> bool:
        return (self.task or self.name) in BUILTIN_TASKS

    @property
    def is_nll(self) -> bool:
        """uapt's forward-only NLL task (uapt.evaluation.nll), not an lm-eval task."""
        return (self.task or self.name) == NLL_TASK


@dataclass(frozen=True)
class SuiteConfig(Section):
    """`eval.*`, checked (conf/eval/base.yaml says what each key does)."""

    SECTION: ClassVar[str] = "eval"
    DEFAULTS: ClassVar[str] = "eval/base.yaml"

    name: str = option(TEXT)
    tasks: tuple[TaskSpec, ...] = option(
        satisfies(lambda v: isinstance(v, list | tuple), "a list of tasks")
    )
    # batch_size, max_batch_size, log_samples and generate do not change scores (`generate`: both
    # paths give the same outputs, see uapt.evaluation.generate)
    batch_size: int | str = option(
        satisfies(_batch_ok, "an integer >= 1, 'auto' or 'auto:N'"), semantic=False
    )
    max_batch_size: int = option(number(1, integer=True), semantic=False)
    max_length: int | None = option(optional(number(1, integer=True)))
    generate: str = option(one_of(*GENERATORS), semantic=False)
    limit: int | float | None = option(LIMIT)
    apply_chat_template: bool = option(BOOL)
    fewshot_as_multiturn: bool = option(BOOL)
    system_instruction: str | None = option(optional(STRING))
    bootstrap_iters: int = option(number(0, integer=True))
    log_samples: bool = option(BOOL, semantic=False)
    subtasks: bool = option(BOOL)
    include_path: str | tuple[str, ...] | None = option(
        optional(
            satisfies(lambda v: isinstance(v, str | list | tuple), "a folder or list of folders")
        )
    )

    def check(self, where: str) -> None:
        self.task_specs  # noqa: B018 - every task checked now, before any model is loaded

    @functools.cached_property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        """The tasks with the suite's values filled in (none for the `none` suite)."""
        if self.name == "none":
            return ()
        specs, seen = [], set()
        for i, raw in enumerate(self.tasks):
            spec = self._resolved(TaskSpec.parse(raw, f"eval.tasks[{i}]"), f"eval.tasks[{i}]")
            if spec.name in seen:
                raise ConfigError(f"eval.tasks[{i}].name={spec.name!r} appears twice in the suite")
            if spec.is_nll and not spec.apply_chat_template:
                raise ConfigError(
                    f"eval.apply_chat_template=false: eval.tasks[{i}] ({NLL_TASK}) renders every "
                    "row with the chat template, as training does; set it on the other tasks"
                )
            seen.add(spec.name)
            specs.append(spec)
        return tuple(specs)

    def _resolved(self, spec: TaskSpec, where: str) -> TaskSpec:
        return dataclasses.replace(
            spec,
            task=spec.task or spec.name,
            limit=_cap(spec.limit, self.limit),
            apply_chat_template=_pick(spec.apply_chat_template, self.apply_chat_template),
            fewshot_as_multiturn=_pick(spec.fewshot_as_multiturn, self.fewshot_as_multiturn),
            data_files=_resolve_files(f"{where}.data_files", spec.data_files),
            overrides=dict(spec.overrides or {}),
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
