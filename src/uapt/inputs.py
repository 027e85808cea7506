"""A run's local inputs are part of its identity: content fingerprints of local files and folders.

A run id hashes the config, and a config names a local data file or model folder only by its
path: editing the file would silently reuse the old result. So before a run's id is computed,
every local input it reads (`dataset.source`, `model.path`, `model.tokenizer`, and the data
files of the eval suite's tasks) is fingerprinted by its content (SHA-256 over the files, in
path order) and the fingerprints enter the config as `inputs` (a key uapt sets, not the user),
so the run record shows them and the id covers them. Hub ids and uapt's own generated data are
identified by their config keys and are not fingerprinted.

Hashing is cheap after the first time: a file's digest is cached under
`<cache_dir>/fingerprints/` keyed by its path, size and modification time, so only a file that
changed is read again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from uapt import files

CHUNK = 1 << 20


def local_path(value: Any) -> Path | None:
    """The path a config value names on this machine, or None (a hub id, tiny, unset)."""
    if not isinstance(value, str) or not value or value in ("tiny", "synthetic"):
        return None
    path = Path(value).expanduser()
    return path if path.exists() else None


def _eval_files(suite: Mapping[str, Any]) -> Iterator[tuple[str, Path]]:
    for i, task in enumerate(suite.get("tasks") or []):
        if not isinstance(task, Mapping):
            continue
        data_files = task.get("data_files")
        values = data_files.values() if isinstance(data_files, Mapping) else [data_files]
        for value in values:
            for item in value if isinstance(value, list | tuple) else [value]:
                path = local_path(item)
                if path is not None:
                    yield f"eval.tasks[{i}].data_files", path


def local_inputs(cfg: Mapping[str, Any]) -> dict[str, Path]:
    """Config key -> local path, for every local input of the run."""
    found: dict[str, Path] = {}
    for key, value in (
        ("dataset.source", cfg["dataset"].get("source")),
        ("model.path", cfg["model"].get("path")),
        ("model.tokenizer", cfg["model"].get("tokenizer")),
    ):
        path = local_path(value)
        if path is not None:
            found[key] = path
    for key, path in _eval_files(cfg.get("eval") or {}):
        found[f"{key}:{path.name}"] = path
    return found


def _file_digest(path: Path, cache: Path | None) -> str:
    stat = path.stat()
    entry = None
    if cache is not None:
        key = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:32]
        entry = cache / f"{key}.json"
        try:
            known = files.read_json(entry)
            if (known["size"], known["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
                return known["sha256"]
        except (OSError, files.DamagedFile, KeyError, TypeError):
            pass  # absent or damaged: hash again and rewrite it
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    sha = digest.hexdigest()
    if entry is not None:
        record = {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
        files.write_json(entry, {**record, "sha256": sha})
    return sha


def fingerprint(path: Path, cache_dir: str | Path | None) -> str:
    """SHA-256 of a file's content, or of a folder's files (relative names and contents)."""
    cache = Path(cache_dir).expanduser() / "fingerprints" if cache_dir else None
    if path.is_file():
        return _file_digest(path, cache)
    digest = hashlib.sha256()
    for item in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = item.relative_to(path).as_posix()
        if rel.startswith(".") or "/." in rel:
            continue  # hidden files (.cache/, .git/) are not the model's content
        digest.update(f"{rel}\0{_file_digest(item, cache)}\0".encode())
    return digest.hexdigest()


def with_fingerprints(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg` with `inputs` set to {config key: "sha256:<hex>"} for its local inputs."""
    found = local_inputs(cfg)
    inputs = {
        key: f"sha256:{fingerprint(path, cfg.get('cache_dir'))}" for key, path in found.items()
    }
    return {**cfg, "inputs": inputs}
