"""Sweeps: Hydra multiruns over conf/sweep/ grids that survive crashes and say how they went.

Each grid point is an ordinary run, so a re-launched sweep skips completed points by run id and
re-runs failed or unfinished ones. One failing point never stops the others: in a multirun the
job records its failure and returns. Every job writes its outcome to `<sweep dir>/outcomes/`, which
works for in-process, local-parallel and SLURM launchers alike; the summary is read from there.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from uapt import files

log = logging.getLogger("uapt")


def in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def outcomes_dir(sweep_dir: str | Path) -> Path:
    return Path(sweep_dir).expanduser() / "outcomes"


def outcome_path(sweep_dir: str | Path, job_num: int) -> Path:
    return outcomes_dir(sweep_dir) / f"{int(job_num):05d}.json"


def record_outcome(outcome: dict[str, Any]) -> None:
    """Called by a multirun job: leave its outcome where the sweep's summary will find it."""
    hydra_cfg = HydraConfig.get()
    files.write_json(outcome_path(hydra_cfg.sweep.dir, hydra_cfg.job.num), outcome)


def summarize(outcomes: list[dict[str, Any]]) -> str:
    counts = {
        s: sum(o["status"] == s for o in outcomes) for s in ("completed", "skipped", "failed")
    }
    line = (
        f"sweep: {counts['completed']} completed, {counts['skipped']} skipped, "
        f"{counts['failed']} failed"
    )
    failed = [o for o in outcomes if o["status"] == "failed"]
    if failed:
        line += " — " + "; ".join(
            f"{o.get('id', '?')} ({o.get('slug', '?')}): {o['error']}" for o in failed
        )
    return line


class SweepSummary(Callback):
    """Clears stale outcomes when a multirun starts and prints the one-line summary at its end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        folder = outcomes_dir(config.hydra.sweep.dir)
        for stale in folder.glob("*.json"):
            stale.unlink()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        folder = outcomes_dir(config.hydra.sweep.dir)
        outcomes = [_read_outcome(p) for p in sorted(folder.glob("*.json"))]
        print(summarize(outcomes), flush=True)
        if any(o["status"] == "failed" for o in outcomes):
            raise SystemExit(1)  # scripts and CI see that the sweep is not whole


def _read_outcome(path: Path) -> dict[str, Any]:
    """A job's outcome; a damaged one (a job killed mid-write) counts as failed, named."""
    try:
        outcome = files.read_json(path)
    except files.DamagedFile as e:
        return {"status": "failed", "id": None, "slug": path.stem, "error": str(e)}
    return (
        outcome
        if isinstance(outcome, dict) and "status" in outcome
        else {"status": "failed", "id": None, "slug": path.stem, "error": f"{path}: not an outcome"}
    )
