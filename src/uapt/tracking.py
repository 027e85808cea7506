"""Tracking: metrics.jsonl in the run folder (always) and W&B (offline by default, never required).

Tracking observes and never decides: a W&B failure is one warning line and training goes on.
A run's W&B reporting lives here only; evaluation hands over plain data (a study's table as a
W&B run: uapt.table.wandb_run; its workspace: uapt.wandb_report).

What a run shows in W&B (so that dashboards read right without configuration):
- config: the flat keys of records.run_summary (model, dataset, objective, variant, mask_ratio,
  distill_weight, seed, experiment, eval_suite), run_id and the full config;
- tags `key:value` (`mask_ratio:0.5`, `seed:0`, ...): a bare `0.5` cannot tell ratio from weight;
- history: one row per logged step, with `step` as the x axis of every training metric;
- summary: `loss` as its minimum, `val/loss` as its last value, the final `train/...` and
  `val/loss`, and the eval scores `eval/<task>/<metric>` (also `eval_base/`, `eval_delta/`) with
  their table `eval/results`, in the summary only (evaluation is one point, not a curve).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from uapt.errors import one_line
from uapt.records import run_summary
from uapt.sections.logger import LoggerConfig

log = logging.getLogger(__name__)

TAG_KEYS = ("model", "dataset", "objective", "variant", "mask_ratio", "distill_weight", "seed")
STEP_KEY = "step"
# How W&B summarises a history key; every other key keeps its last value (W&B's default).
SUMMARIES = {"loss": "min", "val/loss": "last"}
EVAL_SECTIONS = ("eval", "eval_base", "eval_delta")
EVAL_TABLE_COLUMNS = ["task", "metric", "value", "stderr", "base", "delta"]


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them visible
    return value


def tags(summary: Mapping[str, Any], extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """`key:value` tags (W&B keeps at most 64 per run, of at most 64 characters each)."""
    pairs = [f"{k}:{summary[k]}" for k in TAG_KEYS if summary.get(k) is not None]
    return [t[:64] for t in [*extra, *pairs]][:64]


def define_metrics(run: Any) -> None:
    """`step` as the x axis of every history key, and how `loss` and `val/loss` are summarised."""
    run.define_metric(STEP_KEY)
    run.define_metric("*", step_metric=STEP_KEY)
    for key, summary in SUMMARIES.items():
        run.define_metric(key, step_metric=STEP_KEY, summary=summary)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def eval_summary(results: Mapping[str, Any]) -> dict[str, float]:
    """eval/<task>/<metric> (and eval_base/, eval_delta/) for every numeric score."""
    summary = {}
    for section in EVAL_SECTIONS:
        for task, metrics in (results.get(section) or {}).items():
            for metric, value in metrics.items():
                if _number(value) is not None:
                    summary[f"{section}/{task}/{metric}"] = float(value)
    return summary


def log_eval_results(wandb_run: Any, results: Mapping[str, Any]) -> None:
    """Eval scores as summary metrics and a table (task, metric, value, stderr, base, delta)."""
    if wandb_run is None or not results or not results.get("eval"):
        return
    import wandb

    from uapt.evaluation.run import result_rows  # evaluation's data, shaped for a table

    wandb_run.summary.update(eval_summary(results))
    wandb_run.summary["eval/results"] = wandb.Table(
        columns=EVAL_TABLE_COLUMNS, data=result_rows(results)
    )


class Tracker:
    def __init__(self, run_dir: Path, cfg: Mapping[str, Any], run_id: str, slug: str):
        """`cfg`: the run's plain config (its summary and the full config go to W&B)."""
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        logger = LoggerConfig.parse(cfg["logger"])
        if logger.wandb:
            self.wandb_run = self._init_wandb(logger, cfg, run_id, slug)

    @staticmethod
    def _init_wandb(logger: LoggerConfig, cfg: Mapping[str, Any], run_id: str, slug: str):
        summary = run_summary(cfg)
        try:
            import wandb

            Path(logger.dir).expanduser().mkdir(parents=True, exist_ok=True)
            run = wandb.init(
                project=logger.project,
                entity=logger.entity,
                group=logger.group,
                job_type=cfg["objective"]["name"],
                name=slug,
                id=run_id,
                resume="allow",
                tags=tags(summary, list(logger.tags)),
                config={**summary, "run_id": run_id, "full": dict(cfg)},
                dir=str(Path(logger.dir).expanduser()),
                mode=logger.mode,
                settings=wandb.Settings(console="off", silent=True),
            )
            define_metrics(run)
            return run
        except Exception as e:
            log.warning("W&B disabled for this run (%s); training goes on", one_line(e))
            return None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._wandb(lambda run: run.log({STEP_KEY: step, **metrics}, step=step))

    def summary(self, values: Mapping[str, Any]) -> None:
        self._wandb(lambda run: run.summary.update(dict(values)))

    def log_eval(self, results: Mapping[str, Any]) -> None:
        """Eval scores as summary metrics eval/<task>/<metric> (and base, delta) and a table."""
        self._wandb(lambda run: log_eval_results(run, results))

    def _wandb(self, action: Callable[[Any], Any]) -> None:
        if self.wandb_run is None:
            return
        try:
            action(self.wandb_run)
        except Exception as e:
            log.warning("W&B call failed (%s); continuing without W&B", one_line(e))
            self.wandb_run = None

    def finish(self, failed: bool = False) -> None:
        self._wandb(lambda run: run.finish(exit_code=1 if failed else 0))
        self.wandb_run = None
