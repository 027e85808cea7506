"""Sweeps: where the grids live (top-level sweeps/), and multiruns that survive crashes and say
how they went.

Every study's files sit together in `sweeps/`: the grids (`sweeps/<name>.yaml`), the paired
objective settings they sweep (`sweeps/variants/`) and the best settings a tuning sweep wrote
(`sweeps/tuned/`). Hydra finds them as the config groups `sweep`, `variant` and `tuned`
(`uapt-train sweep=demo variant=mle tuned=cpu_repro_lr`) through `SweepsConfigSource`, which the
plugin in hydra_plugins.uapt_launcher puts on the config search path.

Each grid point is an ordinary run, so a re-launched sweep skips completed points by run id and
re-runs failed or unfinished ones. One failing point never stops the others: in a multirun the
job records its failure and returns. Every job writes its outcome to `<sweep dir>/outcomes/`, which
works for in-process, local-parallel and SLURM launchers alike; the summary is read from there.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from hydra.core.config_search_path import ConfigSearchPath
from hydra.core.hydra_config import HydraConfig
from hydra.core.object_type import ObjectType
from hydra.experimental.callback import Callback
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from uapt import files, provenance
from uapt.console import setup_logging
from uapt.errors import show_traceback
from uapt.paths import SWEEPS_DIR

log = logging.getLogger("uapt")

# config group -> its folder under sweeps/
GROUPS = {"sweep": "", "variant": "variants", "tuned": "tuned"}


class SweepsConfigSource(ConfigSource):
    """The groups `sweep`, `variant` and `tuned` from sweeps/ (`uapt-sweeps://<folder>`): a
    group's path maps to its folder (GROUPS); nothing else is served from here."""

    @staticmethod
    def scheme() -> str:
        return "uapt-sweeps"

    def _where(self, config_path: str) -> Path | None:
        group, _, rest = config_path.partition("/")
        if group not in GROUPS:
            return None
        return Path(self.path) / GROUPS[group] / rest

    def load_config(self, config_path: str) -> ConfigResult:
        where = self._where(self._normalize_file_name(config_path))
        if where is None or not where.is_file():
            raise ConfigLoadError(f"Config not found : {config_path}")
        text = where.read_text(encoding="utf-8")
        return ConfigResult(
            config=OmegaConf.create(text),
            path=f"{self.scheme()}://{self.path}",
            provider=self.provider,
            header=ConfigSource._get_header_dict(text[:512]),
        )

    def available(self) -> bool:
        return Path(self.path).is_dir()

    def is_group(self, config_path: str) -> bool:
        if config_path == "" or config_path in GROUPS:
            return True  # the root holds the three groups, even one whose folder is empty
        where = self._where(config_path)
        return where is not None and where.is_dir()

    def is_config(self, config_path: str) -> bool:
        where = self._where(self._normalize_file_name(config_path))
        return where is not None and where.is_file()

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        if config_path == "":
            wanted = results_filter in (None, ObjectType.GROUP)
            return sorted(GROUPS) if wanted else []
        where = self._where(config_path)
        if where is None or not where.is_dir():
            return []
        found: list[str] = []
        for item in where.iterdir():
            if item.is_file():  # sweeps/variants/ is its own group, not a part of `sweep`
                self._list_add_result(
                    found, f"{config_path}/{item.name}", item.name, results_filter
                )
        return sorted(set(found))


class SweepsSearchPath(SearchPathPlugin):
    """Puts sweeps/ on Hydra's config search path (registered in hydra_plugins.uapt_launcher)."""

    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        search_path.append(provider="uapt-sweeps", path=f"uapt-sweeps://{SWEEPS_DIR}")


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
    """Checks the checkout and clears stale outcomes when a multirun starts, and prints the
    one-line summary at its end."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_checkout(config)
        # every job's record keeps the sweep's command line (jobs in this process, or started
        # by it: local processes, SLURM); forgotten at the end, for a process that goes on
        self.handed_down = provenance.hand_down_argv()
        folder = outcomes_dir(config.hydra.sweep.dir)
        for stale in folder.glob("*.json"):
            stale.unlink()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if getattr(self, "handed_down", False):
            os.environ.pop(provenance.ARGV_ENV, None)
        folder = outcomes_dir(config.hydra.sweep.dir)
        outcomes = [_read_outcome(p) for p in sorted(folder.glob("*.json"))]
        print(summarize(outcomes), flush=True)
        if any(o["status"] == "failed" for o in outcomes):
            raise SystemExit(1)  # scripts and CI see that the sweep is not whole


def check_checkout(config: DictConfig) -> None:
    """A sweep from a dirty tree: refused under require_clean (exit 2, before any job or folder),
    else one warning line for the whole study (its experiment)."""
    setup_logging()  # the launching process: its jobs set it up for themselves
    study = bool(config.get("experiment"))
    try:
        provenance.check_launch(provenance.tree_state(), bool(config.get("require_clean")), study)
    except provenance.DirtyTree as e:
        if show_traceback():
            raise
        log.error("error: %s", e)
        raise SystemExit(2) from None


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
