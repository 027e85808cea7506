"""Running uapt's command-line tools the way a user does, in a subprocess."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

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


def records(runs_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(runs_dir).glob("*/run.json"))]


def metric_rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


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
