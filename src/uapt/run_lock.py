"""One writer per run: `<run>/run.lock`, held by the one process that trains the run.

The same command started twice (a sweep submitted twice, a requeued SLURM job overlapping its
predecessor, two people on a shared `runs_dir`) must train once. The lock is a small JSON file
(pid, host, since, a token) created with O_CREAT | O_EXCL, which is atomic on local file systems
and on NFS; while held, a thread of the holder refreshes its modification time every
HEARTBEAT_S. Another launcher that finds it

- steps aside, saying who holds the run (RunHeld), while the holder is alive: its pid runs on
  this host, or, on another host, the heartbeat is younger than STALE_S;
- takes it over with a warning when it is stale: the holder's pid is gone on this host, or the
  heartbeat stopped (a killed job on another node). The stale file is renamed away first, so of
  several launchers that find the same stale lock exactly one wins.

Under torchrun the launching process holds the lock for its ranks (UAPT_RUN_LOCK names it).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from uapt import files

log = logging.getLogger("uapt")

LOCK_NAME = "run.lock"
HEARTBEAT_S = 30.0
STALE_S = 300.0  # ten missed heartbeats: the holder is gone (or frozen for five minutes)
INHERITED_ENV = "UAPT_RUN_LOCK"  # set for torchrun's ranks: the parent holds this lock


class RunHeld(Exception):
    """Another live process holds the run; the message says which and since when."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('since', '?')}"


class RunLock:
    """`with RunLock(folder):` train; RunHeld when a live process holds the run."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.host = socket.gethostname()
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None
        self.lost: str | None = None  # set when another process took the lock from us

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # a rival is taking over a stale lock: look again shortly
            if self._create():
                self._start_heartbeat()
                return
            holder = self.holder()
            if holder is None:
                continue  # released between our create and our read
            why = self._stale(holder)
            if why is None:
                raise RunHeld(
                    f"{self.path.parent.name} is held by {describe(holder)} ({self.path})"
                )
            if not self._take_over(holder, why):
                time.sleep(0.1)
        raise RunHeld(f"{self.path.parent.name}: could not take the lock {self.path}")

    def _create(self) -> bool:
        record = {
            "pid": os.getpid(),
            "host": self.host,
            "since": datetime.now(UTC).isoformat(timespec="seconds"),
            "token": self.token,
        }
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, files.file_mode())
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock (None when there is no lock file); an unreadable file (a
        holder killed while writing it) reads as a holder with no pid, stale by its age."""
        try:
            text = self.path.read_text(encoding="utf-8", errors="replace")
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
        except ValueError:
            holder = {}
        return {**holder, "age_s": age} if isinstance(holder, dict) else {"age_s": age}

    def _stale(self, holder: dict[str, Any]) -> str | None:
        """Why the holder is gone, or None while it may be alive."""
        pid = holder.get("pid")
        if holder.get("host") == self.host and isinstance(pid, int) and not _alive(pid):
            return f"its pid {pid} is not running on this host"
        if holder["age_s"] > STALE_S:
            return f"its heartbeat stopped {holder['age_s']:.0f} s ago"
        return None

    def _take_over(self, holder: dict[str, Any], why: str) -> bool:
        """Remove the stale lock, under a short-lived takeover file so that of several launchers
        that judged it stale only one removes it (and never a rival's fresh lock)."""
        guard = self.path.with_name(f"{LOCK_NAME}.takeover")
        try:
            os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, files.file_mode()))
        except FileExistsError:
            with contextlib.suppress(OSError):  # a rival died mid-takeover: its guard is old
                if time.time() - guard.stat().st_mtime > 60:
                    guard.unlink()
            return False
        try:
            now = self.holder()
            if (
                now is None
                or now.get("token") != holder.get("token")
                or now.get("pid") != holder.get("pid")
            ):
                return False  # replaced meanwhile: look again
            self.path.unlink(missing_ok=True)
        finally:
            guard.unlink(missing_ok=True)
        log.warning(
            "taking over the stale lock of %s: %s was held by %s; %s",
            self.path.parent.name,
            self.path,
            describe(holder),
            why,
        )
        return True

    def release(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=5)
            self._beat = None
        if self.owned():
            self.path.unlink(missing_ok=True)

    def owned(self) -> bool:
        holder = self.holder()
        return holder is not None and holder.get("token") == self.token

    # ------------------------------------------------------------------ heartbeat
    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat = threading.Thread(target=self._heartbeat, name="uapt-run-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and self.beat():
            pass

    def beat(self) -> bool:
        """Refresh the lock's time; False (and `lost` set) when another process holds it now."""
        if not self.owned():
            holder = self.holder()
            self.lost = describe(holder) if holder else "nobody (the lock file is gone)"
            log.error("lost the lock %s: now held by %s", self.path, self.lost)
            return False
        with contextlib.suppress(OSError):
            os.utime(self.path)
        return True

    def check(self) -> None:
        """Raise RunHeld if another process took the lock (we were frozen past STALE_S)."""
        if self.lost:
            raise RunHeld(f"{self.path.parent.name}: the lock was taken over by {self.lost}")


def inherited() -> bool:
    """Whether a launching process holds this process's run lock (torchrun's ranks)."""
    return bool(os.environ.get(INHERITED_ENV))


def live_holder(folder: Path) -> dict[str, Any] | None:
    """Who holds the run's lock now: its record, or None when nobody does (no lock, or a stale
    one a launcher would take over). Reads only: for plans."""
    lock = RunLock(folder)
    holder = lock.holder()
    if holder is None or lock._stale(holder) is not None:
        return None
    return holder
