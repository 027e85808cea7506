"""Running uapt's command-line tools the way a user does, in a subprocess; waiting on what a
running process does, with a deadline."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
# Small enough to run in seconds on 2 cores, big enough to learn something.
TINY = [
    "model=tiny",
    "dataset=arith",
    "dataset.num_train=64",
    "dataset.val_size=16",
    "logger=none",
    "trainer.batch_size=4",
    "trainer.micro_batch_size=4",
    "trainer.lr=1e-3",  # a random-init model learns at a far higher rate than a pretrained one
]


def env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "COLUMNS": "400",  # rich wraps log lines at the console width: keep paths on one line
    }


def run_cli(
    module: str, *args: str, check: bool = False, timeout: int = 600, **popen
) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        **popen,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} exited {proc.returncode}:\n"
            f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def train(*args: str, **kw) -> subprocess.CompletedProcess:
    return run_cli("uapt.train", *args, **kw)


# ----------------------------------------------------------------------------- waiting
T = TypeVar("T")


def wait_until(
    check: Callable[[], T],
    timeout_s: float,
    what: str,
    every_s: float = 0.05,
    proc: subprocess.Popen | None = None,
) -> T:
    """check()'s first truthy value, asked every `every_s`. Fails naming `what` after `timeout_s`,
    or as soon as `proc` (when given) has exited: then nothing it does can make check() true."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"exited {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up after {timeout_s:.0f}s waiting for {what}")
        time.sleep(every_s)


@dataclass(frozen=True)
class Stopped:
    """How a signalled process ended: its exit status (-N: killed by signal N) and output."""

    returncode: int
    output: str


HELD_RUN = REPO / "tests" / "held_run.py"


def signal_at_row(
    command: list[str],
    row: int,
    sig: signal.Signals,
    *,
    run: str = "*",
    cwd: Path = REPO,
    env_vars: dict[str, str] | None = None,
    group: bool = False,
    timeout_s: float = 300,
) -> Stopped:
    """Launch `python <command>` (`-m uapt.train ARGS`, or a script and its arguments), held just
    before it appends metrics row `row` to the run folder matching the glob `run`
    (tests/held_run.py), send it `sig` there and wait for it to exit. `group`: the command runs
    in a session of its own and the signal goes to all of it. Each wait has a deadline; a
    process still running when this returns or fails is killed."""
    with tempfile.TemporaryDirectory(prefix="held-") as scratch:
        ready, log = Path(scratch) / "ready", Path(scratch) / "output"
        pattern = f"*/{run}/metrics.jsonl"
        argv = [sys.executable, str(HELD_RUN), pattern, str(row), str(ready), *command]
        with log.open("w") as out:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env_vars or env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=group,
            )
        send = (lambda s: os.killpg(proc.pid, s)) if group else proc.send_signal
        try:
            what = f"metrics row {row} of run {run} ({' '.join(command)})"
            try:
                wait_until(ready.exists, timeout_s, what, proc=proc)
            except AssertionError as e:
                raise AssertionError(f"{e}\n{log.read_text()[-3000:]}") from None
            send(sig)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                tail = log.read_text()[-3000:]
                name = signal.Signals(sig).name
                raise AssertionError(
                    f"still running {timeout_s:.0f}s after {name}:\n{tail}"
                ) from None
            return Stopped(proc.returncode, log.read_text())
        finally:
            if proc.poll() is None:
                send(signal.SIGKILL)
                proc.wait()


def records(runs_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(runs_dir).glob("*/run.json"))]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def strict_json(path: Path):
    """Parse as strict JSON: NaN, Infinity and -Infinity are errors."""

    def refuse(name: str):
        raise ValueError(f"{path}: bare {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def compose_run(*overrides: str) -> dict:
    """The plain config `uapt-train <overrides>` runs (Hydra compose, resolved)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def tiny_model_cfg() -> dict:
    """conf/model/tiny.yaml as Hydra composes it (merged over conf/model/base.yaml)."""
    return compose_run("model=tiny")["model"]


# ----------------------------------------------------------------------------- audit events
_listening: list[tuple[frozenset[str], list[tuple]]] = []
_hooked: list[bool] = []  # a hook cannot be removed: one for the session, idle when not listening


def _audit(event: str, args: tuple) -> None:
    for names, seen in _listening:
        if event in names:
            seen.append(args)


@contextmanager
def audit_events(*names: str) -> Iterator[list[tuple]]:
    """The arguments of the audit events `names` (e.g. "open": path, mode, flags) raised in this
    process while the block runs: what code did, counted without a clock or a mock."""
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked.append(True)
    entry: tuple[frozenset[str], list[tuple]] = (frozenset(names), [])
    _listening.append(entry)
    try:
        yield entry[1]
    finally:
        _listening.remove(entry)


# ----------------------------------------------------------------------------- AdamW tolerances
def adam_step_bound(betas: tuple[float, float], step: int) -> float:
    """The largest |m_hat / sqrt(v_hat)| AdamW can produce at `step` (1-based), any gradients.

    m_t = (1 - b1) sum_i b1^(t-i) g_i and v_t = (1 - b2) sum_i b2^(t-i) g_i^2, so by
    Cauchy-Schwarz |m_t| <= (1 - b1) sqrt(sum_j (b1^2 / b2)^j / (1 - b2)) sqrt(v_t); the bias
    corrections divide m by 1 - b1^t and v by 1 - b2^t.
    """
    b1, b2 = betas
    series = sum((b1 * b1 / b2) ** j for j in range(step))
    return (1 - b1) / (1 - b1**step) * math.sqrt((1 - b2**step) * series / (1 - b2))


def adam_weight_tolerance(lr: float, betas: tuple[float, float], steps: int) -> float:
    """The most one weight can differ between two AdamW runs whose gradients differ by rounding.

    Where a gradient is far above its rounding error, both runs make the same update. Where it
    is near zero, m / sqrt(v) is rounding noise and each run's update can land anywhere in
    [-lr B_t, lr B_t] (B_t: adam_step_bound): 2 lr B_t per step (lr: the peak learning rate;
    decoupled weight decay scales both runs' weights alike, a second-order difference).
    """
    return sum(2 * lr * adam_step_bound(betas, t) for t in range(1, steps + 1))


# Rounding moves only weights whose gradient is near zero, a small share of the update's norm;
# a gradient computed over other tokens, or applied to other weights, moves most of them.
UPDATE_REL = 1e-3


def assert_weights_close(got, want, initial, lr, betas, steps, label="") -> None:
    """Trained weights of two runs that differ only by rounding: every element within the AdamW
    bound, and the update (trained - initial) the same to UPDATE_REL in norm."""
    bound = adam_weight_tolerance(lr, betas, steps)
    assert got.keys() == want.keys(), label
    for name, ref in want.items():
        diff = got[name] - ref
        assert diff.abs().max().item() <= bound, (label, name, diff.abs().max().item(), bound)
        update = (ref - initial[name]).norm().item()
        assert diff.norm().item() <= UPDATE_REL * update, (label, name, diff.norm().item(), update)
