"""Nothing lost, nothing silently reused: one writer per run, shareable folders, state that heals,
local inputs in the run id. Faults are injected by hand (a held lock, a stale lock, damaged
files, a second uid) and the user-facing outcome is checked, mostly through `uapt-train`."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, TINY, env, metric_rows, records, train

from uapt import checkpoint, files, run_lock
from uapt.run_lock import RunHeld, RunLock

SHORT = [*TINY, "trainer.max_steps=3"]
# a local file instead of the generated task (whose dataset.* keys do not apply to it)
LOCAL = [a for a in SHORT if not a.startswith("dataset")] + ["dataset=gsm8k"]


def run_folder_of(*overrides: str) -> Path:
    """The folder `uapt-train <overrides>` would use (composed and fingerprinted as it does)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from uapt import inputs, records

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    return records.run_dir(inputs.with_fingerprints(OmegaConf.to_container(cfg, resolve=True)))


def strict_json(path: Path):
    """Parse as strict JSON: NaN, Infinity and -Infinity are errors."""

    def refuse(name: str):
        raise ValueError(f"{path}: bare {name} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


# ----------------------------------------------------------------------------- one writer
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
    outs = [p.communicate(timeout=600)[0] for p in procs]
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


def test_a_held_sweep_point_counts_as_skipped(tmp_path):
    base = [*SHORT, f"runs_dir={tmp_path}", "experiment=held"]
    held = run_folder_of(*base, "objective=mle")
    held.mkdir(parents=True)
    with RunLock(held):
        proc = train("-m", *base, "objective=mle,masked_mle", check=True)
    assert "sweep: 1 completed, 1 skipped, 0 failed" in proc.stdout


# ----------------------------------------------------------------------------- shareable
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


# ----------------------------------------------------------------------------- healing
def test_a_damaged_record_is_set_aside_and_the_run_redone(tmp_path):
    args = [*SHORT, f"runs_dir={tmp_path}"]
    train(*args, check=True)
    (folder,) = tmp_path.glob("tiny-*")
    (folder / "run.json").write_bytes(b'{"status": "compl\xff')  # torn, and not even UTF-8
    (folder / "run.json.3f2a.tmp").write_text("{")  # a kill mid-write, before uapt 0.2
    proc = train(*args, check=True)
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "is damaged" in out and "run.json" in out
    (aside,) = folder.glob("run.json.damaged-*")
    assert aside.read_bytes().startswith(b'{"status"')
    assert strict_json(folder / "run.json")["status"] == "completed"
    assert not list(folder.glob("*.tmp"))
    # uapt-table reads past a damaged record, naming it
    (folder / "run.json").write_bytes(b"\xff\xfe not json")
    from uapt.table import load_runs

    runs, problems = load_runs([tmp_path])
    assert runs == [] and any("run.json: not UTF-8" in p for p in problems)


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    args = [*TINY, "trainer.max_steps=200", "trainer.checkpoint_every=1", f"runs_dir={tmp_path}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "uapt.train", *args],
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while time.time() < deadline and len(list(tmp_path.glob("tiny-*/checkpoints/step-*"))) < 2:
        time.sleep(0.05)
    proc.kill()
    proc.wait()
    (folder,) = tmp_path.glob("tiny-*")
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 1.2')  # the kill cut this row short
    done = train(*args, check=True)
    assert "dropping a damaged metrics row" in done.stdout + done.stderr
    assert [r["step"] for r in metric_rows(folder)] == list(range(1, 201))


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(3))


def test_a_checkpoint_that_does_not_load_falls_back_to_the_older_one(tmp_path, caplog):
    model = _Tiny()
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    for step in (1, 2):
        with torch.no_grad():
            model.w.fill_(step)
        checkpoint.save(tmp_path, model, opt, sched, checkpoint.TrainingState(step, {}, None), 2)
    newest = tmp_path / "step-00000002"
    (newest / "optimizer.pt").write_bytes(b"not a pickle at all")
    files.write_manifest(newest, step=2)  # the manifest matches: the damage is in the content
    with caplog.at_level("WARNING"):
        path, state = checkpoint.restore(tmp_path, model, opt, sched)
    assert state.step == 1 and path.name == "step-00000001"
    assert torch.equal(model.w.detach(), torch.ones(3))
    assert "does not load" in caplog.text and str(newest) in caplog.text


def test_damaged_cache_entries_are_rebuilt(tmp_path, caplog, tiny_tokenizer):
    from uapt.data import build_datasets
    from uapt.models import tiny_tokenizer as build_tiny_tokenizer

    cache = tmp_path / "cache"
    # the tiny tokenizer: a torn tokenizer.json
    first = build_tiny_tokenizer(cache)
    (tok_dir,) = (cache / "tokenizers").iterdir()
    (tok_dir / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with caplog.at_level("WARNING"):
        again = build_tiny_tokenizer(cache)
    assert again.get_vocab() == first.get_vocab()
    assert "does not load" in caplog.text and str(tok_dir) in caplog.text
    # the tokenised data: a flipped byte in an arrow file
    cfg = {
        "name": "qa",
        "source": str(REPO / "tests/fixtures/data/qa.jsonl"),
        "format": "qa",
        "prompt_field": "q",
        "response_field": "a",
    }
    train_set, _, _ = build_datasets(cfg, tiny_tokenizer, 0, cache)
    expected = list(train_set["input_ids"])  # a copy: the dataset maps the file it reads
    (arrow,) = (cache / "datasets").glob("*/splits/train/*.arrow")
    data = bytearray(arrow.read_bytes())
    data[len(data) // 2] ^= 0xFF
    arrow.write_bytes(bytes(data))
    caplog.clear()
    with caplog.at_level("WARNING"):
        rebuilt, _, _ = build_datasets(cfg, tiny_tokenizer, 0, cache)
    assert list(rebuilt["input_ids"]) == expected
    assert "is damaged" in caplog.text and "does not match its checksum" in caplog.text


def test_a_damaged_teacher_row_is_recomputed_when_filling(
    tmp_path, caplog, tiny_model, tiny_tokenizer
):
    from uapt.teacher_cache import TeacherCache, weights_fingerprint

    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "labels": [-100, -100, 7, 8, 9]},
        {"input_ids": [5, 9, 7], "labels": [-100, 9, 7]},
    ]
    cache = TeacherCache(tmp_path, weights_fingerprint(tiny_model), k=4, temperature=1.0)
    cache.fill(tiny_model, rows, batch_size=2, pad_id=tiny_tokenizer.pad_token_id)
    (victim, *_) = sorted(cache.folder.glob("*.safetensors"))
    victim.write_bytes(victim.read_bytes()[:20])  # cut short
    again = TeacherCache(tmp_path, weights_fingerprint(tiny_model), k=4, temperature=1.0)
    with caplog.at_level("WARNING"):
        again.fill(tiny_model, rows, batch_size=2, pad_id=tiny_tokenizer.pad_token_id)
    assert (again.computed, again.reused) == (1, 1)
    assert "is damaged" in caplog.text and victim.name in caplog.text


def test_a_failed_forced_attempt_keeps_the_completed_result(tmp_path):
    args = [*SHORT, f"runs_dir={tmp_path}"]
    train(*args, check=True)
    (folder,) = tmp_path.glob("tiny-*")
    before = strict_json(folder / "run.json")
    model_bytes = (folder / "model" / "model.safetensors").read_bytes()
    # device is not part of the run id: the same run, forced, fails on a machine without CUDA
    failed = train(*args, "force=true", "trainer.device=cuda")
    assert failed.returncode != 0
    assert strict_json(folder / "run.json") == before
    assert (folder / "model" / "model.safetensors").read_bytes() == model_bytes
    assert strict_json(folder / "run.failed.json")["status"] == "failed"
    assert not (folder / "previous").exists()
    train(*args, "force=true", check=True)  # a forced attempt that completes replaces it
    after = strict_json(folder / "run.json")
    assert after["status"] == "completed" and after["started_at"] != before["started_at"]
    assert not (folder / "previous").exists()


# ----------------------------------------------------------------------------- identity
def test_editing_a_local_data_file_is_a_new_run(tmp_path):
    data = tmp_path / "qa.jsonl"
    shutil.copy(REPO / "tests/fixtures/data/qa.jsonl", data)
    args = [
        *LOCAL,
        f"runs_dir={tmp_path / 'runs'}",
        "dataset.name=qa",
        f"dataset.source={data}",
        "dataset.prompt_field=q",
        "dataset.response_field=a",
        "dataset.val_size=1",
    ]
    train(*args, check=True)
    (first,) = records(tmp_path / "runs")
    digest = files.sha256(data)
    assert first["config"]["inputs"] == {"dataset.source": f"sha256:{digest}"}
    os.utime(data)  # touched, not changed: the same run
    assert "already completed" in train(*args, check=True).stdout
    with data.open("a") as f:
        f.write(json.dumps({"q": "What is 9 + 9?", "a": "9 + 9 = 18.\n#### 18"}) + "\n")
    train(*args, check=True)
    ids = {r["id"] for r in records(tmp_path / "runs")}
    assert len(ids) == 2 and first["id"] in ids


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("trainer.lr=inf", "trainer.lr=inf is not a finite number > 0"),
        ("seed=300000000000", "seed=300000000000 is not an integer in [0, 4294967295]"),
        (
            "model.tokenizer=./no-such-tokenizer",
            "model.tokenizer='./no-such-tokenizer': no such local folder",
        ),
        (
            "model.path=no-such-org/no-such-model",
            "model.path='no-such-org/no-such-model': cannot be loaded",
        ),
    ],
)
def test_bad_input_exits_2_naming_it_before_writing(tmp_path, override, needle):
    proc = train(*SHORT, override, f"runs_dir={tmp_path}")
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out[-2000:]
    assert needle in out and "Traceback" not in out
    if "model.path" not in override:  # the config checks run before any folder is made
        assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_data_exits_2_naming_file_and_line(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    good = json.dumps({"q": "1 + 1?", "a": "2"})
    body = (
        (good + "\n" + '{"q": "caf\xe9?", "a": "x"}\n')
        if suffix == ".jsonl"
        else f"[{good},\n" + '{"q": "caf\xe9?", "a": "x"}]'
    )
    path.write_bytes(body.encode("latin-1"))
    proc = train(
        *LOCAL,
        f"dataset.source={path}",
        "dataset.val_size=0",
        "dataset.prompt_field=q",
        "dataset.response_field=a",
        f"runs_dir={tmp_path / 'runs'}",
    )
    out = " ".join((proc.stdout + proc.stderr).split())
    assert proc.returncode == 2, out[-2000:]
    assert f"{path}:2: not UTF-8 (byte 0xe9)" in out and "Traceback" not in out


def test_the_largest_seed_trains(tmp_path):
    train(
        *SHORT,
        "seed=4294967295",
        "objective=masked_mle",
        "objective.select=random",
        f"runs_dir={tmp_path}",
        check=True,
    )
    (record,) = records(tmp_path)
    assert record["status"] == "completed"


def test_run_records_are_strict_json(tmp_path):
    train(*SHORT, f"runs_dir={tmp_path}", check=True)  # mle: nothing unkept, nll/unkept is NaN
    (folder,) = tmp_path.glob("tiny-*")
    record = strict_json(folder / "run.json")
    assert record["metrics"]["train/nll/unkept"] == "nan"
