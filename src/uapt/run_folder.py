"""A run folder's lifecycle around training: claim it, heal it, keep what a forced re-run replaces.

- **Claim.** One process trains a run (uapt.run_lock). The claimer reads the record: a completed
  run is skipped unless `force=true`; a record that cannot be read (torn, not UTF-8, not JSON) is
  set aside as `run.json.damaged-<time>`, named in a warning, and the run is redone; temporary
  files that killed writers left behind are removed. Under torchrun rank 0 claims and the other
  ranks follow its decision.
- **Force.** `force=true` on a completed run moves its results (record, metrics, model, eval
  files, log, code.diff) into `<run>/previous/` before the new attempt starts. They are deleted
  when the attempt completes and put back when it fails, so a completed result is replaced only by
  a completed one.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from uapt import distributed, files, provenance, records
from uapt.run_lock import LOCK_NAME, RunHeld, RunLock, inherited

log = logging.getLogger("uapt")

RECORD = "run.json"
PREVIOUS = "previous"
FAILED_RECORD = "run.failed.json"  # the record of a forced attempt that failed
FAILED_LOG = "train.failed.log"  # and its log
FAILED_DIFF = "code.failed.diff"  # and its uncommitted changes (uapt.provenance)
COMPLETED = "already completed"  # why a claim was skipped: the run is done
KEEP = {LOCK_NAME, PREVIOUS, FAILED_RECORD, FAILED_LOG, FAILED_DIFF}


def heal_record(folder: Path) -> dict[str, Any] | None:
    """The record, with a damaged one set aside (named in a warning) and read as none."""
    try:
        return records.read_record(folder)
    except files.DamagedFile as e:
        aside = files.set_aside(e.path, e.why)
        log.warning(
            "run record %s is damaged (%s); moved to %s, redoing the run", e.path, e.why, aside
        )
        return None


@dataclass
class Claim:
    skipped: str | None  # why this process does not train the run (None: it does)
    lock: RunLock | None
    forced_over: bool = False  # a completed result was moved to previous/


def _decide(folder: Path, force: bool) -> Claim:
    """On the claiming process: take the lock, heal, decide."""
    lock = None
    if not inherited():
        lock = RunLock(folder)
        try:
            lock.acquire()
        except RunHeld as e:
            return Claim(f"held by another process: {e}", None)  # e names pid, host and since
    for leftover in files.remove_temporaries(folder, RECORD):
        log.info("removed %s (an interrupted write)", leftover)
    record = heal_record(folder)
    completed = (record or {}).get("status") == "completed"
    if completed and not force:
        if lock:
            lock.release()
        return Claim(COMPLETED, None)
    forced_over = completed and force
    if forced_over:
        keep_previous(folder)
    elif force:  # an unfinished run trained again from scratch, not resumed
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    return Claim(None, lock, forced_over)


@contextlib.contextmanager
def claim(folder: Path, force: bool, world: distributed.World) -> Iterator[Claim]:
    """Claim the run for this process group: rank 0 decides, every rank learns the decision."""
    decided = _decide(folder, force) if world.is_main else Claim(None, None)
    go = distributed.all_sum(torch.tensor([int(decided.skipped is None)]), world)
    if world.distributed and not world.is_main and int(go) == 0:
        decided = Claim("skipped by rank 0", None)
    try:
        yield decided
    finally:
        if decided.lock is not None:
            decided.lock.release()


def keep_previous(folder: Path) -> None:
    """Move a completed run's results into previous/ (force=true), replacing an older copy."""
    previous = folder / PREVIOUS
    shutil.rmtree(previous, ignore_errors=True)
    previous.mkdir()
    for item in folder.iterdir():
        if item.name not in KEEP and item.name != "checkpoints":
            item.rename(previous / item.name)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)
    log.info(
        "force=true: the completed results of %s are kept in %s until this attempt completes",
        folder.name,
        previous,
    )


def settle(folder: Path, succeeded: bool) -> None:
    """After an attempt: drop previous/ on success; on failure put it back (the failed attempt's
    record stays beside it as run.failed.json)."""
    previous = folder / PREVIOUS
    if not previous.is_dir():
        return
    if succeeded:
        shutil.rmtree(previous, ignore_errors=True)
        return
    for name, kept_as in (
        (RECORD, FAILED_RECORD),
        ("train.log", FAILED_LOG),
        (provenance.DIFF_FILE, FAILED_DIFF),
    ):
        if (folder / name).exists():
            (folder / name).replace(folder / kept_as)
    shutil.rmtree(folder / "checkpoints", ignore_errors=True)  # the failed attempt's
    for item in previous.iterdir():
        target = folder / item.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        item.rename(target)
    previous.rmdir()
    log.warning(
        "the forced attempt failed: the completed results of %s are restored "
        "(the failed attempt's record: %s)",
        folder.name,
        folder / FAILED_RECORD,
    )
