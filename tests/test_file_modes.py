"""Shareable run folders and caches: every published file and folder gets the modes of the
user's umask, and a second user reads all of it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from helpers import REPO, TINY, env

pytestmark = pytest.mark.slow


def _modes(root: Path) -> dict[str, int]:
    return {
        str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode)
        for p in [root, *root.rglob("*")]
        if not p.is_symlink()
    }


def _run_everything(home: Path, umask: int) -> subprocess.CompletedProcess:
    """A tiny run that publishes every kind of file: checkpoints, final model, teacher cache,
    tokenised data and tiny tokenizer (fresh cache), base scores, sweep outcomes."""
    args = [
        *[a for a in TINY if not a.startswith("trainer.max_steps")],
        "trainer.max_steps=2",
        "trainer.checkpoint_every=1",
        "objective=masked_mle_distill",
        "objective.teacher=cached",
        "eval=embedded",
        "eval.limit=1",
        f"runs_dir={home / 'runs'}",
        f"cache_dir={home / 'cache'}",
        "experiment=shared",
    ]
    return subprocess.run(
        [sys.executable, "-m", "uapt.train", "-m", *args, "seed=0"],
        cwd=REPO,
        env={**env(), "UAPT_CACHE": str(home / "cache")},
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=lambda: os.umask(umask),
    )


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o002, 0o664, 0o775)]
)
def test_published_files_get_the_umask_modes(tmp_path, umask, file_mode, dir_mode):
    proc = _run_everything(tmp_path, umask)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for root in (tmp_path / "runs", tmp_path / "cache"):
        wrong = {
            name: oct(mode)
            for name, mode in _modes(root).items()
            if mode != (dir_mode if (root / name).is_dir() else file_mode)
            and "nltk_data" not in name  # NLTK refuses data others can write: kept go-w
        }
        assert wrong == {}, root


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_a_second_user_reads_everything(tmp_path):
    """As `nobody`: every run record, metric row, checkpoint and cache file reads."""
    import pwd

    home = Path(tempfile.mkdtemp(dir="/tmp", prefix="uapt-shared-"))
    try:
        os.chmod(home, 0o755)
        proc = _run_everything(home, 0o022)
        assert proc.returncode == 0, proc.stderr[-3000:]
        nobody = pwd.getpwnam("nobody")
        reader = (
            "import pathlib, sys\n"
            "bad = []\n"
            "for p in pathlib.Path(sys.argv[1]).rglob('*'):\n"
            "    try:\n"
            "        p.read_bytes() if p.is_file() else list(p.iterdir())\n"
            "    except OSError as e:\n"
            "        bad.append(f'{p}: {e}')\n"
            "print('\\n'.join(bad)); sys.exit(1 if bad else 0)\n"
        )
        python = shutil.which("python3", path="/usr/bin:/bin")  # the venv's lives under /root
        assert python, "a system python3 for user nobody"
        seen = subprocess.run(
            [python, "-c", reader, str(home)],
            capture_output=True,
            text=True,
            preexec_fn=lambda: (os.setgid(nobody.pw_gid), os.setuid(nobody.pw_uid)),
        )
        assert seen.returncode == 0 and not seen.stdout.strip(), seen.stdout[-3000:] + seen.stderr
    finally:
        shutil.rmtree(home, ignore_errors=True)
