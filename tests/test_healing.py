"""State that heals: a damaged record, metrics row, checkpoint, cache entry or teacher row is
set aside (named in a warning) and rebuilt; a forced attempt that fails keeps the completed
result. Damage is done by hand to real files."""

from __future__ import annotations

import signal

import pytest
import torch
from helpers import REPO, TINY, metric_rows, signal_at_row, strict_json, train

from uapt import checkpoint, files

SHORT = [*TINY, "trainer.max_steps=3"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path):
    args = [*TINY, "trainer.max_steps=6", "trainer.checkpoint_every=1", f"runs_dir={tmp_path}"]
    # killed with two checkpoints written (steps 1 and 2), before row 3
    killed = signal_at_row(["-m", "uapt.train", *args], 3, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    (folder,) = tmp_path.glob("tiny-*")
    with (folder / "metrics.jsonl").open("a") as f:
        f.write('{"step": 2, "loss": 1.2')  # the kill cut this row short
    done = train(*args, check=True)
    assert "dropping a damaged metrics row" in done.stdout + done.stderr
    assert [r["step"] for r in metric_rows(folder)] == list(range(1, 7))


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


@pytest.mark.slow
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
