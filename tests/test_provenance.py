"""uapt.provenance on temporary git repositories: the diff a dirty run saves rebuilds its tree
from the recorded commit, require_clean refuses a dirty checkout before anything is written,
and two records' provenance compare key by key."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY, env

from uapt import provenance, records

REPO = Path(__file__).resolve().parents[1]


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout


def make_repo(root: Path, files: dict[str, bytes]) -> str:
    """A repository with `files` committed on main; returns the commit."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", "main")
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "init")
    return git(root, "rev-parse", "HEAD").strip()


COMMITTED = {
    ".gitignore": b"*.log\nruns/\n",
    "f.txt": b"a\nb\n",
    "gone.txt": b"x\n",
    "sub/k.py": b"y = 1\n",
    "run.sh": b"#!/bin/sh\necho hi\n",
    "keep.bin": bytes(range(256)),
}


@pytest.fixture
def repo(tmp_path) -> tuple[Path, str]:
    root = tmp_path / "repo"
    make_repo(root, COMMITTED)
    os.chmod(root / "run.sh", 0o755)
    git(root, "add", "run.sh")
    git(root, "commit", "-q", "-m", "exec")
    return root, git(root, "rev-parse", "HEAD").strip()


def make_dirty(root: Path) -> set[str]:
    """Every kind of change a working tree can hold; returns the paths that differ."""
    (root / "f.txt").write_bytes(b"a\nb\nc\n")  # modified
    (root / "gone.txt").unlink()  # deleted
    (root / "sub" / "new.py").write_bytes(b"print('new')\n")  # untracked, executable
    os.chmod(root / "sub" / "new.py", 0o755)
    (root / "noise.dat").write_bytes(hashlib.sha256(b"seed").digest() * 40)  # untracked binary
    (root / "keep.bin").write_bytes(bytes(reversed(range(256))))  # binary, modified
    os.chmod(root / "run.sh", 0o644)  # a mode change
    (root / "staged.txt").write_bytes(b"staged\n")
    git(root, "add", "staged.txt")  # staged, then changed again in the working tree
    (root / "staged.txt").write_bytes(b"staged\nand more\n")
    (root / "x.log").write_bytes(b"ignored\n")  # ignored: not part of the code
    (root / "runs").mkdir()
    (root / "runs" / "run.json").write_bytes(b"{}")
    return {"f.txt", "gone.txt", "sub/new.py", "noise.dat", "keep.bin", "run.sh", "staged.txt"}


def tree(root: Path, leave_out: set[str] = frozenset()) -> dict[str, tuple[bytes, bool]]:
    """The tree as git sees it (tracked and untracked files, not ignored ones): content and
    executable bit per path."""
    names = git(root, "ls-files", "-co", "--exclude-standard", "-z").split("\0")
    out = {}
    for name in sorted(n for n in names if n and n not in leave_out):
        path = root / name
        if path.is_file():
            out[name] = (path.read_bytes(), bool(path.stat().st_mode & stat.S_IXUSR))
    return out


def checkout(repo_root: Path, commit: str, where: Path) -> Path:
    git(where.parent, "clone", "-q", str(repo_root), where.name)
    git(where, "checkout", "-q", commit)
    return where


def test_a_clean_tree_records_its_commit_and_no_diff(repo):
    root, commit = repo
    snap = provenance.snapshot(root)
    rec = snap.record()
    assert (rec["commit"], rec["dirty"], rec["diff_file"], rec["diff_sha256"]) == (
        commit,
        False,
        None,
        None,
    )
    assert rec["changed_files"] == [] and rec["branch"] == "main" and rec["remote"] is None
    assert snap.state.git_commit() == commit


def test_the_saved_diff_applies_to_the_commit_and_rebuilds_the_tree(repo, tmp_path):
    root, commit = repo
    changed = make_dirty(root)
    index = Path(git(root, "rev-parse", "--path-format=absolute", "--git-path", "index").strip())
    index_before, objects_before = index.read_bytes(), git(root, "count-objects", "-v")
    snap = provenance.snapshot(root)
    # the user's index and object store are as they were
    assert index.read_bytes() == index_before and git(root, "count-objects", "-v") == objects_before
    assert set(snap.state.changed) == changed and snap.state.git_commit() == f"{commit}-dirty"
    rec = snap.record()
    assert rec["dirty"] is True and rec["diff_file"] == "code.diff"
    assert rec["diff_sha256"] == hashlib.sha256(snap.diff).hexdigest()

    folder = tmp_path / "run"
    cfg = {"seed": 0, "model": {"name": "tiny"}, "dataset": {"name": "arith"}}
    cfg["objective"] = {"name": "mle", "mask_ratio": 0.0, "distill_weight": 0.0}
    records.RunRecord.start(folder, cfg, snapshot=snap)
    data = json.loads((folder / "run.json").read_text())
    assert data["provenance"] == rec and data["git_commit"] == f"{commit}-dirty"
    saved = folder / "code.diff"
    assert hashlib.sha256(saved.read_bytes()).hexdigest() == rec["diff_sha256"]

    clone = checkout(root, data["provenance"]["commit"], tmp_path / "clone")
    git(clone, "apply", "--binary", str(saved))
    assert tree(clone) == tree(root)

    # a later attempt from a clean tree leaves no stale diff behind
    records.RunRecord.start(folder, cfg, snapshot=provenance.Snapshot(provenance.TreeState(None)))
    assert not saved.exists()


def test_an_untracked_file_too_big_for_the_diff_is_named_with_its_digest(
    repo, tmp_path, monkeypatch
):
    root, commit = repo
    monkeypatch.setattr(provenance, "MAX_UNTRACKED_BYTES", 1000)
    big = bytes(range(256)) * 8  # 2048 bytes
    (root / "big.bin").write_bytes(big)
    (root / "small.txt").write_bytes(b"small\n")
    snap = provenance.snapshot(root)
    assert snap.record()["untracked_not_saved"] == [
        {"path": "big.bin", "bytes": 2048, "sha256": hashlib.sha256(big).hexdigest()}
    ]
    clone = checkout(root, commit, tmp_path / "clone")
    (tmp_path / "code.diff").write_bytes(snap.diff)
    git(clone, "apply", "--binary", str(tmp_path / "code.diff"))
    assert tree(clone) == tree(root, leave_out={"big.bin"})


def test_outside_a_checkout_nothing_is_known(tmp_path):
    snap = provenance.snapshot(tmp_path)
    assert snap.state.commit is None and snap.record()["dirty"] is None
    assert snap.state.git_commit() is None and snap.diff is None


@pytest.mark.parametrize(
    ("url", "public"),
    [
        ("https://user:s3cret@github.com/o/r.git", "https://github.com/o/r.git"),
        ("https://x-access-token:t@github.com/o/r.git?token=t#f", "https://github.com/o/r.git"),
        ("ssh://git@example.org:2222/o/r.git", "ssh://example.org:2222/o/r.git"),
        ("git@github.com:o/r.git", "git@github.com:o/r.git"),  # scp-like: no secret in it
        ("/srv/git/r.git", "local"),
        ("../r", "local"),
        ("file:///srv/git/r.git", "local"),
    ],
)
def test_remote_urls_lose_credentials_and_local_paths(url, public):
    assert provenance.public_url(url) == public


def test_branch_and_remote_of_the_upstream(repo, tmp_path):
    root, _ = repo
    bare = tmp_path / "origin.git"
    git(tmp_path, "init", "-q", "--bare", str(bare))
    git(root, "remote", "add", "origin", "https://u:tok@example.org/o/r.git")
    git(root, "remote", "add", "mirror", str(bare))
    git(root, "push", "-q", "-u", "mirror", "main")
    assert provenance.tree_state(root).remote == "local"  # the upstream's remote: a folder
    git(root, "branch", "-q", "--unset-upstream")
    state = provenance.tree_state(root)
    assert (state.branch, state.remote) == ("main", "https://example.org/o/r.git")
    git(root, "checkout", "-q", "--detach")
    assert provenance.tree_state(root).branch is None


def test_command_line_as_typed(monkeypatch):
    home = str(Path.home())
    argv = [f"{REPO}/.venv/bin/uapt-train", f"dataset.source={home}/d.jsonl", "seed=1"]
    monkeypatch.delenv(provenance.ARGV_ENV, raising=False)
    assert provenance.command_line(argv) == ("uapt-train", "dataset.source=~/d.jsonl", "seed=1")
    monkeypatch.setenv(provenance.ARGV_ENV, json.dumps(["uapt-train", "sweep=demo"]))
    assert provenance.command_line() == ("uapt-train", "sweep=demo")  # the launcher's


def test_a_dirty_tree_is_refused_under_require_clean_and_warned_about_once(repo, caplog):
    root, _ = repo
    make_dirty(root)
    state = provenance.tree_state(root)
    with pytest.raises(provenance.DirtyTree, match=r"require_clean=true: .*f\.txt, gone\.txt"):
        provenance.check_launch(state, require_clean=True, study=False)
    provenance._warned.clear()
    with caplog.at_level(logging.WARNING, logger="uapt"):
        provenance.check_launch(state, require_clean=False, study=True)
        provenance.check_launch(state, require_clean=False, study=True)
        provenance.check_launch(state, require_clean=False, study=False)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "dirty tree: 7 uncommitted file(s)" in lines[0]
    assert "f.txt" in lines[0] and "noise.dat" in lines[0]
    clean = provenance.TreeState(root, "abc")
    provenance.check_launch(clean, require_clean=True, study=True)  # nothing to say


def test_differences_compare_provenance_key_by_key():
    new = {"provenance": {"commit": "a" * 40, "dirty": True, "diff_sha256": "d1", "argv": ["x"]}}
    other = {"provenance": {"commit": "a" * 40, "dirty": True, "diff_sha256": "d2", "argv": ["y"]}}
    assert provenance.differences(new, other) == [
        ("argv", ["x"], ["y"]),
        ("diff_sha256", "d1", "d2"),
    ]
    assert provenance.differences(new, other, keys=provenance.CODE_KEYS) == [
        ("diff_sha256", "d1", "d2")
    ]
    legacy = {"git_commit": "b" * 40 + "-dirty"}  # made before provenance was recorded
    assert provenance.differences(legacy, new, keys=provenance.CODE_KEYS) == [
        ("commit", "b" * 40, "a" * 40),
        ("diff_sha256", None, "d1"),
    ]
    assert provenance.differences(legacy, {"git_commit": "b" * 40 + "-dirty"}) == []
    assert provenance.differences({}, {"git_commit": "c" * 40})[0] == ("commit", None, "c" * 40)


# ----------------------------------------------------------------------------- the command
@pytest.fixture
def dirty_checkout(tmp_path) -> tuple[Path, dict[str, str]]:
    """uapt's own files committed in a temporary repository, then changed: the command is run
    from there (its src/ first on the path), as from a user's dirty checkout."""
    root = tmp_path / "checkout"
    for part in ("src", "conf", "sweeps"):
        shutil.copytree(REPO / part, root / part, ignore=shutil.ignore_patterns("__pycache__"))
    make_repo(root, {".gitignore": b"runs/\n__pycache__/\n"})  # commits the copied files too
    with (root / "src" / "uapt" / "__init__.py").open("a") as f:
        f.write("# a local change\n")
    (root / "notes.txt").write_text("untracked\n")
    run_env = {**env(), "PYTHONPATH": str(root / "src"), "UAPT_CACHE": str(tmp_path / "cache")}
    run_env.pop(provenance.ARGV_ENV, None)
    return root, run_env


@pytest.mark.slow
@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_require_clean_exits_2_naming_the_files_and_writes_nothing(dirty_checkout, sweep):
    root, run_env = dirty_checkout
    runs = root.parent / "runs"
    before = tree(root)
    args = [*TINY, "trainer.max_steps=1", f"runs_dir={runs}", "require_clean=true"]
    if sweep:
        args = ["-m", *args, "objective=mle,masked_mle", "experiment=study"]
    proc = subprocess.run(
        [sys.executable, "-m", "uapt.train", *args],
        cwd=root,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "require_clean=true" in out and "notes.txt" in out
    assert "src/uapt/__init__.py" in out
    assert not runs.exists() and not (root.parent / "cache").exists()
    assert tree(root) == before and not (root / "outputs").exists()


@pytest.mark.slow
def test_a_study_from_a_dirty_checkout_warns_once_and_its_diff_rebuilds_the_tree(
    dirty_checkout, tmp_path
):
    root, run_env = dirty_checkout
    runs = tmp_path / "runs"
    args = [*TINY, "trainer.max_steps=1", "eval=none", f"runs_dir={runs}", "experiment=study"]
    proc = subprocess.run(
        [sys.executable, "-m", "uapt.train", *args],
        cwd=root,
        env=run_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    warnings = [line for line in out.splitlines() if "from a dirty tree" in line]
    assert len(warnings) == 1 and "notes.txt, src/uapt/__init__.py" in warnings[0]
    (folder,) = runs.glob("tiny-*")
    record = json.loads((folder / "run.json").read_text())
    prov = record["provenance"]
    assert prov["changed_files"] == ["notes.txt", "src/uapt/__init__.py"]
    assert prov["argv"] == ["python", "-m", "uapt.train", *args]
    assert record["git_commit"] == f"{prov['commit']}-dirty" and prov["branch"] == "main"
    clone = checkout(root, prov["commit"], tmp_path / "clone")
    git(clone, "apply", "--binary", str(folder / prov["diff_file"]))
    assert tree(clone) == tree(root)
