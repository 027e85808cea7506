"""Running uapt's command-line tools the way a user does, in a subprocess."""

from __future__ import annotations

import json
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


def tiny_model_cfg() -> dict:
    """conf/model/tiny.yaml as Hydra composes it (merged over conf/model/base.yaml)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["model=tiny"])
    return OmegaConf.to_container(cfg.model, resolve=True)
