"""Shared fixtures: offline everywhere, one cache dir for the session, tiny model and tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
# One cache for the whole session (and across sessions): converted models, tokenizers, base scores.
CACHE_DIR = Path(os.environ.setdefault("UAPT_CACHE", str(REPO / ".cache" / "uapt")))


# Lanes: `make test-fast` (`-m "not slow"`) leaves out the tests marked slow in their files
# (`pytestmark = pytest.mark.slow` on a module, `@pytest.mark.slow` on a test): those that run
# uapt's commands in subprocesses, train whole runs, start clusters, or take over ~2 s in process.
# Every test has a ceiling (pytest-timeout): pyproject.toml's `timeout` for the fast lane, and
# SLOW_TIMEOUT_S for a slow test unless it carries its own `@pytest.mark.timeout(...)`. Both are
# over twice the slowest time measured on 2 shared cores (docs: README, "Development").
SLOW_TIMEOUT_S = 1200


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        mine = item.path.is_relative_to(here)  # uat/conftest.py sets its own
        if mine and item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return CACHE_DIR


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        raise FileNotFoundError(f"real test data expected at {SHARED_DATA} (../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer(cache_dir):
    from uapt.models import tiny_tokenizer

    return tiny_tokenizer(cache_dir)


@pytest.fixture()
def tiny_model(tiny_tokenizer):
    import torch
    from helpers import tiny_model_cfg

    from uapt.models import load_model

    torch.manual_seed(0)
    cfg = tiny_model_cfg()
    return load_model(cfg, tiny_tokenizer, CACHE_DIR, torch.device("cpu"))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A one-node SLURM cluster with accounting (tests/slurm_cluster.py) for the whole session,
    in a temp folder; every daemon it started is stopped at the end. No skip: a cluster that
    cannot start fails the tests that need it, in one line."""
    from slurm_cluster import Cluster, ClusterError

    cluster, error = Cluster(tmp_path_factory.mktemp("slurm"), tied=True), None
    try:
        cluster.start()
    except ClusterError as e:
        error = str(e)
    if error:  # outside the except: one line, no chained traceback
        pytest.fail(f"SLURM test cluster: {error}", pytrace=False)
    yield cluster
    killed = cluster.stop()
    if killed:
        pytest.fail(f"SLURM test cluster: had to SIGKILL {', '.join(killed)}", pytrace=False)
