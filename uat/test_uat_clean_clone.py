"""Scenarios 1 and 2 (full): a new user clones the repository and types the README's commands.

README: "`make demo`: set up .venv (pinned) and run the embedded demo: train, evaluate, print the
table, plot"; "Both need only Python 3.11 and a package index". The clone is of the committed HEAD;
the cache starts empty (UAPT_CACHE in the clone), as on a machine that never ran uapt.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from uatlib import OBJECTIVES, REPO, Seen, sh, user_env

pytestmark = pytest.mark.full


def _shell_env(cache: Path) -> dict[str, str]:
    """A fresh shell: no virtualenv of this checkout on PATH, an empty uapt cache, and none of the
    offline switches (the README promises that no Hub access is needed without them)."""
    env = user_env(cache)
    for var in ("VIRTUAL_ENV", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "WANDB_MODE"):
        env.pop(var, None)
    env["PATH"] = os.pathsep.join(
        p for p in env["PATH"].split(os.pathsep) if not p.startswith(str(REPO / ".venv"))
    )
    return env


@dataclass
class Clone:
    root: Path
    env: dict[str, str]
    setup: Seen


@pytest.fixture(scope="module")
def clone(tmp_path_factory) -> Clone:
    base = tmp_path_factory.mktemp("clean_clone")
    root = base / "uapt"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(root)], check=True)
    env = _shell_env(base / "cache")
    # `make test` (the README's second command) is `make setup` + the test suite; the suite is
    # CI's business, so the user here runs the setup and a smoke command.
    setup = sh(["make", "setup"], root, env, timeout=3600)
    return Clone(root, env, setup)


def test_make_setup_in_a_clean_clone(clone):
    assert clone.setup.rc == 0, clone.setup
    venv = clone.root / ".venv" / "bin"
    assert (venv / ".installed").exists()

    imported = sh(
        [venv / "python", "-c", "import uapt; print(uapt.__file__)"], clone.root, clone.env, 300
    )
    assert imported.rc == 0, imported
    assert imported.out.strip().startswith(str(clone.root / "src" / "uapt")), imported  # editable

    help_ = sh([venv / "uapt-train", "--help"], clone.root, clone.env, timeout=300)
    assert help_.rc == 0, help_
    assert "uapt-train: post-train a language model" in help_.out
    for group in ("model", "dataset", "objective", "trainer", "eval", "logger", "sweep"):
        assert re.search(rf"^{group}: ", help_.out, flags=re.M), group
    for option in (*OBJECTIVES, "tiny", "smollm2_135m", "demo", "embedded"):
        assert option in help_.out, option

    torch_version = sh(
        [venv / "python", "-c", "import torch; print(torch.__version__)"],
        clone.root,
        clone.env,
        300,
    )
    assert torch_version.out.strip().startswith("2.13.0"), torch_version  # the pinned build


def test_make_demo_in_a_clean_clone(clone):
    assert clone.setup.rc == 0, clone.setup
    demo = sh(["make", "demo"], clone.root, clone.env, timeout=3600)
    assert demo.rc == 0, demo
    assert "sweep: 4 completed, 0 skipped, 0 failed" in demo.out, demo

    table = demo.out[demo.out.index("sweep: 4 completed") :]
    assert "Embedded demo: the four objectives" in table, table
    header = next(line for line in table.splitlines() if "masked_mle_distill" in line)
    for objective in OBJECTIVES:
        assert re.search(rf"(?<![a-z_]){objective}(?![a-z_])", header), (objective, header)
    for label in ("arith EM", "IFEval prompt strict", "val loss"):
        assert label in table, label
    assert "missing" not in table, table
    assert "Not aggregated" not in table, table

    pngs = sorted((clone.root / "runs" / "plots" / "demo").glob("*.png"))
    assert len(pngs) == 1, pngs
    assert pngs[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote runs/plots/demo/{pngs[0].name}" in demo.err, demo

    # The same command again: nothing is trained twice.
    again = sh(["make", "demo"], clone.root, clone.env, timeout=1800)
    assert again.rc == 0, again
    assert "sweep: 0 completed, 4 skipped, 0 failed" in again.out, again
