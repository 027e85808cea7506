"""Plan before you spend: what a run or sweep will do, why, and what it will cost, before anything
runs; and the check every launch makes first.

    uapt-train sweep=paper_grid hydra/launcher=slurm plan=on plan.device=h100
    uapt-train model=tiny trainer.max_steps=20 plan=on          # one run

Every multirun starts with PlanCheck (a Hydra callback, conf/train.yaml), whatever the sweeper and
launcher: it expands the grid exactly as the sweeper will (Hydra's BasicSweeper.split_arguments;
the study grid of uapt.tune's sweeper), composes every point and checks it as its job would
(`checked_run`, which uapt.train.execute runs too). A bad key or value anywhere in the grid stops
the launch with one line naming it and exit status 2, before any job starts or is submitted and
before Hydra writes the sweep folder. With `plan=on` it prints the plan instead and exits: per
point its state (what its run folder says) and action, the reason a point is new, and its cost
(uapt.costs); nothing is written under runs_dir, no job starts, no weights load. docs/plan.md.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from uapt import checkpoint, diff, files, inputs, pricing, records, run_lock, sweeps, tune
from uapt.config import validate
from uapt.console import setup_logging
from uapt.devices import rate
from uapt.errors import UserError
from uapt.pricing import Costing, PointCost
from uapt.schema import ConfigError
from uapt.sections import PlanConfig, RunConfig

log = logging.getLogger("uapt")


def checked_run(
    plain: Mapping[str, Any], before_inputs: Callable[[RunConfig], None] | None = None
) -> RunConfig:
    """A composed run config checked as its run checks it before anything is read or loaded;
    local inputs fingerprinted (their content is part of the run id). `before_inputs`: a run's
    own check of the checked config before the fingerprints are read and cached (require_clean)."""
    checked = validate(plain)
    tune.check_tuned(plain)
    if before_inputs is not None:
        before_inputs(checked)
    return RunConfig.parse(inputs.with_fingerprints(dict(plain)))


# ----------------------------------------------------------------------------- the grid
@dataclass
class Point:
    """One grid point, composed and checked."""

    overrides: list[str]
    run: RunConfig
    trials: int = 1  # runs it stands for: a tuning study's trials
    proposed: bool = False  # a tuning study: its trials' settings are proposed at run time

    @property
    def folder(self) -> Path:
        return records.run_dir(self.run.plain)

    @property
    def name(self) -> str:
        return self.folder.name


@contextlib.contextmanager
def job_hydra_config(cfg: DictConfig) -> Iterator[None]:
    """HydraConfig as a job of this point sees it (`${hydra:runtime.choices...}` resolve to the
    point's choices), restored afterwards."""
    from hydra.core.hydra_config import HydraConfig

    holder = HydraConfig.instance()
    saved = holder.cfg
    holder.set_config(cfg)
    try:
        yield
    finally:
        holder.cfg = saved


def compose_point(loader: Any, master: DictConfig, overrides: Sequence[str]) -> RunConfig:
    """The checked config a job of the sweep gets for these overrides (hydra.core.utils.run_job)."""
    try:
        cfg = loader.load_sweep_config(master, list(overrides))
    except Exception as e:  # Hydra's composition errors: an unknown option, a bad override
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{first} (grid point: {' '.join(overrides)})") from None
    with job_hydra_config(cfg):
        task = copy.deepcopy(cfg)
        with read_write(task), open_dict(task):
            del task["hydra"]
        return checked_run(OmegaConf.to_container(task, resolve=True))


def _parsed(loader: Any, lines: Sequence[str]) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create(config_loader=loader).parse_overrides(list(lines))


def basic_grid(loader: Any, master: DictConfig, arguments: Sequence[str]) -> list[list[str]]:
    """The overrides of every job, in launch order, as Hydra's BasicSweeper makes them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    params = master.hydra.sweeper.get("params") or {}
    lines = [f"{k}={v}" for k, v in params.items()] + list(arguments)
    overrides = _parsed(loader, lines)
    for o in overrides:
        if o.is_sweep_override() and o.is_discrete_sweep() and not list(o.sweep_string_iterator()):
            raise ConfigError(f"{o.input_line}: sweeps over no value, so the grid has no point")
    batches = BasicSweeper.split_arguments(overrides, None)
    return [list(job) for batch in batches for job in batch]


def study_grid(loader: Any, master: DictConfig, arguments: Sequence[str]) -> list[list[str]]:
    """uapt.tune's sweeper: per study of `hydra.sweeper.grid`, the overrides of its trials with
    each searched key at each end of its range (or each of its choices), one at a time."""
    sweeper = master.hydra.sweeper
    params = {str(k): str(v) for k, v in (sweeper.get("params") or {}).items()}
    searched = tune.searched_keys(params)
    fixed = [f"{k}={v}" for k, v in params.items() if k not in searched]
    candidates = {k: _candidates(_parsed(loader, [f"{k}={params[k]}"])[0]) for k in searched}
    first = [f"{k}={v[0]}" for k, v in candidates.items()]
    jobs = []
    for point in tune.points({k: list(v) for k, v in (sweeper.get("grid") or {}).items()}):
        base = [*fixed, *arguments, *(f"{k}={v}" for k, v in point.items())]
        jobs.append([*base, *first])
        for k, values in candidates.items():
            others = [o for o in first if not o.startswith(f"{k}=")]
            jobs += [[*base, *others, f"{k}={v}"] for v in values[1:]]
    return jobs


def _candidates(override: Any) -> list[Any]:
    """Values a searched key can take that are worth composing: the ends of an interval, or
    every value of a discrete sweep."""
    from hydra.core.override_parser.types import IntervalSweep

    value = override.value()
    if isinstance(value, IntervalSweep):
        return [value.start, value.end]
    return list(override.sweep_string_iterator())


def is_study(master: DictConfig) -> bool:
    return str(master.hydra.sweeper.get("_target_", "")).endswith("StudiesSweeper")


def grid_points(master: DictConfig) -> list[Point]:
    """Every point of the multirun `master` configures, composed and checked (ConfigError
    naming the first bad key, or the override that leaves the grid empty)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    arguments = OmegaConf.to_container(master.hydra.overrides.task, resolve=False)
    study = is_study(master)
    jobs = (study_grid if study else basic_grid)(loader, master, arguments)
    if not jobs:
        raise ConfigError("the sweep has no grid point (an empty hydra.sweeper.grid?)")
    points = [Point(job, compose_point(loader, master, job)) for job in jobs]
    if not study:
        return points
    studies = points[:: len(jobs) // len(tune.points(dict(master.hydra.sweeper.grid)))]
    for p in studies:  # one line per study, at the first of its checked settings
        p.trials, p.proposed = int(master.hydra.sweeper.get("n_trials") or 1), True
    return studies


# ----------------------------------------------------------------------------- states
@dataclass(frozen=True)
class State:
    """What a point's run folder says, and what its launch will do."""

    state: str  # completed | held | partial | failed | damaged | new
    action: str  # skip | resume | rerun | train
    step: int = 0  # the step training starts from
    detail: str = ""

    def text(self) -> str:
        if self.state == "proposed":
            return f"{self.detail} → proposed at run time"
        what = f"{self.state} → {self.action}"
        if self.action == "resume" or (self.action == "rerun" and self.step):
            what += f" from step {self.step}"
        return f"{what} ({self.detail})" if self.detail else what


def latest_step(folder: Path) -> int:
    """The step of the newest checkpoint whose files match its manifest (uapt.checkpoint)."""
    found = checkpoint.latest(folder / "checkpoints")
    return int(found.name.split("-")[1]) if found else 0


def point_state(folder: Path, force: bool) -> State:
    """What uapt.run_folder.claim and uapt.loop.resume will do with this folder, read only."""
    holder = run_lock.live_holder(folder)
    if holder is not None:
        return State("held", "skip", detail=f"by {run_lock.describe(holder)}")
    try:
        record = records.read_record(folder)
    except files.DamagedFile as e:
        step = 0 if force else latest_step(folder)
        why = f"{e.why}; the launch sets it aside"
        return State("damaged", "resume" if step else "rerun", step, why)
    status = (record or {}).get("status")
    if status == "completed":
        return State("completed", "rerun", detail="force=true") if force else State(status, "skip")
    step = 0 if force else latest_step(folder)
    if status == "failed":
        return State("failed", "rerun", step, str(record.get("error") or "")[:120])
    if record is not None or step:  # started, then killed or interrupted
        return State(
            "partial", "resume" if step else "rerun", step, "" if step else "no checkpoint"
        )
    return State("new", "train")


# ----------------------------------------------------------------------------- why new
WHY_KEYS = 4  # differing keys a plan line names; uapt-diff names every one


def varying_keys(points: Sequence[Point]) -> set[str]:
    """Semantic keys (dotted) whose values differ across the grid's points (or that some lack)."""
    flat = [diff.flatten(records.semantic_config(p.run.plain)) for p in points]
    keys = set().union(*flat) if flat else set()
    return {k for k in keys if len({pricing.identity(f.get(k, "(absent)")) for f in flat}) > 1}


def why_new(point: Point, known: Sequence[records.Run], grid_keys: set[str]) -> str | None:
    """The nearest existing record: one with the point's slug, else one whose semantic config
    equals the point's apart from the keys the grid varies; the semantic keys that differ."""
    mine = point.run.plain
    same_slug = [r for r in known if r.data.get("slug") == records.run_slug(mine)]
    pool = same_slug or [r for r in known if _same_apart_from(r, mine, grid_keys)]
    if not pool:
        return None
    found = [(diff.semantic_changes(r.data["config"], mine), r) for r in pool]
    found.sort(key=lambda c: (len(c[0]), not c[1].completed, str(c[1].data.get("started_at"))))
    changed, nearest = found[0]
    text = "; ".join(diff.show(c) for c in changed[:WHY_KEYS])
    if len(changed) > WHY_KEYS:
        text += f"; and {len(changed) - WHY_KEYS} more (uapt-diff shows them all)"
    text = text or "the same semantic config under an older id"
    return f"{text} (vs {nearest.folder.name}, {nearest.status})"


def _same_apart_from(run: records.Run, plain: Mapping[str, Any], keys: set[str]) -> bool:
    config = run.data.get("config")
    if not isinstance(config, Mapping):
        return False
    with contextlib.suppress(KeyError, TypeError, AttributeError):
        return all(k in keys for k, _, _ in diff.semantic_changes(config, plain))
    return False


def known_runs(runs_dir: Path) -> list[records.Run]:
    if not runs_dir.is_dir():
        return []
    found, _ = records.load_runs([runs_dir])
    return [r for r in found if isinstance(r.data.get("config"), Mapping)]


# ----------------------------------------------------------------------------- the plan
@dataclass
class Line:
    point: Point
    state: State
    cost: PointCost | None
    why: str | None = None


def plan_lines(points: Sequence[Point], config: PlanConfig, what: str) -> list[str]:
    """The plan as printed: a line per grid point, the totals, the device, the estimates."""
    costing = Costing(config)
    grid_keys = varying_keys(points)
    runs: dict[Path, list[records.Run]] = {}
    lines: list[Line] = []
    with pricing.quiet_data_logs():
        for p in points:
            if p.proposed:
                state = State("proposed", "train", detail=f"tuning study, {p.trials} trials")
            else:
                state = point_state(p.folder, p.run.force)
            cost = costing.point(p.run, state.step) if state.action != "skip" else None
            why = None
            if state.state == "new":
                where = Path(p.run.runs_dir).expanduser()
                known = runs.setdefault(where, known_runs(where))
                why = why_new(p, known, grid_keys)
            lines.append(Line(p, state, cost, why))
    width = max(len(line.point.name) for line in lines)
    out = [f"plan of {what}: {len(points)} grid point(s), nothing runs (plan=on)"]
    out += [f"  {line.point.name:<{width}}  {_point_text(line)}" for line in lines]
    out += _totals(lines, costing)
    return out


def _point_text(line: Line) -> str:
    text = line.state.text()
    cost, trials = line.cost, line.point.trials
    if cost is not None:
        per = f"{trials} x " if line.point.proposed else ""
        text += (
            f"; {per}{cost.train.steps} steps, {_count(cost.train.tokens)} tokens, "
            f"{_flops(cost.train.total + cost.eval_flops)} FLOP, {_duration(cost.seconds)}"
        )
    elif line.state.action != "skip":
        text += "; cost unknown (below)"
    if line.why:
        text += f"; why new: {line.why}"
    return text


def _totals(lines: Sequence[Line], costing: Costing) -> list[str]:
    counts: dict[str, int] = {}
    for line in lines:
        key = "held (skip)" if line.state.state == "held" else line.state.action
        key = "proposed" if line.state.state == "proposed" else key
        counts[key] = counts.get(key, 0) + line.point.trials
    sums = costing.totals([(ln.point.run, ln.cost, ln.point.trials) for ln in lines if ln.cost])
    what = ", ".join(f"{n} {k}" for k, n in counts.items())
    unit = "CPU-hours" if _kind(costing, lines) == "cpu" else "GPU-hours"
    runs = sums.flops["train"] + sums.flops["eval"]
    out = [
        f"total: {what}; to run: {sums.steps} steps, {_count(sums.tokens)} training tokens; "
        f"FLOP: runs {_flops(runs)}, teacher cache fill {_flops(sums.flops['fill'])} "
        f"({sums.fill_rows} rows, once), base-model evaluation {_flops(sums.flops['base'])} "
        f"({sums.base_evals} model x suite, once); {sum(sums.hours.values()):.3g} {unit}"
    ]
    out += _eval_lines(costing, lines)
    out += _device_lines(costing, lines)
    out += [f"estimate: {', '.join(what)}: {rule}" for rule, what in costing.estimates.items()]
    out += [f"not priced: {what}" for what in costing.unknown]
    return out


def _eval_lines(costing: Costing, lines: Sequence[Line]) -> list[str]:
    """Per eval suite, each task's tokens: samples x requests x (prompt + new)."""
    suites: dict[str, RunConfig] = {}
    for line in lines:
        if line.cost is not None and line.point.run.eval.task_specs:
            suites.setdefault(line.point.run.eval.name, line.point.run)
    out = []
    for name, run in suites.items():
        tasks = "; ".join(
            f"{t.name} {t.samples} x {t.requests} x ({t.prompt:.0f} prompt + {t.new:.0f} "
            f"{'generated' if t.kind == 'generate_until' else 'scored'})"
            for t in costing.tasks(run)
        )
        out.append(f"eval={name}, tokens per evaluation (samples x requests x tokens): {tasks}")
    return out


def _kind(costing: Costing, lines: Sequence[Line]) -> str:
    return costing.rate(lines[0].point.run).kind if lines else "cpu"


def _device_lines(costing: Costing, lines: Sequence[Line]) -> list[str]:
    out = []
    for precision in sorted({ln.point.run.trainer.precision for ln in lines}):
        r = rate(costing.plan, precision)
        out.append(
            f"time on {r.kind} ({r.device.label}), {precision}: peak {r.peak_tflops:g} TFLOP/s "
            f"({r.peak_source}), MFU {r.mfu:g} ({r.mfu_source}); generation counts "
            "max_gen_toks tokens per sample (an upper bound) at the same MFU"
        )
    return out


def _count(n: float) -> str:
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def _flops(x: float) -> str:
    return f"{x:.3g}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


# ----------------------------------------------------------------------------- entry points
PLAN_WORDS = {"true": "on", "yes": "on", "false": "off", "no": "off"}


def normalized_argv(argv: Sequence[str]) -> list[str]:
    """`plan=true` / `+plan=true` as `plan=on` (`false`: `off`): a config group's option must be a
    name, and Hydra reads true as a bool, which would stop it with a traceback."""
    out = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        if eq and key.lstrip("+") == "plan" and value.lower() in PLAN_WORDS:
            arg = f"plan={PLAN_WORDS[value.lower()]}"
        out.append(arg)
    return out


def plan_section(node: Any) -> PlanConfig:
    if isinstance(node, DictConfig):
        node = OmegaConf.to_container(node, resolve=True)
    return PlanConfig.parse(node if node is not None else {"enabled": False})


def describe(master: DictConfig) -> str:
    experiment = master.get("experiment")
    return f"sweep {experiment}" if experiment else "the multirun"


class PlanCheck(Callback):
    """Before any job of a multirun: every grid point composed and checked (one line and exit 2
    on a bad one); with plan=on, the plan printed and the process ends (exit 0)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from uapt.errors import show_traceback

        setup_logging()
        sweeps.check_checkout(config)  # require_clean: a dirty tree refused before anything is read
        try:
            wanted = plan_section(config.get("plan"))
            points = grid_points(config)
            lines = plan_lines(points, wanted, describe(config)) if wanted.enabled else None
        except UserError as e:
            if show_traceback():
                raise
            log.error("%s: %s", "bad configuration" if isinstance(e, ConfigError) else "error", e)
            raise SystemExit(2) from None
        if lines is not None:
            print("\n".join(lines), flush=True)
            raise SystemExit(0)
        log.info("%d grid point(s) checked: launching", len(points))


def plan_run(plain: Mapping[str, Any], overrides: Sequence[str]) -> list[str]:
    """The plan of one run (uapt-train without a sweep, plan=on)."""
    point = Point(list(overrides), checked_run(plain))
    return plan_lines([point], plan_section(plain.get("plan")), "one run")
