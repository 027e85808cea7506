"""Publishing files and folders: atomically, with the modes the umask gives, readable back.

Everything uapt leaves in a run folder or a cache is written to a temporary name in the same
folder and renamed into place, so a reader (another run, a teammate, `uapt-table`) sees the old
file or the new one, never half of one. Temporary files and folders are created private
(mkstemp 0600, mkdtemp 0700); they are given the modes an ordinary `open`/`mkdir` would have
(0644 / 0755 under umask 022, group-writable under 002) before they are published, so a
`runs_dir` or `cache_dir` shared by a team stays readable by all of it.

Files that cannot be read back (truncated, not UTF-8, not JSON) raise `DamagedFile`, which names
the file; `set_aside` moves such a file out of the way under a name that says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from uapt.errors import UserError

MANIFEST = "manifest.json"


class DamagedFile(UserError):
    """A file uapt wrote earlier cannot be read back; the message names it and why."""

    def __init__(self, path: Path, why: str):
        super().__init__(f"{path}: {why}")
        self.path, self.why = Path(path), why


def umask() -> int:
    """This process's umask, read without changing it (Linux), else by setting it back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def file_mode() -> int:
    return 0o666 & ~umask()


def dir_mode() -> int:
    return 0o777 & ~umask()


def share_tree(root: Path) -> None:
    """Give a folder and everything in it the umask's modes: temp folders are created 0700 and
    some writers (safetensors) create their files 0600, which a teammate could not read."""
    os.chmod(root, dir_mode())
    for path in Path(root).rglob("*"):
        if not path.is_symlink():
            os.chmod(path, dir_mode() if path.is_dir() else file_mode())


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (where the platform lets a folder be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    with Path(path).open("rb") as f:
        os.fsync(f.fileno())


def publish_file(path: Path, write: Callable[[Path], None]) -> None:
    """Publish the file `write(tmp)` writes at a temporary path as `path`, atomically: fsync,
    the umask's mode, rename. On an exception nothing is published and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_bytes(path: Path, data: bytes) -> None:
    publish_file(path, lambda tmp: tmp.write_bytes(data))


def write_text(path: Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def strict_json(value: Any) -> Any:
    """`value` with non-finite floats as the strings "nan", "inf", "-inf" (JSON has none)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_json(path: Path, data: Any) -> None:
    """Publish `data` as strict JSON (no bare NaN or Infinity: strict parsers reject them)."""
    text = json.dumps(strict_json(data), indent=2, default=str, allow_nan=False)
    write_text(path, text + "\n")


def read_json(path: Path) -> Any:
    """The JSON in `path`; DamagedFile (naming the file) when it is not UTF-8 or not JSON."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DamagedFile(path, f"not UTF-8 (byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedFile(path, f"not JSON (line {e.lineno}: {e.msg})") from None


@contextlib.contextmanager
def staging_dir(final: Path, *, replace: bool = True) -> Iterator[Path]:
    """A private temporary folder next to `final`, published as `final` when the block ends.

    The folder gets the umask's mode before the rename. replace=False: when `final` appeared
    meanwhile (another process published the same entry), it is kept and the copy dropped.
    On an exception the temporary folder is removed and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        share_tree(tmp)
        if final.exists() and not replace:
            shutil.rmtree(tmp, ignore_errors=True)
            return
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(final)
            except OSError:  # published concurrently (rename onto a non-empty folder)
                if replace or not final.exists():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
        _fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def set_aside(path: Path, why: str) -> Path | None:
    """Move a damaged file or folder out of the way, as `<name>.damaged-<UTC time>` (`why` is
    for the caller's message); None when another process moved or replaced it first."""
    path = Path(path)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    try:
        path.rename(target)
    except FileNotFoundError:
        return None
    return target


def remove_temporaries(folder: Path, name: str) -> list[Path]:
    """Remove what interrupted writes of `name` in `folder` left behind (its .tmp siblings,
    named `.<name>.*.tmp`, or `<name>.*.tmp` by uapt before 0.2)."""
    removed = []
    leftovers = [*Path(folder).glob(f".{name}.*.tmp"), *Path(folder).glob(f"{name}.*.tmp")]
    for leftover in leftovers:
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover)
    return removed


# ----------------------------------------------------------------------------- manifests
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, **extra: Any) -> None:
    """Record every file under `folder` (size, SHA-256) in its manifest.json, written last: a
    folder whose files all match its manifest is complete and undamaged."""
    folder = Path(folder)
    entries = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        fsync_file(path)
        rel = path.relative_to(folder).as_posix()
        entries[rel] = {"bytes": path.stat().st_size, "sha256": sha256(path)}
    write_json(folder / MANIFEST, {**extra, "files": entries})


def manifest_problem(folder: Path) -> str | None:
    """Why `folder` does not match its manifest (a file missing, cut short or altered), or None."""
    folder = Path(folder)
    try:
        manifest = read_json(folder / MANIFEST)
        entries = manifest["files"]
    except (OSError, DamagedFile, KeyError, TypeError) as e:
        return f"unreadable manifest ({e})"
    for rel, expected in entries.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != expected["bytes"]:
            return f"{rel} has {path.stat().st_size} bytes, expected {expected['bytes']}"
        if sha256(path) != expected["sha256"]:
            return f"{rel} does not match its checksum"
    return None
