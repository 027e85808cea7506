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


# The fast lane (`make test-fast`, `-m "not slow"`) leaves out the modules that run uapt's commands
# in subprocesses, train whole runs or start clusters, and the in-process tests measured over ~2 s
# (pytest --durations); `make test` runs everything.
SLOW_MODULES = {
    "test_benchmarks",
    "test_demo",
    "test_distributed",
    "test_faults",
    "test_fsdp",
    "test_gpu_check",
    "test_invariance",
    "test_launchers",
    "test_resume",
    "test_run_folder",
    "test_slurm",
    "test_sweeps",
    "test_train",
    "test_tune",
}
SLOW_TESTS = {
    "test_a_grid_computes_the_teacher_once_and_matches_the_live_teacher",
    "test_an_unreachable_server_is_one_warning_and_everything_goes_on",
    "test_offline_run_file_holds_identity_config_history_and_summary",
    "test_steps_log_padding_and_assistant_tokens",
    "test_bad_teacher_options_are_named",
    "test_ifeval_scores_gpt4_responses_like_the_published_figures",
    "test_table_run_holds_the_terminal_tables_cells_notes_and_plots",
    "test_greedy_answer_before_training",
    "test_reader_follows_records_across_blocks",
    "test_outputs_equal_model_generate_on_two_threads",
    "test_suite_scores_and_samples_equal_with_either_generator",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        name = getattr(item, "originalname", item.name)
        if item.path.stem in SLOW_MODULES or item.path.parent.name == "uat" or name in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


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
