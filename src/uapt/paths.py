"""Where uapt's own files are: the checkout's config tree and grids, and the default cache."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CONF_DIR = REPO / "conf"  # the Hydra config tree (conf/train.yaml and its groups)
SWEEPS_DIR = REPO / "sweeps"  # the grids, their paired variants and tuned settings


def default_cache_dir() -> Path:
    """`$UAPT_CACHE`, else ~/.cache/uapt (conf/train.yaml's `cache_dir` reads the same)."""
    return Path(os.environ.get("UAPT_CACHE") or Path.home() / ".cache" / "uapt").expanduser()
