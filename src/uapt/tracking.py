"""Tracking: metrics.jsonl in the run folder (always) and W&B (offline by default, never required).

Tracking observes and never decides: a W&B failure is logged as a warning and training goes on.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no nan/inf; keep them visible
    return value


class Tracker:
    def __init__(self, run_dir: Path, cfg: Mapping[str, Any], run_id: str, slug: str):
        self.metrics_path = run_dir / "metrics.jsonl"
        self.wandb_run = None
        logger = cfg["logger"]
        if logger["name"] == "wandb" and logger.get("mode") != "disabled":
            self.wandb_run = self._init_wandb(logger, cfg, run_id, slug)

    @staticmethod
    def _init_wandb(logger: Mapping[str, Any], cfg: Mapping[str, Any], run_id: str, slug: str):
        summary = {
            "model": cfg["model"]["name"],
            "dataset": cfg["dataset"]["name"],
            "objective": cfg["objective"]["name"],
            "mask_ratio": cfg["objective"]["mask_ratio"],
            "distill_weight": cfg["objective"]["distill_weight"],
            "seed": cfg["seed"],
        }
        try:
            import wandb

            Path(logger["dir"]).expanduser().mkdir(parents=True, exist_ok=True)
            return wandb.init(
                project=logger["project"],
                entity=logger.get("entity"),
                group=logger.get("group"),
                job_type=cfg["objective"]["name"],
                name=slug,
                id=run_id,
                resume="allow",
                tags=[*logger.get("tags", []), *map(str, summary.values())][:64],
                config={**summary, "run_id": run_id, "full": dict(cfg)},
                dir=str(Path(logger["dir"]).expanduser()),
                mode=logger["mode"],
                settings=wandb.Settings(console="off", silent=True),
            )
        except Exception as e:
            log.warning("W&B disabled for this run: %s: %s", type(e).__name__, e)
            return None

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        row = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self._wandb(lambda run: run.log(dict(metrics), step=step))

    def summary(self, values: Mapping[str, Any]) -> None:
        self._wandb(lambda run: run.summary.update(dict(values)))

    def log_eval(self, results: Mapping[str, Any]) -> None:
        """Eval scores as summary metrics eval/<task>/<metric> (and base, delta) and a table."""
        from uapt.evaluation import log_to_wandb

        self._wandb(lambda run: log_to_wandb(run, results))

    def _wandb(self, action) -> None:
        if self.wandb_run is None:
            return
        try:
            action(self.wandb_run)
        except Exception as e:
            log.warning("W&B call failed (%s: %s); continuing without W&B", type(e).__name__, e)
            self.wandb_run = None

    def finish(self, failed: bool = False) -> None:
        self._wandb(lambda run: run.finish(exit_code=1 if failed else 0))
        self.wandb_run = None
