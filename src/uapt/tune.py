"""Tuning: one Optuna study per objective, every trial an ordinary run, the best settings written
as an override file the final grid composes.

    uapt-train sweep=lr_search                      # tune: a study per variant (sweeps/)
    uapt-train sweep=cpu_repro tuned=lr_search      # the grid, each variant at its best lr
    uapt-table experiments/cpu_repro.yaml           # the table

`hydra/sweeper=uapt_optuna` is hydra-optuna-sweeper's Optuna sweeper (TPE with a seed, a fixed
trial budget) run once per point of `hydra.sweeper.grid` (e.g. every objective variant), each
point its own study. A trial is a run like any other: it has its id and record, and a re-launched
search skips the trials that completed (a seeded sampler proposes the same settings again, the
records answer). Each trial reports `hydra.sweeper.metric`, a key of its record's `metrics`
(`val/loss`: the loss on rows held out from the training data), never an eval-suite score: the
search must not select on data the final table reports. At the end the best setting of every
point is printed and written to `sweeps/tuned/<experiment>.yaml` (or `hydra.sweeper.tuned_file`):
per point the searched values, and the interpolation that picks them for the point a run is
(`${hydra:runtime.choices.<group>}`), so `tuned=<experiment>` composes with the grid.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any

from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

from uapt import files, records
from uapt.paths import CONF_DIR, SWEEPS_DIR
from uapt.schema import ConfigError
from uapt.sweeps import GROUPS

log = logging.getLogger("uapt")


def trial_metric() -> str | None:
    """The metric a tuning sweep asks its trials for (None outside a tuning sweep)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    sweeper = HydraConfig.get().sweeper
    return sweeper.get("metric") if "metric" in sweeper else None


def check_metric(metric: str) -> None:
    if not isinstance(metric, str) or not metric or metric.startswith(("eval", "eval_")):
        raise ConfigError(
            f"hydra.sweeper.metric={metric!r}: tune on a key of the run record's metrics "
            "(e.g. val/loss, computed on rows held out from the training data), never on an "
            "eval-suite score: that would select on the data the final table reports"
        )


def trial_value(outcome: Mapping[str, Any], metric: str) -> float:
    """A trial's value for the study: the metric from its run record (NaN: a failed trial)."""
    folder = outcome.get("dir")
    if outcome.get("status") == "failed" or not folder:
        return math.nan
    try:
        record = records.read_record(Path(folder)) or {}
    except files.DamagedFile:
        return math.nan
    value = (record.get("metrics") or {}).get(metric)
    return float(value) if isinstance(value, int | float) else math.nan


def check_tuned(cfg: Mapping[str, Any]) -> None:
    """A run composed with tuned=<study> must run at the tuned values: a command-line value for a
    tuned key would silently win over the file (Hydra applies the command line last)."""
    from hydra.core.hydra_config import HydraConfig

    tuned = cfg.get("tuned")
    if not tuned or not HydraConfig.initialized():
        return
    choices = HydraConfig.get().runtime.choices
    for key, node in _leaves(tuned.get("values") or {}):
        expected = node
        for group in _grid_groups(tuned):
            expected = expected.get(choices.get(group), {}) if isinstance(expected, Mapping) else {}
        section, _, leaf = key.rpartition(".")
        actual = (cfg.get(section) or {}).get(leaf) if section else cfg.get(leaf)
        if isinstance(expected, int | float) and actual != expected:
            raise ConfigError(
                f"{key}={actual!r} overrides the tuned value {expected!r} of tuned="
                f"{tuned.get('study')}: drop it from the command line or the tuned=... override"
            )


def _leaves(values: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, {point: value}) for each tuned key of a `tuned.values` tree."""
    out = []
    for k, v in values.items():
        if isinstance(v, Mapping) and all(isinstance(x, Mapping) for x in v.values()):
            out += _leaves(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def _grid_groups(tuned: Mapping[str, Any]) -> list[str]:
    return list(tuned.get("grid") or [])


@dataclass
class Trial:
    overrides: tuple[str, ...]
    value: float


@dataclass
class Study:
    point: dict[str, str]
    trials: list[Trial] = field(default_factory=list)

    def best(self) -> Trial | None:
        done = [t for t in self.trials if math.isfinite(t.value)]
        return min(done, key=lambda t: t.value) if done else None


def searched_keys(params: Mapping[str, Any]) -> list[str]:
    """The keys the study searches (params given as a sweep: interval, range, choice, tag)."""
    return [str(k) for k, v in params.items() if isinstance(v, str) and "(" in v]


def best_settings(study: Study, keys: Sequence[str]) -> dict[str, Any]:
    best = study.best()
    if best is None:
        return {}
    chosen = dict(o.split("=", 1) for o in best.overrides if "=" in o)
    return {k: _number(chosen[k]) for k in keys if k in chosen}


def _number(text: str) -> Any:
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def _nest(root: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for part in path[:-1]:
        root = root.setdefault(part, {})
    root[path[-1]] = value


def tuned_document(
    experiment: str,
    metric: str,
    grid: Mapping[str, Sequence[str]],
    keys: Sequence[str],
    studies: Sequence[Study],
    sampler: str,
) -> str:
    """The override file: per grid point the best values (`tuned.values.<key>.<point>`), the
    evidence (`tuned.best`), and each tuned key set to the value of the point a run is."""
    import yaml

    values: dict[str, Any] = {}
    evidence: dict[str, Any] = {}
    for study in studies:
        best, chosen = study.best(), best_settings(study, keys)
        where = list(study.point.values())
        for key, value in chosen.items():
            _nest(values, [*key.split("."), *where], value)
        evidence["/".join(where)] = {
            **chosen,
            metric: None if best is None else round(best.value, 6),
            "trials": len(study.trials),
        }
    body: dict[str, Any] = {
        "tuned": {
            "study": experiment,
            "metric": metric,
            "sampler": sampler,
            "grid": list(grid),
            "best": evidence,
            "values": values,
        }
    }
    choice = ".".join(f"${{hydra:runtime.choices.{g}}}" for g in grid)
    for key in keys:
        _nest(body, key.split("."), f"${{tuned.values.{key}.{choice}}}")
    header = (
        "# @package _global_\n"
        f"# Written by the tuning sweep of experiment {experiment!r} (uapt.tune): the best\n"
        f"# {', '.join(keys)} per {'/'.join(grid)} by {metric} ({sampler}).\n"
        f"# Compose it with a grid over the same {'/'.join(grid)}: tuned={experiment}\n"
    )
    return header + yaml.safe_dump(body, sort_keys=False, width=100)


def points(grid: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    keys = list(grid)
    return [dict(zip(keys, map(str, combo), strict=True)) for combo in product(*grid.values())]


def check_grid(grid: Mapping[str, Any]) -> None:
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()} | set(GROUPS)
    for key, values in grid.items():
        if key not in groups:
            raise ConfigError(
                f"hydra.sweeper.grid.{key}: one study per option of a config group "
                f"({', '.join(sorted(groups))}); {key!r} is not one"
            )
        if not values:
            raise ConfigError(f"hydra.sweeper.grid.{key} lists no options")


class _Recording:
    """A launcher that remembers what each launched job returned (the study's values)."""

    def __init__(self, launcher: Any):
        self.launcher, self.calls = launcher, []

    def launch(self, job_overrides, initial_job_idx):
        returns = self.launcher.launch(job_overrides, initial_job_idx=initial_job_idx)
        for overrides, ret in zip(job_overrides, returns, strict=True):
            try:
                value = float(ret.return_value)
            except (TypeError, ValueError):
                value = math.nan
            self.calls.append(Trial(tuple(overrides), value))
        return returns


def run_studies(
    sweeper: Any, arguments: list[str], grid: Mapping[str, Sequence[str]]
) -> list[Study]:
    """Run the Optuna sweep once per grid point, each time with a fresh copy of the sampler."""
    impl = sweeper.sweeper  # hydra-optuna-sweeper's OptunaSweeperImpl
    recording = _Recording(impl.launcher)
    impl.launcher = recording
    sampler, name = impl.sampler, impl.study_name or "study"
    studies = []
    for point in points(grid):
        fixed = [f"{k}={v}" for k, v in point.items()]
        impl.sampler = copy.deepcopy(sampler)  # every study starts from the seeded state
        impl.study_name = f"{name}-{'-'.join(point.values())}"
        impl.search_space = None
        before = len(recording.calls)
        log.info("study %s: %d trials", impl.study_name, impl.n_trials)
        impl.sweep([*arguments, *fixed])
        studies.append(Study(point, recording.calls[before:]))
    return studies


def report(studies: Sequence[Study], keys: Sequence[str], metric: str) -> str:
    lines = [f"best {', '.join(keys)} per study ({metric}):"]
    for s in studies:
        best = s.best()
        where = "/".join(s.point.values())
        if best is None:
            lines.append(f"  {where}: no trial completed")
            continue
        chosen = ", ".join(f"{k}={v}" for k, v in best_settings(s, keys).items())
        lines.append(f"  {where}: {chosen}  ({metric} {best.value:.4f}, {len(s.trials)} trials)")
    return "\n".join(lines)


def write_tuned(path: Path, text: str) -> None:
    files.write_text(path, text)
    log.info("wrote %s", path)


# ----------------------------------------------------------------------------- the sweeper


class StudiesSweeper(OptunaSweeper):
    """hydra-optuna-sweeper's sweeper, once per point of `grid`, writing the best settings.

    metric: the record metric each trial reports (val/loss); grid: {config group: [options]},
    one study per combination; tuned_file: where the override file goes (default
    sweeps/tuned/<experiment>.yaml); every other key is the Optuna sweeper's own.
    """

    def __init__(
        self,
        metric: str,
        grid: Mapping[str, Sequence[str]],
        tuned_file: str | None = None,
        **optuna: Any,
    ) -> None:
        check_metric(metric)
        grid = {str(k): [str(v) for v in vs] for k, vs in (grid or {}).items()}
        check_grid(grid)
        super().__init__(**optuna)
        self.metric, self.grid, self.tuned_file = metric, grid, tuned_file
        self.params = dict(optuna.get("params") or {})

    def setup(self, *, hydra_context: Any, task_function: Any, config: Any) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.config = config

    def sweep(self, arguments: list[str]) -> None:
        keys = searched_keys(self.params)
        if not keys:
            raise ConfigError(
                "hydra.sweeper.params: nothing to search (e.g. trainer.lr: tag(log, interval(1e-5, 1e-3)))"
            )
        fixed = sorted({a.split("=", 1)[0].lstrip("+~") for a in arguments} & set(keys))
        if fixed:
            raise ConfigError(
                f"{', '.join(fixed)} is searched (hydra.sweeper.params) and also set on the "
                "command line, which would fix it for every trial: drop one of the two"
            )
        grid_given = sorted({a.split("=", 1)[0] for a in arguments} & set(self.grid))
        if grid_given:
            raise ConfigError(
                f"{', '.join(grid_given)} is the study grid (hydra.sweeper.grid): set the grid "
                "there, not on the command line"
            )
        studies = run_studies(self, arguments, self.grid)
        print(report(studies, keys, self.metric), flush=True)
        experiment = str(self.config.get("experiment") or "study")
        path = (
            Path(self.tuned_file)
            if self.tuned_file
            else SWEEPS_DIR / "tuned" / f"{experiment}.yaml"
        )
        sampler = type(self.sweeper.sampler).__name__
        seed = getattr(self.config.hydra.sweeper.sampler, "seed", None)
        sampler += f" seed {seed}" if seed is not None else ""  # GridSampler: no seed
        sampler += f", {self.sweeper.n_trials} trials per study"
        write_tuned(
            path, tuned_document(experiment, self.metric, self.grid, keys, studies, sampler)
        )
