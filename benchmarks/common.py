"""Shared helpers of the benchmarks: environment, config composition, interleaved timing,
statistics, machine information, tables and JSON output.

Every benchmark measures a ratio side by side in one process (or one run of subprocesses):
repetitions of A and B are interleaved (A, B, A, B, ...) after warm-up, so slow drifts of a
shared machine hit both sides alike. Ratios are taken per round (paired) and summarised by
their median and range, next to the medians of the raw times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def setup_env() -> None:
    """Offline everywhere, and the tests' model/data cache (converted SmolLM2, tokenised data)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    os.environ.setdefault("UAPT_CACHE", str(REPO / ".cache" / "uapt"))


def subprocess_env() -> dict[str, str]:
    setup_env()
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


# ----------------------------------------------------------------------------- configs
def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The resolved run config of `uapt-train <overrides>` (Hydra compose, as the tests do)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from omegaconf import OmegaConf

    setup_env()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def uapt_trainer(cfg: Mapping[str, Any], *, parallel: bool = False) -> tuple[Any, Any]:
    """uapt's own Trainer for one composed config and the pieces it was built from, made by
    uapt.train as a run makes them: the initial weights seeded by the run seed, so every variant
    starts equal. `parallel`: also uapt.train.parallelize (which applies trainer.compile)."""
    from uapt import distributed
    from uapt.config import validate
    from uapt.train import (
        build,
        data_stream,
        make_trainer,
        parallelize,
        pick_device,
        seed_everything,
    )

    run = validate(cfg)
    world = distributed.World()
    device = pick_device(run.trainer.device, world)
    seed_everything(run.seed, run.trainer.deterministic)
    parts = build(run, device, world)
    stream = data_stream(run, parts, world)
    if parallel:
        parallelize(run, parts, device, world)
    return make_trainer(run, parts, stream, device, world), parts


def option_available(overrides: Sequence[str]) -> tuple[bool, str]:
    """Whether these overrides compose and validate: (True, "") or (False, why not)."""
    from uapt.config import validate

    try:
        validate(compose(overrides))
    except Exception as e:  # Hydra's ConfigCompositionException, uapt's ConfigError, ...
        return False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return True, ""


# ----------------------------------------------------------------------------- timing
def interleave(
    runners: Mapping[str, Callable[[], Any]], rounds: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call: `warmup` untimed calls of every runner, then `rounds` rounds that
    call every runner once, in the given order (A, B, A, B, ...)."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            started = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - started)
    return times


@dataclass(frozen=True)
class Spread:
    """Median and range of a sample (a robust summary on a noisy, shared machine)."""

    median: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        values = list(values)
        if not values:
            raise ValueError("Spread.of: no values")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def as_dict(self) -> dict[str, float]:
        return {"median": self.median, "min": self.min, "max": self.max, "n": self.n}

    def rel_spread(self) -> float:
        """(max - min) / median: how noisy the sample was."""
        return (self.max - self.min) / self.median if self.median else float("nan")


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Per-round ratios numerator[i] / denominator[i] (rounds ran side by side)."""
    if len(numerator) != len(denominator):
        raise ValueError(f"paired_ratios: {len(numerator)} vs {len(denominator)} values")
    return [a / b for a, b in zip(numerator, denominator, strict=True)]


def ratio_summary(
    numerator: Sequence[float],
    denominator: Sequence[float],
    target: float | None,
    higher_is_better: bool,
) -> dict[str, Any]:
    """The paired ratio's median, range and whether its median meets the target (None: no
    target, a figure to report)."""
    spread = Spread.of(paired_ratios(numerator, denominator))
    met = None
    if target is not None:
        met = spread.median >= target if higher_is_better else spread.median <= target
    return {
        **spread.as_dict(),
        "target": target,
        "target_rule": ">=" if higher_is_better else "<=",
        "met": met,
    }


# ----------------------------------------------------------------------------- machine
def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _version(package: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def machine_info(device: str = "cpu") -> dict[str, Any]:
    """What the figures were measured on; the load average says how contended the machine was."""
    import torch

    info: dict[str, Any] = {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "load_average": load_average(),
        "versions": {
            pkg: _version(pkg) for pkg in ("torch", "transformers", "lm_eval", "hydra-core", "uapt")
        },
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def default_device() -> str:
    """What `trainer.device=auto` picks."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def contention_note(before: list[float] | None, after: list[float] | None) -> str:
    """A one-line note when the 1-minute load average exceeded the core count."""
    cores = os.cpu_count() or 1
    peak = max((b[0] for b in (before, after) if b), default=0.0)
    if peak > cores:
        return (
            f"contended: 1-min load average up to {peak:.1f} on {cores} cores "
            "(other work shared the CPUs; medians and ranges are reported)"
        )
    return ""


# ----------------------------------------------------------------------------- output
def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test in seconds")
    p.add_argument("--json", type=Path, default=None, help="write raw figures to this file")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds (default per mode)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch/OpenMP threads, here and in subprocesses (default 1: see set_threads)",
    )
    return p


def set_threads(n: int) -> None:
    """Pin torch's intra-op threads here and OMP/MKL threads of the subprocesses we start.

    One thread by default: on a CPU shared with other work, two OpenMP threads spin-wait on
    each other whenever one is descheduled, and a tiny model's step was measured 10-70x slower
    with 2 threads than with 1 on 2 busy cores. Both sides of every ratio use the same setting.
    """
    import torch

    if n < 1:
        raise ValueError(f"--threads={n}: must be >= 1")
    torch.set_num_threads(n)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(n)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table (also valid Markdown)."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in cells
    ]
    return "\n".join([line, rule, *body])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    if isinstance(value, bool):
        return "met" if value else "NOT met"
    return "" if value is None else str(value)


def fmt_spread(s: Mapping[str, Any], digits: int = 3) -> str:
    return f"{s['median']:.{digits}g} [{s['min']:.{digits}g}-{s['max']:.{digits}g}]"


def write_json(path: Path | None, payload: Mapping[str, Any]) -> None:
    """The benchmark's figures, publishable: no path of this machine (`publishable`)."""
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(publishable(payload), indent=2, default=str) + "\n")
    tmp.replace(path)


# ----------------------------------------------------------------------------- published paths
def machine_paths(repo: Path = REPO, prefix: str = sys.prefix) -> list[tuple[str, str]]:
    """(a folder of the machine that ran a benchmark, how published figures write it), the most
    specific first: its environment's executables by name (`python`, `uapt-train`), paths in
    the checkout relative to it, beside it as `../` (`../shared/data`), the home folder as `~`."""
    out = [(f"{Path(prefix) / 'bin'}/", ""), (f"{repo}/", ""), (str(repo), ".")]
    if repo.parent != Path(repo.anchor):
        out.append((f"{repo.parent}/", "../"))
    return [*out, (str(Path.home()), "~")]


def publishable(value: Any, paths: Sequence[tuple[str, str]] | None = None) -> Any:
    """`value` (JSON: strings, lists, mappings) with the paths of this machine (`machine_paths`)
    rewritten and its temporary folders as `<tmp>`: figures name nothing a reader cannot follow."""
    if isinstance(value, Mapping):
        return {k: publishable(v, paths) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [publishable(v, paths) for v in value]
    if not isinstance(value, str):
        return value
    text = value  # the checkout's own paths first: a checkout may itself sit in a temp folder
    for folder, written in machine_paths() if paths is None else paths:
        end = "" if folder.endswith("/") else r"(?![\w.-])"
        text = re.sub(_START + re.escape(folder) + end, written, text)
    return _TEMP.sub("<tmp>", text)


_START = r"(?<![\w.~/-])"  # a path starts here, not inside a longer name
_TEMP = re.compile(_START + re.escape(tempfile.gettempdir()) + r"/[^/\s,;:'\"=]+")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
