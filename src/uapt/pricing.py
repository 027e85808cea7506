"""What planned runs cost: each point's training, evaluation and device time (uapt.costs on its
checked config), and what the points of a grid share, priced once: the cached teacher's fill per
(weights, row) and the base model's evaluation per (model, suite). Used by the plan (uapt.plan)
and by benchmarks/plan_accuracy.py.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from uapt import costs
from uapt.devices import Rate, rate
from uapt.errors import UserError
from uapt.evaluation.run import base_scores_path
from uapt.models import model_fingerprint

if TYPE_CHECKING:
    from uapt.sections import PlanConfig, RunConfig


@dataclass
class PointCost:
    train: costs.TrainCost
    eval_flops: float
    seconds: float  # on the plan's device, with the run's trainer.nproc devices
    device_hours: float
    fill: tuple[Any, dict[Any, int]] | None = None  # (teacher cache, {row: tokens}) to fill
    base: tuple[Path, float] | None = None  # (base-score cache file, FLOPs) when not cached


@dataclass
class Costing:
    """Costs of the points of one plan; what the points share is computed once."""

    plan: PlanConfig
    estimates: dict[str, list[str]] = field(default_factory=dict)  # rule -> what it priced
    unknown: dict[str, None] = field(default_factory=dict)  # what could not be priced
    _memo: dict[Any, Any] = field(default_factory=dict)

    def _once(self, key: Any, make: Any) -> Any:
        if key not in self._memo:
            self._memo[key] = make()
        return self._memo[key]

    def estimated(self, rule: str, subject: str) -> None:
        subjects = self.estimates.setdefault(rule, [])
        if subject not in subjects:
            subjects.append(subject)

    def rate(self, run: RunConfig) -> Rate:
        return rate(self.plan, run.trainer.precision)

    def tokenizer(self, run: RunConfig) -> Any | None:
        def load() -> Any | None:
            try:
                return costs.load_tokenizer(run.model, run.cache_dir)
            except UserError as e:
                self.estimated(str(e), f"the tokenizer of {run.model.name}")
                return None

        return self._once(("tokenizer", identity(run.model.as_dict()), run.cache_dir), load)

    def shape(self, run: RunConfig) -> costs.ModelShape | None:
        def size() -> costs.ModelShape | None:
            try:
                return costs.model_shape(run.model, run.cache_dir, self.tokenizer(run))
            except UserError as e:
                self.unknown[f"model {run.model.name}: {e}"] = None
                return None

        return self._once(("shape", identity(run.model.as_dict()), run.cache_dir), size)

    def rows(self, run: RunConfig) -> costs.Rows:
        tokenizer = self.tokenizer(run)
        reads = run.trainer.max_steps * run.trainer.batch_size

        def lengths() -> costs.Rows:
            if tokenizer is not None:
                try:
                    return costs.tokenised_rows(run.dataset, tokenizer, run.seed, run.cache_dir)
                except UserError as e:
                    why = f"the data cannot be tokenised here ({e})"
            else:
                why = "without the tokenizer"
            found = costs.estimated_rows(run.dataset, run.seed, why, reads)
            self.estimated(found.estimate, f"training rows of {run.dataset.name}")
            return found

        key = (
            "rows",
            identity(run.dataset.as_dict()),
            identity(run.model.as_dict()),
            run.seed,
            reads,
        )
        return self._once(key, lengths)

    def tasks(self, run: RunConfig) -> list[costs.TaskCost]:
        def price() -> list[costs.TaskCost]:
            found = []
            for spec in run.eval.task_specs:
                task = costs.task_cost(spec, self.tokenizer(run), run.eval.system_instruction)
                if task is None:
                    self.unknown[f"eval task {spec.name}: no figures (uapt.costs.KNOWN_TASKS)"] = (
                        None
                    )
                    continue
                if task.estimate:
                    self.estimated(task.estimate, f"eval task {spec.name}")
                found.append(task)
            return found

        return self._once(
            ("tasks", identity(run.plain.get("eval")), identity(run.model.as_dict())), price
        )

    def point(self, run: RunConfig, start: int) -> PointCost | None:
        """The cost of a run from step `start` (None: its model cannot be sized here)."""
        shape = self.shape(run)
        if shape is None:
            return None
        rows = self.rows(run)
        key = ("walk", identity(run.trainer.as_dict()), id(rows), identity(shape), run.seed, start)
        steps = self._once(key, lambda: costs.walk(run.trainer, shape, rows, run.seed, start))
        lora = run.model.lora.enabled
        trained = costs.train_cost(
            run.trainer, run.objective, shape, rows, run.seed, lora, start, steps
        )
        evaluated = costs.eval_flops(self.tasks(run), shape)
        speed = self.rate(run)
        flops = trained.total + evaluated
        seconds = speed.seconds(flops, run.trainer.nproc)
        cost = PointCost(trained, evaluated, seconds, speed.seconds(flops) / 3600)
        cost.fill = self._fill(run, rows, trained)
        cost.base = self._base(run, shape)
        return cost

    def _fill(self, run: RunConfig, rows: costs.Rows, trained: costs.TrainCost) -> Any:
        """The cached teacher's rows this run reads: filled once per (weights, row) in a grid."""
        spec = run.objective
        if not (spec.needs_teacher and spec.teacher == "cached"):
            return None
        weights = (
            model_fingerprint(run.model),
            identity(_model_inputs(run)),
            run.model.path or run.seed,
        )
        cache = (weights, spec.teacher_topk, spec.temperature)
        probe = range(min(run.trainer.batch_size, len(rows.val)))
        where = identity(run.dataset.as_dict())  # estimated rows: every seed reads the same rows
        keys = rows.keys or [(where, i) for i in range(len(rows.train) + len(rows.val))]
        wanted = {keys[i]: rows.train[i] for i in trained.rows_read}
        wanted.update({keys[len(rows.train) + j]: rows.val[j] for j in probe})
        return cache, wanted

    def totals(self, priced: Sequence[tuple[RunConfig, PointCost, int]]) -> Totals:
        return add_totals(self, priced)

    def _base(self, run: RunConfig, shape: costs.ModelShape) -> Any:
        """The initial model's evaluation: once per (model, suite), unless already cached."""
        if not run.eval.task_specs:
            return None
        suite = run.plain["eval"]
        path = base_scores_path(
            run.model, suite, run.cache_dir, init_seed=run.seed, inputs=run.inputs
        )
        return None if path.exists() else (path, costs.eval_flops(self.tasks(run), shape))


def identity(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _model_inputs(run: RunConfig) -> dict[str, str]:
    return {k: v for k, v in (run.inputs or {}).items() if k.startswith("model.")}


@contextlib.contextmanager
def quiet_data_logs() -> Iterator[None]:
    """The data and model rooms' INFO lines (cache hits, row counts) are not the plan's."""
    loggers = [logging.getLogger(n) for n in ("uapt.data", "uapt.models", "uapt.smollm2")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@dataclass
class Totals:
    """A grid's sums: every run's steps and tokens, FLOPs and device-hours by part (train, eval:
    the runs'; fill, base: shared, once)."""

    steps: int = 0
    tokens: int = 0
    flops: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    hours: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PARTS, 0.0))
    fill_rows: int = 0
    base_evals: int = 0


PARTS = ("train", "eval", "fill", "base")


def add_totals(costing: Costing, priced: Sequence[tuple[RunConfig, PointCost, int]]) -> Totals:
    """Sums over (run, cost, times) entries: a tuning study's point counts its trials."""
    out = Totals()
    fills: dict[Any, tuple[Any, dict[Any, int]]] = {}
    bases: dict[Path, tuple[Any, float]] = {}
    for run, cost, times in priced:
        speed = costing.rate(run)
        out.steps += times * cost.train.steps
        out.tokens += times * cost.train.tokens
        for part, flops in (("train", cost.train.total), ("eval", cost.eval_flops)):
            out.flops[part] += times * flops
            out.hours[part] += times * speed.seconds(flops) / 3600
        if cost.fill:
            cache, wanted = cost.fill
            fills.setdefault(cache, (run, {}))[1].update(wanted)
        if cost.base:
            bases.setdefault(cost.base[0], (run, cost.base[1]))
    for run, wanted in fills.values():
        flops = costs.cache_fill_flops(costing.shape(run), wanted)
        out.flops["fill"] += flops
        out.hours["fill"] += costing.rate(run).seconds(flops) / 3600
        out.fill_rows += len(wanted)
    for run, flops in bases.values():
        out.flops["base"] += flops
        out.hours["base"] += costing.rate(run).seconds(flops) / 3600
    out.base_evals = len(bases)
    return out
