"""User acceptance scenarios: the README's commands, run as a user would.

Quick scenarios (`pytest uat -m "not full"`) call the repository's `.venv/bin` tools on the tiny
model. Full ones (`-m full`) clone the repository and run `make setup` / `make demo` from scratch.
Runs that several scenarios look at (one training run, one interrupted sweep) are made once.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from uatlib import REPO, Seen, as_typed, quick_cache, readme_command, sh, user_env, venv_bin

sys.path.insert(0, str(REPO / "tests"))  # the suite's helper for holding and signalling a run
from helpers import signal_at_row


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "full: slow user scenarios from a clean clone (make setup, make demo)"
    )


# The whole folder is slow (left out of `make test-fast`). Ceilings, over twice the slowest time
# seen on 2 shared cores: a quick scenario's first test also makes the runs its fixtures share;
# a full one clones, sets up and runs the demo (README: up to 5 + 26 min beside `make test`).
UAT_TIMEOUT_S = 900
FULL_TIMEOUT_S = 3600


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if not item.path.is_relative_to(here):  # tests/conftest.py sets the suite's own
            continue
        item.add_marker(pytest.mark.slow)
        if not item.get_closest_marker("timeout"):
            full = item.get_closest_marker("full")
            item.add_marker(pytest.mark.timeout(FULL_TIMEOUT_S if full else UAT_TIMEOUT_S))


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


def _launch_and_kill(command: list[str], home: Path, env: dict[str, str]) -> Seen:
    """Start the sweep; SIGKILL it (and its children) in its third run, after that run's first
    checkpoint (step 2), before its third metrics row (tests/held_run.py holds it there)."""
    killed = signal_at_row(
        command,
        3,
        signal.SIGKILL,
        run=f"{KILLED_SLUG}-*",
        cwd=home,
        env_vars=env,
        group=True,
        timeout_s=600,
    )
    seen = Seen(command, killed.returncode, killed.output, "")
    if killed.returncode != -signal.SIGKILL:
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
