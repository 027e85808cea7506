"""One writer per run folder: a held run is left alone and named, two launches at once train
once, stale locks are taken over and a holder that lost its lock stops. Locks are held and
faked by hand; the outcome is checked through `uapt-train` where a user would see it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO, TINY, env, metric_rows, records, train

from uapt import run_lock
from uapt.run_lock import RunHeld, RunLock

SHORT = [*TINY, "trainer.max_steps=3"]


def run_folder_of(*overrides: str) -> Path:
    """The folder `uapt-train <overrides>` would use (composed and fingerprinted as it does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from uapt import inputs, records

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return records.run_dir(inputs.with_fingerprints(OmegaConf.to_container(cfg, resolve=True)))


@pytest.mark.slow
def test_a_held_run_is_left_alone_and_named(tmp_path):
    args = [*SHORT, f"runs_dir={tmp_path}"]
    folder = run_folder_of(*args)
    folder.mkdir(parents=True)
    partial = folder / "checkpoints" / ".step-00000002.x.tmp"
    partial.mkdir(parents=True)  # the holder's checkpoint being written
    with RunLock(folder) as lock:
        proc = train(*args, check=True)
        out = proc.stdout + proc.stderr
        assert "held by another process" in out
        assert f"pid {os.getpid()}" in " ".join(out.split())  # rich may wrap the line
        assert lock.owned()
    assert partial.is_dir()  # only the holder cleans up partial files
    assert not (folder / "run.json").exists() and not (folder / "metrics.jsonl").exists()


@pytest.mark.slow
def test_two_launches_at_once_train_once(tmp_path):
    args = [*TINY, "trainer.max_steps=30", "trainer.checkpoint_every=1", f"runs_dir={tmp_path}"]
    command = [sys.executable, "-m", "uapt.train", *args]
    procs = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    try:
        outs = [p.communicate(timeout=600)[0] for p in procs]
    finally:  # a test that failed or timed out leaves no run behind
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outs
    (record,) = records(tmp_path)
    assert record["status"] == "completed" and record["attempts"] == 1
    (folder,) = tmp_path.glob("tiny-*")
    assert [r["step"] for r in metric_rows(folder)] == list(range(1, 31))  # no duplicate rows
    stepped_aside = [o for o in outs if "held by another process" in o or "already completed" in o]
    assert len(stepped_aside) == 1, outs


def test_stale_locks_are_taken_over(tmp_path, caplog):
    # a holder killed on this host: its pid is gone
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    lock_file = tmp_path / run_lock.LOCK_NAME
    lock_file.write_text(
        json.dumps(
            {"pid": int(dead.stdout), "host": socket.gethostname(), "since": "then", "token": "x"}
        )
    )
    with caplog.at_level("WARNING", logger="uapt"), RunLock(tmp_path) as lock:
        assert lock.owned()
    assert (
        "taking over the stale lock" in caplog.text and "is not running on this host" in caplog.text
    )
    assert not lock_file.exists()  # released
    # a holder on another node: alive while its heartbeat is fresh, stale once it stopped
    lock_file.write_text(
        json.dumps({"pid": 1, "host": "other-node", "since": "then", "token": "y"})
    )
    with pytest.raises(RunHeld, match="held by pid 1 on host other-node since then"):
        RunLock(tmp_path).acquire()
    old = time.time() - run_lock.STALE_S - 60
    os.utime(lock_file, (old, old))
    with RunLock(tmp_path) as lock:
        assert lock.owned()


def test_a_frozen_holder_that_lost_its_lock_stops(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    try:
        lock.path.unlink()  # another launcher judged us stale and took over
        RunLock(tmp_path).acquire()
        assert lock.beat() is False
        with pytest.raises(RunHeld, match="taken over"):
            lock.check()
    finally:
        lock.release()


@pytest.mark.slow
def test_a_held_sweep_point_counts_as_skipped(tmp_path):
    base = [*SHORT, f"runs_dir={tmp_path}", "experiment=held"]
    held = run_folder_of(*base, "objective=mle")
    held.mkdir(parents=True)
    with RunLock(held):
        proc = train("-m", *base, "objective=mle,masked_mle", check=True)
    assert "sweep: 1 completed, 1 skipped, 0 failed" in proc.stdout
