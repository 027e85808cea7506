"""User acceptance scenarios: the README's commands, run as a user would.

Quick scenarios (`pytest uat -m "not full"`) call the repository's `.venv/bin` tools on the tiny
model. Full ones (`-m full`) clone the repository and run `make setup` / `make demo` from scratch.
Runs that several scenarios look at (one training run, one interrupted sweep) are made once.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from uatlib import Seen, as_typed, quick_cache, readme_command, sh, user_env, venv_bin


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "full: slow user scenarios from a clean clone (make setup, make demo)"
    )


@pytest.fixture(scope="session")
def bin_dir() -> Path:
    return venv_bin()


@pytest.fixture(scope="session")
def env() -> dict[str, str]:
    return user_env(quick_cache())


# --------------------------------------------------------------------------- scenario 3 (and 7)
@dataclass
class OneRun:
    home: Path  # where the user typed the command (./runs is here)
    command: list[str]
    first: Seen


@pytest.fixture(scope="session")
def one_run(tmp_path_factory, bin_dir, env) -> OneRun:
    """The README's first "One run" command, exactly as printed, in a fresh folder."""
    home = tmp_path_factory.mktemp("one_run")
    command = as_typed(readme_command(".venv/bin/uapt-train model=tiny"), bin_dir)
    return OneRun(home, command, sh(command, home, env, timeout=600))


# --------------------------------------------------------------------------- scenarios 4 and 5
# The multirun form `uapt-train --help` prints (`-m objective=mle,masked_mle seed=0,1
# experiment=mine`) on the tiny model, shrunk to seconds per run, with checkpoints to resume from.
SWEEP_EXPERIMENT = "uat_resume"
SWEEP = [
    "-m",
    "model=tiny",
    "objective=mle,masked_mle",
    "seed=0,1",
    f"experiment={SWEEP_EXPERIMENT}",
    "dataset.num_train=64",
    "dataset.val_size=16",
    "trainer.max_steps=6",
    "trainer.batch_size=4",
    "trainer.micro_batch_size=4",
    "trainer.lr=1e-3",
    "trainer.checkpoint_every=2",
    "logger=none",
]
# Hydra's basic sweeper runs the product in override order: the third job is masked_mle, seed 0.
KILLED_SLUG = "tiny-arith-masked_mle-r0.5-l0-s0"


@dataclass
class ResumedSweep:
    home: Path
    command: list[str]
    killed_slug: str  # the run the kill interrupted
    killed: Seen  # the first launch, SIGKILLed during its third run
    killed_record: dict  # the third run's run.json just after the kill
    rerun: Seen  # the same command again


def _checkpointed(runs: Path, slug: str) -> bool:
    return any(runs.glob(f"{slug}-*/checkpoints/step-*/manifest.json"))


def _launch_and_kill(command: list[str], home: Path, env: dict[str, str]) -> Seen:
    """Start the sweep, SIGKILL it (and its children) once the third run has a checkpoint."""
    out, err = home / "killed.out", home / "killed.err"
    with out.open("w") as fo, err.open("w") as fe:
        proc = subprocess.Popen(
            command, cwd=home, env=env, stdout=fo, stderr=fe, start_new_session=True
        )
        deadline = time.monotonic() + 600
        while proc.poll() is None and time.monotonic() < deadline:
            if _checkpointed(home / "runs", KILLED_SLUG):
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        else:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
    seen = Seen(command, rc, out.read_text(), err.read_text())
    if rc != -signal.SIGKILL:
        raise AssertionError(f"the sweep was meant to be killed in its third run:\n{seen}")
    return seen


@pytest.fixture(scope="session")
def resumed_sweep(tmp_path_factory, bin_dir, env) -> ResumedSweep:
    home = tmp_path_factory.mktemp("sweep")
    command = [str(bin_dir / "uapt-train"), *SWEEP]
    killed = _launch_and_kill(command, home, env)
    (record_file,) = (home / "runs").glob(f"{KILLED_SLUG}-*/run.json")
    record = json.loads(record_file.read_text())
    rerun = sh(command, home, env, timeout=600)
    return ResumedSweep(home, command, KILLED_SLUG, killed, record, rerun)
