"""uapt-train: compose ► validate ► identity ► claim ► model, data, teacher ► loop ► evaluate ► record.

    uapt-train model=tiny dataset=arith objective=masked_mle_distill trainer.max_steps=20
    uapt-train sweep=demo            # a grid from sweeps/ (Hydra multirun)

This module runs one run from its config to its record: it builds the pieces (uapt.models,
uapt.data, the teacher), hands them to the loop (uapt.loop), evaluates the trained model
(uapt.evaluation) and keeps the record (uapt.records). Everything a run produces lands in its run
folder; only the process group that holds the run's lock writes there (uapt.run_folder).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from uapt import (
    distributed,
    evaluation,
    files,
    fsdp,
    inputs,
    plan,
    provenance,
    records,
    run_folder,
    run_lock,
    teacher_cache,
    tune,
)
from uapt.batches import BatchStream
from uapt.config import refuse_renamed_keys
from uapt.console import setup_logging
from uapt.data import build_datasets
from uapt.errors import UserError, show_traceback
from uapt.evaluation import outcomes
from uapt.loop import (
    Interrupted,
    Trainer,
    resume,
    run_loop,
    validation_loss,
)
from uapt.models import (
    AdaptersOff,
    compile_layers,
    load_model,
    load_tokenizer,
    make_teacher,
)
from uapt.objectives import Objective
from uapt.packing import check_packing, use_rows_attention
from uapt.paths import CONF_DIR, publishable
from uapt.schema import ConfigError
from uapt.sections import RunConfig, TrainerConfig
from uapt.sweeps import in_multirun, record_outcome
from uapt.tracking import Tracker

log = logging.getLogger("uapt")


def pick_device(name: str, world: distributed.World) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and world.distributed:
        return torch.device("cuda", world.local_rank)
    return torch.device(name)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)


# ----------------------------------------------------------------------------- one run
@dataclass
class Components:
    tokenizer: Any
    train_set: Any
    val_set: Any
    data_stats: dict[str, Any]
    model: torch.nn.Module  # the bare model (what is saved and evaluated; sharded under FSDP)
    runner: torch.nn.Module  # what runs forward in training: the model or its DDP wrapper
    teacher: torch.nn.Module | teacher_cache.TeacherCache | None


def build(cfg: RunConfig, device: torch.device, world: distributed.World) -> Components:
    tokenizer = load_tokenizer(cfg.model, cfg.cache_dir)
    train_set, val_set, stats = build_datasets(cfg.dataset, tokenizer, cfg.seed, cfg.cache_dir)
    torch.manual_seed(cfg.seed)  # init depends on the seed only, not on what data loading drew
    model = load_model(cfg.model, tokenizer, cfg.cache_dir, device)
    model.train()
    if cfg.trainer.packing:  # refused here, before any step, for a model that cannot
        use_rows_attention(model)
        check_packing(model, cfg.model.name, len(tokenizer))
    teacher = None
    if cfg.objective.needs_teacher and cfg.objective.teacher == "cached":
        teacher = teacher_cache.open_cache(model, cfg.objective, cfg.cache_dir)
    elif cfg.objective.needs_teacher:
        teacher = make_teacher(model, cfg.model)
    return Components(tokenizer, train_set, val_set, stats, model, model, teacher)


def data_stream(cfg: RunConfig, parts: Components, world: distributed.World) -> BatchStream:
    """The run's training rows in their seeded order, as this rank reads them."""
    trainer = cfg.trainer
    return BatchStream(
        parts.train_set,
        trainer.micro_batch_size,
        cfg.seed,
        parts.tokenizer.pad_token_id,
        world.rank,
        world.world_size,
        trainer.accumulation(world.world_size),
        max_tokens=trainer.max_tokens_per_micro_batch,
        packed=trainer.packing,
    )


def probe_rows(val_set: Any, trainer: TrainerConfig) -> list[dict[str, Any]]:
    """The curriculum probe: the first global batch's worth of validation rows (fixed)."""
    return [val_set[i] for i in range(min(trainer.batch_size, len(val_set)))]


def make_trainer(
    cfg: RunConfig,
    parts: Components,
    stream: BatchStream,
    device: torch.device,
    world: distributed.World,
) -> Trainer:
    """The loop's state for this run: the model that runs forward, its optimizer and schedule."""
    return Trainer(
        config=cfg.trainer,
        objective=Objective(cfg.objective),
        seed=cfg.seed,
        runner=parts.runner,
        teacher=parts.teacher,
        stream=stream,
        device=device,
        world=world,
    )


def fill_teacher_cache(cfg: RunConfig, parts: Components, stream: BatchStream) -> None:
    """Compute every row this rank will read from the teacher cache and that is not there yet
    (its training rows and the probe). Runs before any step or checkpoint load, while the
    model still holds the initial weights: the teacher."""
    cache = parts.teacher
    if not isinstance(cache, teacher_cache.TeacherCache):
        return
    rows = [row for step in range(cfg.trainer.max_steps) for row in stream.rank_rows(step)]
    rows += probe_rows(parts.val_set, cfg.trainer)
    cache.fill(parts.model, rows, stream.micro_batch_size, stream.pad_id)
    log.info(
        "teacher cache %s: %d rows computed, %d reused", cache.folder, cache.computed, cache.reused
    )


def parallelize(
    cfg: RunConfig, parts: Components, device: torch.device, world: distributed.World
) -> None:
    """Several ranks: DDP (a whole copy per rank), or with trainer.fsdp weights, gradients and
    optimizer state sharded (FSDP2); then torch.compile of the decoder layers when wanted. Runs
    after rank 0 alone scored the base model."""
    if world.distributed and not cfg.trainer.fsdp:
        ids = [device.index] if device.type == "cuda" else None
        parts.runner = torch.nn.parallel.DistributedDataParallel(parts.model, device_ids=ids)
    elif world.distributed:
        fsdp.shard(parts.model, mixed_precision=cfg.trainer.precision == "bf16")
        if parts.teacher is not None and not isinstance(parts.teacher, AdaptersOff):
            fsdp.shard(parts.teacher)  # a frozen copy; LoRA's teacher is the (sharded) student
    if compile_wanted(cfg.trainer.compile, device):
        compile_layers(parts.model)


# Where torch.compile of the decoder layers pays, by device type (docs/performance.md, "Compiled
# step"): measured on CPU; not measured on CUDA (no GPU was lent), so off there until it is.
COMPILE_PAYS = {"cpu": False, "cuda": False}


def compile_wanted(setting: str | bool, device: torch.device) -> bool:
    return COMPILE_PAYS.get(device.type, False) if setting == "auto" else bool(setting)


def model_source(model: torch.nn.Module, cache_dir: str) -> dict[str, Any]:
    """Where the weights came from: a hub id or folder (`<cache>/...` inside uapt's cache), plus
    the embedded copy's provenance."""
    path = str(getattr(model, "name_or_path", "") or "") or None
    marker = Path(path) / "uapt_source.json" if path else None
    embedded = json.loads(marker.read_text()) if marker and marker.is_file() else None
    return {"path": path and publishable(path, cache_dir), "embedded": embedded}


def base_model_scores(cfg: RunConfig, parts: Components, device: torch.device) -> dict:
    """The initial model's suite scores and per-sample outcomes, from the cache or evaluated now
    (before any step)."""
    suite = cfg.plain["eval"]  # as written: the base-score cache is keyed by it

    def evaluate() -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            result = evaluate_phase("the initial model", parts, suite, device, out_dir=Path(tmp))
            return {**result, "outcomes": outcomes.read_lines(Path(tmp)) or []}

    return evaluation.base_scores(
        cfg.model, suite, cfg.cache_dir, init_seed=cfg.seed, inputs=cfg.inputs, evaluate_fn=evaluate
    )


def evaluate_phase(
    what: str, parts: Components, suite: Mapping[str, Any], device: torch.device, **kwargs: Any
) -> dict[str, Any]:
    """One phase on the terminal: a line before, one per task (uapt.evaluation), lm-eval's own
    output in the run's log file."""
    log.info("evaluating %s on eval=%s", what, suite.get("name"))
    return evaluation.run_suite(parts.model, parts.tokenizer, suite, device=device, **kwargs)


def train(
    cfg: RunConfig,
    folder: Path,
    record: records.RunRecord | None,
    tracker: Tracker | None,
    world: distributed.World,
    lock: run_lock.RunLock | None = None,
) -> None:
    """Train (and evaluate) one run in `folder`. Only rank 0 has a record, a tracker and the
    run's lock (checked at every step: a process frozen past the lock's staleness stops)."""
    trainer = cfg.trainer
    device = pick_device(trainer.device, world)
    seed_everything(cfg.seed, trainer.deterministic)
    started = time.perf_counter()
    parts = build(cfg, device, world)
    pad = parts.tokenizer.pad_token_id
    stream = data_stream(cfg, parts, world)
    fill_teacher_cache(cfg, parts, stream)
    base = base_model_scores(cfg, parts, device) if world.is_main else {}
    distributed.barrier(world)
    parallelize(cfg, parts, device, world)

    loop = make_trainer(cfg, parts, stream, device, world)
    loop.probe, loop.val_set = probe_rows(parts.val_set, trainer), parts.val_set
    checkpoints = folder / "checkpoints"
    metrics = resume(loop, parts.model, checkpoints, folder / "metrics.jsonl", world)
    if record:
        record.update(
            model_source=model_source(parts.model, cfg.cache_dir),
            data=parts.data_stats,
            resumed_from_step=loop.step or None,
            teacher_cache=teacher_cache.describe(parts.teacher),
            timings={"setup_s": round(time.perf_counter() - started, 2)},
        )

    run_loop(loop, checkpoints, metrics, tracker, lock)
    train_s = time.perf_counter() - started
    metrics["val/loss"] = validation_loss(parts.model, parts.val_set, trainer, pad, device)
    if fsdp.is_sharded(parts.model):  # every rank gathers; rank 0 saves and evaluates a copy
        parts.model = fsdp.unsharded_copy(
            parts.model, lambda: load_model(cfg.model, parts.tokenizer, cfg.cache_dir, device)
        )
    log.info(
        "step %d  loss %.4f  val/loss %.4f",
        loop.step,
        metrics.get("train/loss", math.nan),
        metrics["val/loss"],
    )
    if not record:
        return
    if trainer.save_model:
        save_model(parts.model, parts.tokenizer, folder / "model")
    record.update(metrics=metrics, timings={**record.data["timings"], "train_s": round(train_s, 2)})
    tracker.summary(metrics)
    evaluate_run(cfg, parts, device, folder, base, record, tracker)


def evaluate_run(
    cfg: RunConfig,
    parts: Components,
    device: torch.device,
    folder: Path,
    base: dict,
    record: records.RunRecord,
    tracker: Tracker,
) -> None:
    """The eval suite on the trained model, with the base model's scores and the delta to them.

    Evaluation uses one fixed seed (run_suite's) for every run and the base model alike, so all
    of them see the same few-shot examples and sampling draws."""
    started = time.perf_counter()
    result = evaluate_phase("the trained model", parts, cfg.plain["eval"], device, out_dir=folder)
    if not result:
        return
    result["eval_base"] = base.get("eval", {})
    result["eval_delta"] = evaluation.score_delta(result["eval"], result["eval_base"])
    if base.get("outcomes"):  # the base model's, beside the run's own: paired by sample
        outcomes.write(folder, base["outcomes"], outcomes.BASE_FILE)
    timings = {**record.data["timings"], "eval_s": round(time.perf_counter() - started, 2)}
    record.update(**result, timings=timings)
    tracker.log_eval(result)


def save_model(model: torch.nn.Module, tokenizer: Any, target: Path) -> None:
    """The final weights as a loadable folder (`model.path=<run>/model`), published atomically."""
    with files.staging_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def execute(plain: Mapping[str, Any]) -> dict[str, Any]:
    """Run one config to completion (or skip it); returns a short outcome for sweep summaries."""
    state = provenance.tree_state()

    def refuse_dirty(checked: RunConfig) -> None:  # under require_clean: before any write
        provenance.check_launch(state, checked.require_clean, study=announces_study(checked))

    # every key checked before anything is read, loaded or created (the plan's own check)
    cfg = plan.checked_run(plain, before_inputs=refuse_dirty)
    folder = records.run_dir(cfg.plain)
    ids = {"id": records.run_id(cfg.plain), "slug": records.run_slug(cfg.plain)}
    outcome = {**ids, "dir": str(folder)}
    if cfg.trainer.nproc > 1 and not distributed.under_torchrun():
        return relaunch(cfg, folder, outcome)
    world = distributed.init(pick_device(cfg.trainer.device, distributed.World()))
    with run_folder.claim(folder, cfg.force, world) as claim:
        if claim.skipped:
            return skipped(outcome, claim.skipped, folder)
        return train_claimed(cfg, folder, outcome, world, claim.lock, state)


def announces_study(cfg: RunConfig) -> bool:
    """Whether this process warns about a study launched from a dirty tree: a single run with
    `experiment` set. A sweep warns once when it starts (uapt.sweeps), and the ranks uapt
    relaunched under torchrun leave it to the process that launched them."""
    return bool(cfg.experiment) and not in_multirun() and not run_lock.inherited()


def skipped(outcome: dict[str, Any], reason: str, folder: Path) -> dict[str, Any]:
    hint = " (force=true to override)" if reason == run_folder.COMPLETED else ""
    log.info("%s %s in %s: not training again%s", outcome["slug"], reason, folder, hint)
    return {**outcome, "status": "skipped", "reason": reason}


def relaunch(cfg: RunConfig, folder: Path, outcome: dict[str, Any]) -> dict[str, Any]:
    """`trainer.nproc > 1`: this process claims the run and runs it under torchrun."""
    world = distributed.World()
    with run_folder.claim(folder, cfg.force, world) as claim:
        if claim.skipped:
            return skipped(outcome, claim.skipped, folder)
        nproc = cfg.trainer.nproc
        log.info("launching %d processes with torchrun", nproc)
        env = {run_lock.INHERITED_ENV: str(claim.lock.path)} if claim.lock else {}
        env[provenance.ARGV_ENV] = os.environ.get(provenance.ARGV_ENV) or json.dumps(
            provenance.typed_argv()
        )
        # the ranks must not move previous results again: this process did
        argv = [*hydra_overrides(), "hydra.mode=RUN", *(["force=false"] if cfg.force else [])]
        code = distributed.relaunch_with_torchrun(nproc, argv, env)
        status = (run_folder.heal_record(folder) or {}).get("status", "failed")
        if code or status != "completed":
            run_folder.settle(folder, succeeded=False)
            raise RuntimeError(f"torchrun exited with {code}; see {folder / 'train.log'}")
        run_folder.settle(folder, succeeded=True)
        return {**outcome, "status": status}


def train_claimed(
    cfg: RunConfig,
    folder: Path,
    outcome: dict[str, Any],
    world: distributed.World,
    lock: run_lock.RunLock | None,
    state: provenance.TreeState | None = None,
) -> dict[str, Any]:
    """Train a run this process group holds; rank 0 keeps the record (with the provenance of the
    code in `state`), the log and W&B."""
    record = tracker = handler = None
    if world.is_main:
        code = provenance.snapshot(state=state)
        record = records.RunRecord.start(folder, cfg.plain, world.world_size, code)
        handler = attach_file_log(folder / "train.log")
        tracker = Tracker(folder, cfg.plain, outcome["id"], outcome["slug"])
    failed = True
    try:
        train(cfg, folder, record, tracker, world, lock)
        if record:
            record.complete()
            log.info("completed %s -> %s", outcome["slug"], folder / "run.json")
        failed = False
        return {**outcome, "status": "completed"}
    except BaseException as e:
        if record:
            record.fail(e)
        raise
    finally:
        if tracker:
            tracker.finish(failed=failed)
        if handler:
            logging.getLogger().removeHandler(handler)
            handler.close()
        if world.is_main and not run_lock.inherited():
            run_folder.settle(folder, succeeded=not failed)


def hydra_overrides() -> list[str]:
    """The command line of this run, for relaunching it under torchrun."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task)


def attach_file_log(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger().addHandler(handler)
    return handler


def main() -> None:
    """uapt-train: the command line (sys.argv) composed by Hydra and run. A renamed key among
    the overrides stops it first, naming the new key (exit status 2)."""
    try:
        refuse_renamed_keys(sys.argv[1:])
    except ConfigError as e:
        setup_logging()
        if show_traceback():
            raise
        log.error("bad configuration: %s", e)
        raise SystemExit(2) from None
    run_command()


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def run_command(cfg: DictConfig) -> dict[str, Any]:
    """One run (or, under a multirun, one grid point) of the composed config."""
    setup_logging()
    multirun = in_multirun()
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
        if not multirun and (plain.get("plan") or {}).get("enabled"):  # a multirun's: PlanCheck
            print("\n".join(plan.plan_run(plain, hydra_overrides())), flush=True)
            return {"status": "planned"}
        outcome = execute(plain)
    except UserError as e:  # a bad config, data file, model source or damaged file: named
        if not multirun:
            if show_traceback():
                raise
            log.error("%s: %s", "bad configuration" if isinstance(e, ConfigError) else "error", e)
            raise SystemExit(2) from None
        outcome = failed_outcome(cfg, f"{type(e).__name__}: {e}")
    except Interrupted as e:  # a signal: the checkpoint is written; stop (the whole sweep too)
        log.warning("%s", e)
        raise SystemExit(130) from None
    except Exception as e:
        if not multirun:
            raise
        log.exception("run failed; the sweep goes on")
        outcome = failed_outcome(cfg, f"{type(e).__name__}: {e}")
    if multirun:
        record_outcome(outcome)
    metric = tune.trial_metric()  # a tuning sweep's trial: the study wants a number
    return tune.trial_value(outcome, metric) if metric else outcome


def failed_outcome(cfg: DictConfig, error: str) -> dict[str, Any]:
    try:
        plain = inputs.with_fingerprints(OmegaConf.to_container(cfg, resolve=True))
        ids = {"id": records.run_id(plain), "slug": records.run_slug(plain)}
    except Exception:
        ids = {"id": None, "slug": None}
    return {**ids, "status": "failed", "error": error}


def cli() -> None:
    """`uapt-train`: `plan=true` and `+plan=true` (the words a user tries) mean `plan=on`."""
    sys.argv = plan.normalized_argv(sys.argv)
    main()


if __name__ == "__main__":
    cli()
