"""What code made a run: its commit, its uncommitted changes, its branch and remote, its command.

A run record's `provenance` (docs/run_record.md) holds, for the checkout uapt runs from:

- `commit` and `dirty`: HEAD, and whether the working tree differs from it. Untracked files count
  when git does not ignore them (a new module is code that ran); ignored files (runs/, .cache/,
  .venv/) do not.
- `diff_file` and `diff_sha256` for a dirty tree: `code.diff` in the run folder is the whole
  difference, tracked changes (staged or not, deletions, modes, binary files) and untracked files
  alike, as one `git apply`-able patch against `commit`, and its SHA-256. An untracked file over
  MAX_UNTRACKED_BYTES is left out of it (a stray checkpoint would bloat every record) and listed
  in `untracked_not_saved` with its size and digest instead.
- `changed_files`: the paths that differ (what a warning or a refusal names).
- `branch` (None when detached) and `remote` (the upstream's URL, else origin's; credentials,
  query and fragment stripped; a remote on a local path is recorded as "local").
- `argv` and `overrides`: the command line as typed (its program by name only) and Hydra's
  overrides of this job; the home folder shows as `~`.

Provenance is evidence, not identity: it never enters a run id. `differences` compares the
provenance of two records (uapt-table's notes on cells that mix code use it).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from uapt.errors import UserError
from uapt.paths import publishable_text

log = logging.getLogger("uapt")

DIFF_FILE = "code.diff"
MAX_UNTRACKED_BYTES = 1 << 20  # per untracked file saved in the diff
# The command line a sweep or torchrun was launched with, handed down to the jobs it starts
# (their own argv is the launcher's), set by uapt.sweeps and uapt.train.
ARGV_ENV = "UAPT_LAUNCH_ARGV"
# What identifies the code of a record beyond its package versions (uapt-table's mixing notes).
CODE_KEYS = ("commit", "dirty", "diff_sha256")
SHOWN_FILES = 8  # changed files named in a warning or refusal, then "and N more"
_GIT_TIMEOUT_S = 30


class DirtyTree(UserError):
    """require_clean=true and the checkout has uncommitted changes (named)."""


@dataclass(frozen=True)
class TreeState:
    """A checkout's commit and how its working tree differs from it (no diff computed yet)."""

    root: Path | None  # the checkout's top folder; None outside a git checkout
    commit: str | None = None
    changed: tuple[str, ...] = ()
    untracked: tuple[str, ...] = ()
    branch: str | None = None
    remote: str | None = None

    @property
    def dirty(self) -> bool:
        return bool(self.changed)

    def git_commit(self) -> str | None:
        """The record's top-level `git_commit`: "<sha>" or "<sha>-dirty"."""
        return None if self.commit is None else self.commit + ("-dirty" if self.dirty else "")

    def changed_text(self) -> str:
        shown = ", ".join(self.changed[:SHOWN_FILES])
        more = len(self.changed) - SHOWN_FILES
        return shown + (f", and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class Snapshot:
    """A TreeState with the diff that turns its commit into the working tree."""

    state: TreeState
    diff: bytes | None = None
    not_saved: tuple[dict[str, Any], ...] = ()
    argv: tuple[str, ...] = ()
    overrides: tuple[str, ...] | None = None

    def record(self) -> dict[str, Any]:
        """The record's `provenance` object (plain values)."""
        state = self.state
        diff = self.diff
        return {
            "commit": state.commit,
            "dirty": state.dirty if state.commit else None,
            "diff_sha256": hashlib.sha256(diff).hexdigest() if diff else None,
            "diff_file": DIFF_FILE if diff else None,
            "changed_files": list(state.changed),
            "untracked_not_saved": [dict(x) for x in self.not_saved],
            "branch": state.branch,
            "remote": state.remote,
            "argv": list(self.argv),
            "overrides": None if self.overrides is None else list(self.overrides),
        }


# ----------------------------------------------------------------------------- reading git
# A patch any `git apply` reads back whatever the user's git configuration: binary contents,
# no renames, no colours, external diff drivers or text conversions, the a/ b/ prefixes.
DIFF_ARGS = ("diff", "--binary", "--no-color", "--no-ext-diff", "--no-textconv", "--no-renames")
DIFF_ARGS += ("--src-prefix=a/", "--dst-prefix=b/")


def _run(
    root: Path, args: Sequence[str], env: Mapping[str, str] | None = None, stdin: bytes = b""
) -> bytes:
    """stdout of a git command in `root` (CalledProcessError/OSError when it fails). Optional
    locks off: reading the state must not rewrite the user's index."""
    return subprocess.run(
        ["git", *args],
        cwd=root,
        input=stdin,
        capture_output=True,
        timeout=_GIT_TIMEOUT_S,
        check=True,
        env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", **(env or {})},
    ).stdout


def _git(root: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    return _run(root, args, env).decode("utf-8", "surrogateescape")


def source_root() -> Path | None:
    """The top folder of the git checkout this uapt is imported from, or None."""
    try:
        top = _git(Path(__file__).resolve().parent, "rev-parse", "--show-toplevel").strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return Path(top) if top else None


def tree_state(root: Path | None = None) -> TreeState:
    """The commit and changed files of the checkout at `root` (default: uapt's own)."""
    root = source_root() if root is None else root
    if root is None:
        return TreeState(None)
    try:
        commit = _git(root, "rev-parse", "--verify", "HEAD").strip()
        status = _git(root, "status", "--porcelain=v1", "-z", "--no-renames", "-uall")
    except (OSError, subprocess.SubprocessError):
        return TreeState(None)  # not a checkout, or one without a commit
    entries = [e for e in status.split("\0") if e]
    changed = tuple(sorted(e[3:] for e in entries))
    untracked = tuple(sorted(e[3:] for e in entries if e.startswith("??")))
    return TreeState(root, commit, changed, untracked, _branch(root), _remote(root))


def _branch(root: Path) -> str | None:
    try:
        name = _git(root, "symbolic-ref", "--quiet", "--short", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return None  # detached HEAD
    return name or None


def _remote(root: Path) -> str | None:
    """The URL of the current branch's upstream remote, else of origin; credentials stripped."""
    names = []
    try:
        upstream = _git(root, "rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}")
        names.append(upstream.strip().split("/", 1)[0])
    except (OSError, subprocess.SubprocessError):
        pass  # no upstream
    for name in [*names, "origin"]:
        try:
            return public_url(_git(root, "remote", "get-url", name).strip())
        except (OSError, subprocess.SubprocessError):
            continue
    return None


def public_url(url: str) -> str:
    """A remote URL without credentials (user:token@), query or fragment; "local" for a remote
    on this machine's file system, which means nothing elsewhere."""
    parts = urlsplit(url)
    if parts.scheme == "file" or (not parts.scheme and (url.startswith(("/", ".", "~")))):
        return "local"
    if not parts.scheme:  # scp-like git@host:owner/repo.git: the user is the protocol's, no secret
        return url
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def tree_diff(state: TreeState) -> tuple[bytes | None, tuple[dict[str, Any], ...]]:
    """(the patch from state.commit to the working tree, the untracked files left out of it).

    Untracked files enter the patch through a copy of the index in which they are marked
    intent-to-add, with a scratch object store: the user's index and objects are not touched."""
    if state.root is None or not state.dirty:
        return None, ()
    root = state.root
    small, not_saved = [], []
    for name in state.untracked:
        path = root / name
        if path.is_file() and path.stat().st_size > MAX_UNTRACKED_BYTES:
            not_saved.append({"path": name, "bytes": path.stat().st_size, "sha256": _sha(path)})
        elif path.is_file():
            small.append(name)
    with tempfile.TemporaryDirectory(prefix="uapt-provenance-") as tmp:
        own, objects = (_git_path(root, name) for name in ("index", "objects"))
        env = {  # a scratch index and object store (the real one read through as an alternate)
            "GIT_INDEX_FILE": str(Path(tmp) / "index"),
            "GIT_OBJECT_DIRECTORY": str(Path(tmp) / "objects"),
            "GIT_ALTERNATE_OBJECT_DIRECTORIES": str(objects),
        }
        Path(env["GIT_OBJECT_DIRECTORY"]).mkdir()
        if own.is_file():
            shutil.copyfile(own, env["GIT_INDEX_FILE"])
        else:
            _git(root, "read-tree", "HEAD", env=env)
        if small:
            add = ("add", "--intent-to-add", "--pathspec-from-file=-", "--pathspec-file-nul")
            _run(root, add, env, "\0".join(small).encode("utf-8", "surrogateescape"))
        diff = _run(root, [*DIFF_ARGS, "HEAD"], env)
    return diff or None, tuple(not_saved)


def _git_path(root: Path, name: str) -> Path:
    return Path(_git(root, "rev-parse", "--path-format=absolute", "--git-path", name).strip())


def _sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- the command line
def command_line(argv: Sequence[str] | None = None) -> tuple[str, ...]:
    """The command as typed: the launcher's when a sweep or torchrun started this process, the
    program by its name only (`uapt-train`, `python -m uapt.train`; its folder is this
    machine's), the home folder as `~`."""
    if argv is None:
        inherited = os.environ.get(ARGV_ENV)
        argv = json.loads(inherited) if inherited else typed_argv()
    if not argv:
        return ()
    return (Path(argv[0]).name, *(publishable_text(str(a)) for a in argv[1:]))


def typed_argv() -> list[str]:
    """sys.argv, with `python -m <module>` as typed rather than the module's file."""
    orig = list(getattr(sys, "orig_argv", []))
    if len(orig) > 2 and orig[1] == "-m":
        return ["python", "-m", orig[2], *sys.argv[1:]]
    return list(sys.argv)


def hydra_overrides() -> tuple[str, ...] | None:
    """This job's overrides as Hydra parsed them (None outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    return tuple(publishable_text(o) for o in HydraConfig.get().overrides.task)


def hand_down_argv() -> bool:
    """Keep this process's command line for the processes it launches (sweep jobs, ranks);
    False when a launcher above it already did."""
    if ARGV_ENV in os.environ:
        return False
    os.environ[ARGV_ENV] = json.dumps(typed_argv())
    return True


def snapshot(root: Path | None = None, state: TreeState | None = None) -> Snapshot:
    """Everything `provenance` records, for the checkout at `root` (default: uapt's own)."""
    state = tree_state(root) if state is None else state
    try:
        diff, not_saved = tree_diff(state)
    except (OSError, subprocess.SubprocessError) as e:  # the record says so rather than fail
        why = getattr(e, "stderr", None) or b""
        why = why.decode(errors="replace").strip() if isinstance(why, bytes) else str(why)
        log.warning("could not save the uncommitted changes of %s: %s %s", state.root, e, why)
        diff, not_saved = None, ()
    return Snapshot(state, diff, not_saved, command_line(), hydra_overrides())


# ----------------------------------------------------------------------------- before a launch
def check_launch(state: TreeState, require_clean: bool, study: bool) -> None:
    """Refuse a dirty tree under require_clean (DirtyTree naming the files); warn once, in one
    line, when a study (experiment=...) is launched from one."""
    if not state.dirty:
        return
    where = f"the checkout at commit {state.commit[:12]}" if state.commit else "the checkout"
    if require_clean:
        raise DirtyTree(
            f"require_clean=true: {where} has uncommitted changes ({len(state.changed)} "
            f"file(s): {state.changed_text()}); commit or stash them, or set "
            "require_clean=false"
        )
    if study and state.changed not in _warned:
        _warned.add(state.changed)
        log.warning(
            "launching a study from a dirty tree: %d uncommitted file(s) (%s); each record keeps "
            "the diff (%s), require_clean=true refuses",
            len(state.changed),
            state.changed_text(),
            DIFF_FILE,
        )


_warned: set[tuple[str, ...]] = set()  # one warning per process for the same changes


# ----------------------------------------------------------------------------- comparing records
def of_record(record: Mapping[str, Any]) -> dict[str, Any]:
    """A record's provenance; for a record made before it existed, what its `git_commit` says
    ("<sha>" or "<sha>-dirty"; what the changes were is unknown)."""
    found = record.get("provenance")
    if isinstance(found, Mapping):
        return dict(found)
    commit = record.get("git_commit")
    if not isinstance(commit, str) or not commit:
        return {}
    sha, dirty = commit.removesuffix("-dirty"), commit.endswith("-dirty")
    return {"commit": sha, "dirty": dirty, "diff_sha256": None}


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, Mapping) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node} if prefix else {}


def differences(
    a: Mapping[str, Any], b: Mapping[str, Any], keys: Iterable[str] | None = None
) -> list[tuple[str, Any, Any]]:
    """(key, value in a, value in b) for every provenance key of two run records whose values
    differ, dotted for nested values, sorted by key; `keys`: only these top-level keys. A key
    one record lacks reads None."""
    left, right = _flat(of_record(a)), _flat(of_record(b))
    wanted = None if keys is None else set(keys)
    out = []
    for key in sorted(left.keys() | right.keys()):
        if wanted is not None and key.split(".", 1)[0] not in wanted:
            continue
        x, y = left.get(key), right.get(key)
        if json.dumps(x, sort_keys=True, default=str) != json.dumps(y, sort_keys=True, default=str):
            out.append((key, x, y))
    return out
