"""uapt-train: compose ► validate ► identity ► model, data, objective ► loop ► evaluate ► record.

    uapt-train model=tiny dataset=arith objective=masked_mle_distill trainer.max_steps=20
    uapt-train sweep=demo            # a grid from sweeps/ (Hydra multirun)

The loop knows nothing of which objective it runs: it hands logits (or hidden states) and labels
to uapt.objectives and steps the optimizer. Everything a run produces lands in its run folder.
"""

from __future__ import annotations

import json
import logging
import math
import random
import resource
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from uapt import (
    checkpoint,
    distributed,
    evaluation,
    files,
    fsdp,
    inputs,
    records,
    run_folder,
    run_lock,
    teacher_cache,
    tune,
)
from uapt.batches import BatchStream, select_global, to_device
from uapt.config import ConfigError, accumulation_steps, validate
from uapt.data import build_datasets, collate
from uapt.errors import UserError, show_traceback
from uapt.launch import preempt_signal
from uapt.models import (
    AdaptersOff,
    check_packing,
    compile_layers,
    hidden_states,
    load_model,
    load_tokenizer,
    make_teacher,
    use_rows_attention,
)
from uapt.models import logits as model_logits
from uapt.objectives import (
    Counts,
    ObjectiveSpec,
    TokenLoss,
    kept_overlap,
    needs_teacher,
    output_head,
    parse_objective,
    token_loss,
    token_loss_chunked,
    token_scores,
    token_scores_chunked,
)
from uapt.paths import CONF_DIR
from uapt.sweeps import in_multirun, record_outcome
from uapt.tracking import Tracker

log = logging.getLogger("uapt")


# ----------------------------------------------------------------------------- batches
def eval_batches(dataset: Any, size: int, pad_id: int, limit: int | None) -> Iterator[dict]:
    count = math.ceil(len(dataset) / size)
    for i in range(min(count, limit or count)):
        yield collate(
            [dataset[j] for j in range(i * size, min((i + 1) * size, len(dataset)))], pad_id
        )


# ----------------------------------------------------------------------------- schedule
def lr_lambda(trainer: Mapping[str, Any]):
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    warmup, total, floor = trainer["warmup_steps"], trainer["max_steps"], trainer["min_lr_ratio"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, trainer: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": trainer["weight_decay"]},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=trainer["lr"], betas=tuple(trainer["betas"]))


# ----------------------------------------------------------------------------- the loss
def _teacher_inputs(teacher, batch, objective: ObjectiveSpec, kept) -> tuple[Any, Any]:
    """(live teacher module or None, cached TeacherTopK or None) for one forward: the teacher is
    read for distillation, and for selection by excess loss when the forward selects."""
    needed = objective.distill_weight > 0 or (
        kept is None and objective.mask_ratio > 0 and objective.select == "excess"
    )
    if not needed or teacher is None:
        return None, None
    if isinstance(teacher, teacher_cache.TeacherCache):
        return None, teacher.lookup(batch)
    return teacher, None


def forward_loss(
    model: torch.nn.Module,
    teacher: torch.nn.Module | teacher_cache.TeacherCache | None,
    batch: Mapping[str, torch.Tensor],
    objective: ObjectiveSpec,
    bare: torch.nn.Module | None = None,
    *,
    kept: torch.Tensor | None = None,
    counts: Counts | None = None,
    packed: bool = False,
) -> TokenLoss:
    """The objective on one micro-batch: its share of the global batch's token means (`counts`),
    with the kept set selected here or handed in (`kept`). `model` runs forward (it may be a DDP
    wrapper); `bare` is the unwrapped model whose output layer the chunked path applies itself.
    The teacher is the frozen model (live) or a TeacherCache (read, never run). `packed`: the
    rows run as one sequence without padding (models.packed_forward); the objective sees them
    as rows all the same."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    teacher, cached = _teacher_inputs(teacher, batch, objective, kept)
    if objective.chunk_size:
        hidden = hidden_states(model, ids, mask, packed=packed)
        teacher_hidden = teacher_head = None
        if teacher is not None:
            with torch.no_grad():
                teacher_hidden = hidden_states(teacher, ids, mask, packed=packed)
            teacher_head = output_head(teacher)
        return token_loss_chunked(
            hidden,
            labels,
            objective,
            output_head(bare or model),
            teacher_hidden,
            teacher_head,
            chunk_size=objective.chunk_size,
            cached_teacher=cached,
            kept=kept,
            counts=counts,
        )
    student_logits = model_logits(model, ids, mask, packed=packed)
    teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_logits = model_logits(teacher, ids, mask, packed=packed)
    return token_loss(
        student_logits,
        labels,
        objective,
        teacher_logits,
        cached_teacher=cached,
        kept=kept,
        counts=counts,
    )


@torch.no_grad()
def forward_scores(
    model: torch.nn.Module,
    teacher: torch.nn.Module | teacher_cache.TeacherCache | None,
    batch: Mapping[str, torch.Tensor],
    objective: ObjectiveSpec,
    packed: bool = False,
) -> torch.Tensor:
    """Selection scores [B, T] of one micro-batch (no grad), for a selection over more rows."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    teacher, cached = _teacher_inputs(teacher, batch, objective, None)
    if objective.chunk_size:
        teacher_hidden = None
        if teacher is not None:
            teacher_hidden = hidden_states(teacher, ids, mask, packed=packed)
        return token_scores_chunked(
            hidden_states(model, ids, mask, packed=packed),
            labels,
            objective,
            output_head(model),
            teacher_hidden,
            output_head(teacher) if teacher is not None else None,
            chunk_size=objective.chunk_size,
            cached_teacher=cached,
        )
    teacher_logits = None
    if teacher is not None:
        teacher_logits = model_logits(teacher, ids, mask, packed=packed)
    student_logits = model_logits(model, ids, mask, packed=packed)
    return token_scores(student_logits, labels, objective, teacher_logits, cached_teacher=cached)


@torch.no_grad()
def validation_loss(model, dataset, trainer: Mapping[str, Any], pad_id: int, device) -> float:
    """Token-mean NLL of the assistant tokens of the validation split (objective-independent)."""
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(dataset, trainer["micro_batch_size"], pad_id, trainer["val_batches"]):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, reduction="sum")
        total, count = total + nll.item(), count + int((labels != -100).sum())
    model.train()
    return total / max(count, 1)


# ----------------------------------------------------------------------------- the loop
@dataclass
class Trainer:
    cfg: Mapping[str, Any]
    model: torch.nn.Module  # what runs forward: the model (sharded under FSDP) or its DDP wrapper
    teacher: torch.nn.Module | teacher_cache.TeacherCache | None
    stream: BatchStream
    device: torch.device
    world: distributed.World = field(default_factory=distributed.World)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    objective: ObjectiveSpec = field(init=False)
    step: int = 0
    probe: list[dict[str, Any]] = field(default_factory=list)  # fixed rows: the curriculum probe
    probe_kept: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.objective = parse_objective(self.cfg["objective"])
        self.optimizer = make_optimizer(self.model, self.cfg["trainer"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.cfg["trainer"])
        )

    @property
    def bare(self) -> torch.nn.Module:
        """The model without its DDP wrapper (its output layer feeds the chunked loss)."""
        ddp = torch.nn.parallel.DistributedDataParallel
        return self.model.module if isinstance(self.model, ddp) else self.model

    def autocast(self):
        if self.cfg["trainer"]["precision"] != "bf16":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def scores(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Selection scores of a micro-batch, for selections over more rows than it holds."""
        with self.autocast():
            return forward_scores(
                self.bare, self.teacher, batch, self.objective, self.cfg["trainer"]["packing"]
            )

    def train_step(self) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches of the global batch."""
        started, parts, tokens, computed = time.perf_counter(), [], 0, 0
        plan = self.stream.plan(self.step, self.objective, self.scores, self.world, self.device)
        for micro, batch in enumerate(plan.batches):
            last = micro == len(plan.batches) - 1
            sync = nullcontext() if last or not self.world.distributed else fsdp.no_sync(self.model)
            with sync, self.autocast():
                out = forward_loss(
                    self.model,
                    self.teacher,
                    batch,
                    self.objective,
                    self.bare,
                    kept=plan.kept[micro],
                    counts=plan.counts,
                    packed=self.cfg["trainer"]["packing"],
                )
                # out.total is this micro-batch's share of the global batch's token means: the
                # shares of all micro-batches and ranks sum to the step's loss. DDP and FSDP
                # average gradients over ranks, hence the factor.
                (out.total * self.world.world_size).backward()
            parts.append(out)
            tokens += int(batch["attention_mask"].sum())
            computed += tokens_computed(batch, self.cfg["trainer"]["packing"])
        clip = self.cfg["trainer"]["grad_clip"] or float("inf")
        grad_norm = fsdp.clip_grad_norm_(self.model.parameters(), clip)  # DTensor grads too
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        elapsed = time.perf_counter() - started
        metrics = loss_metrics(parts, self.world)
        tokens, computed = distributed.all_sum(
            torch.tensor([tokens, computed]), self.world
        ).tolist()
        return {
            **metrics,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "tokens_per_s": tokens / elapsed,
            "assistant_tokens_per_s": plan.counts.valid / elapsed,  # the tokens trained on
            "pad_frac": 1 - tokens / max(computed, 1),  # positions computed and thrown away
            "peak_mem_mb": peak_memory_mb(self.device),
        }

    @torch.no_grad()
    def probe_overlap(self) -> float | None:
        """Kept-set Jaccard overlap on a fixed probe batch since the last probe (the curriculum).
        Every rank scores the whole probe (no collective), a micro-batch at a time."""
        if not self.probe or not self.objective.mask_ratio:
            return None
        self.model.eval()
        size = self.stream.micro_batch_size
        own = [
            list(range(i, min(i + size, len(self.probe)))) for i in range(0, len(self.probe), size)
        ]
        batches = [
            to_device(collate([self.probe[j] for j in idx], self.stream.pad_id), self.device)
            for idx in own
        ]
        noise_key = lambda j: (self.cfg["seed"], "probe", j)  # noqa: E731
        kept = select_global(
            self.probe,
            own,
            batches,
            self.objective,
            self.scores,
            noise_key,
            distributed.World(),
            self.device,
        )
        self.model.train()
        previous, self.probe_kept = self.probe_kept, kept.cpu()
        return None if previous is None else kept_overlap(previous, self.probe_kept)


def tokens_computed(batch: Mapping[str, torch.Tensor], packed: bool) -> int:
    """Positions the model runs on: every padded position, or only the real tokens (packed)."""
    mask = batch["attention_mask"]
    return int(mask.sum()) if packed else mask.numel()


def loss_metrics(parts: list[TokenLoss], world: distributed.World) -> dict[str, float]:
    """The step's loss terms and token-mean diagnostics over all micro-batches and ranks."""
    sums = distributed.all_sum(torch.stack([p.sums() for p in parts]).sum(0), world)
    total, mle, distill, kept, valid, nll_kept, nll_unkept = sums.tolist()
    unkept = valid - kept
    return {
        "loss": total,
        "loss/mle": mle,
        "loss/distill": distill,
        "kept_frac": kept / max(valid, 1),
        "nll/kept": nll_kept / kept if kept else float("nan"),
        "nll/unkept": nll_unkept / unkept if unkept else float("nan"),
    }


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; re-running resumes it."""


class StopSignals:
    """The first SIGINT / SIGTERM / SIGUSR1 / SIGUSR2 asks the loop to checkpoint at the next step boundary
    and stop; a second one stops at once. A handler that was installed before (submitit's requeue
    on SLURM's pre-timeout signal) is called after the checkpoint is written."""

    # submitit announces a SLURM time limit with USR2 (launch.preempt_signal); USR1 by hand.
    SIGNALS = tuple(
        dict.fromkeys((signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, preempt_signal()))
    )

    def __enter__(self) -> StopSignals:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            self._restore()
            raise KeyboardInterrupt
        self.received = signum
        log.warning(
            "%s received: checkpointing after this step (again to stop now)",
            signal.Signals(signum).name,
        )

    def _restore(self) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def stop(self, step: int, saved: Path | None) -> None:
        previous = self.previous.get(self.received)
        self._restore()
        if callable(previous) and previous is not signal.default_int_handler:
            previous(self.received, None)  # e.g. submitit: requeue this job
        name = signal.Signals(self.received).name
        raise Interrupted(
            f"stopped by {name} after step {step}; checkpoint {saved}; "
            "run the same command again to resume"
        )


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


def build(cfg: Mapping[str, Any], device: torch.device, world: distributed.World) -> Components:
    tokenizer = load_tokenizer(cfg["model"], cfg["cache_dir"])
    train_set, val_set, stats = build_datasets(
        cfg["dataset"], tokenizer, cfg["seed"], cfg["cache_dir"]
    )
    torch.manual_seed(cfg["seed"])  # init depends on the seed only, not on what data loading drew
    model = load_model(cfg["model"], tokenizer, cfg["cache_dir"], device)
    model.train()
    if cfg["trainer"]["packing"]:  # refused here, before any step, for a model that cannot
        use_rows_attention(model)
        check_packing(model, cfg["model"]["name"], len(tokenizer))
    teacher = None
    if needs_teacher(cfg["objective"]) and cfg["objective"].get("teacher") == "cached":
        teacher = teacher_cache.open_cache(model, cfg["objective"], cfg["cache_dir"])
    elif needs_teacher(cfg["objective"]):
        teacher = make_teacher(model, cfg["model"])
    return Components(tokenizer, train_set, val_set, stats, model, model, teacher)


def data_stream(cfg: Mapping[str, Any], parts: Components, world: distributed.World) -> BatchStream:
    """The run's training rows in their seeded order, as this rank reads them."""
    trainer_cfg = cfg["trainer"]
    return BatchStream(
        parts.train_set,
        trainer_cfg["micro_batch_size"],
        cfg["seed"],
        parts.tokenizer.pad_token_id,
        world.rank,
        world.world_size,
        accumulation_steps(trainer_cfg, world.world_size),
        max_tokens=trainer_cfg["max_tokens_per_micro_batch"],
        packed=trainer_cfg["packing"],
    )


def probe_rows(val_set: Any, trainer_cfg: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The curriculum probe: the first global batch's worth of validation rows (fixed)."""
    return [val_set[i] for i in range(min(trainer_cfg["batch_size"], len(val_set)))]


def fill_teacher_cache(cfg: Mapping[str, Any], parts: Components, stream: BatchStream) -> None:
    """Compute every row this rank will read from the teacher cache and that is not there yet
    (its training rows and the probe). Runs before any step or checkpoint load, while the
    model still holds the initial weights: the teacher."""
    cache = parts.teacher
    if not isinstance(cache, teacher_cache.TeacherCache):
        return
    rows = [row for step in range(cfg["trainer"]["max_steps"]) for row in stream.rank_rows(step)]
    rows += probe_rows(parts.val_set, cfg["trainer"])
    cache.fill(parts.model, rows, stream.micro_batch_size, stream.pad_id)
    log.info(
        "teacher cache %s: %d rows computed, %d reused", cache.folder, cache.computed, cache.reused
    )


def parallelize(
    cfg: Mapping[str, Any], parts: Components, device: torch.device, world: distributed.World
) -> None:
    """Several ranks: DDP (a whole copy per rank), or with trainer.fsdp weights, gradients and
    optimizer state sharded (FSDP2); then torch.compile of the decoder layers when wanted. Runs
    after rank 0 alone scored the base model."""
    if world.distributed and not cfg["trainer"]["fsdp"]:
        ids = [device.index] if device.type == "cuda" else None
        parts.runner = torch.nn.parallel.DistributedDataParallel(parts.model, device_ids=ids)
    elif world.distributed:
        fsdp.shard(parts.model, mixed_precision=cfg["trainer"]["precision"] == "bf16")
        if parts.teacher is not None and not isinstance(parts.teacher, AdaptersOff):
            fsdp.shard(parts.teacher)  # a frozen copy; LoRA's teacher is the (sharded) student
    if compile_wanted(cfg["trainer"]["compile"], device):
        compile_layers(parts.model)


# Where torch.compile of the decoder layers pays, by device type (docs/performance.md, "Compiled
# step"): measured on CPU; not measured on CUDA (no GPU was lent), so off there until it is.
COMPILE_PAYS = {"cpu": False, "cuda": False}


def compile_wanted(setting: str | bool, device: torch.device) -> bool:
    return COMPILE_PAYS.get(device.type, False) if setting == "auto" else bool(setting)


def model_source(model: torch.nn.Module) -> dict[str, Any]:
    """Where the weights came from: a hub id or folder, plus the embedded copy's provenance."""
    path = str(getattr(model, "name_or_path", "") or "") or None
    marker = Path(path) / "uapt_source.json" if path else None
    provenance = json.loads(marker.read_text()) if marker and marker.is_file() else None
    return {"path": path, "embedded": provenance}


def base_model_scores(cfg: Mapping[str, Any], parts: Components, device: torch.device) -> dict:
    """The initial model's suite scores, from the cache or evaluated now (before any step)."""
    return evaluation.base_scores(
        cfg["model"],
        cfg["eval"],
        cfg["cache_dir"],
        init_seed=cfg["seed"],
        inputs=cfg.get("inputs"),
        evaluate_fn=lambda: evaluation.run_suite(
            parts.model, parts.tokenizer, cfg["eval"], device=device
        ),
    )


def train(
    cfg: Mapping[str, Any],
    folder: Path,
    record: records.RunRecord | None,
    tracker: Tracker | None,
    world: distributed.World,
    lock: run_lock.RunLock | None = None,
) -> None:
    """Train (and evaluate) one run in `folder`. Only rank 0 has a record, a tracker and the
    run's lock (checked at every step: a process frozen past the lock's staleness stops)."""
    trainer_cfg = cfg["trainer"]
    device = pick_device(trainer_cfg["device"], world)
    seed_everything(cfg["seed"], trainer_cfg["deterministic"])
    started = time.perf_counter()
    parts = build(cfg, device, world)
    pad = parts.tokenizer.pad_token_id
    stream = data_stream(cfg, parts, world)
    fill_teacher_cache(cfg, parts, stream)
    base = base_model_scores(cfg, parts, device) if world.is_main else {}
    distributed.barrier(world)
    parallelize(cfg, parts, device, world)

    loop = Trainer(cfg, parts.runner, parts.teacher, stream, device, world)
    loop.probe = probe_rows(parts.val_set, trainer_cfg)
    checkpoints = folder / "checkpoints"
    metrics = resume(loop, parts.model, checkpoints, folder / "metrics.jsonl", world)
    if record:
        record.update(
            model_source=model_source(parts.model),
            data=parts.data_stats,
            resumed_from_step=loop.step or None,
            teacher_cache=teacher_cache.describe(parts.teacher),
            timings={"setup_s": round(time.perf_counter() - started, 2)},
        )

    run_loop(loop, parts, checkpoints, metrics, tracker, lock)
    train_s = time.perf_counter() - started
    metrics["val/loss"] = validation_loss(parts.model, parts.val_set, trainer_cfg, pad, device)
    if fsdp.is_sharded(parts.model):  # every rank gathers; rank 0 saves and evaluates a copy
        parts.model = fsdp.unsharded_copy(
            parts.model, lambda: load_model(cfg["model"], parts.tokenizer, cfg["cache_dir"], device)
        )
    log.info(
        "step %d  loss %.4f  val/loss %.4f",
        loop.step,
        metrics.get("train/loss", math.nan),
        metrics["val/loss"],
    )
    if not record:
        return
    if trainer_cfg["save_model"]:
        save_model(parts.model, parts.tokenizer, folder / "model")
    record.update(metrics=metrics, timings={**record.data["timings"], "train_s": round(train_s, 2)})
    tracker.summary(metrics)
    evaluate_run(cfg, parts, device, folder, base, record, tracker)


def run_loop(
    loop: Trainer,
    parts: Components,
    checkpoints: Path,
    metrics: dict[str, float],
    tracker: Tracker | None,
    lock: run_lock.RunLock | None = None,
) -> None:
    """Step until max_steps: log, checkpoint, and stop cleanly on a signal."""
    trainer_cfg = loop.cfg["trainer"]
    every, last_saved = trainer_cfg["checkpoint_every"], checkpoint.latest(checkpoints)
    pad = parts.tokenizer.pad_token_id
    bar = tqdm(
        total=trainer_cfg["max_steps"],
        initial=loop.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not loop.world.is_main,
    )
    with StopSignals() as stop:
        while loop.step < trainer_cfg["max_steps"]:
            if lock:
                lock.check()
            row = loop.train_step()
            bar.update(1)
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(
                    f"non-finite loss ({row['loss']}) at step {loop.step}; "
                    f"last good checkpoint: {last_saved or 'none'}"
                )
            if loop.step % trainer_cfg["log_every"] == 0 or loop.step == trainer_cfg["max_steps"]:
                row = log_step(loop, row, parts.val_set, pad, tracker)
                metrics.update({f"train/{k}": v for k, v in row.items()})
                bar.set_postfix(loss=f"{row['loss']:.4f}", kept=f"{row['kept_frac']:.2f}")
            due = every and loop.step % every == 0 and loop.step < trainer_cfg["max_steps"]
            if due or stop.received:
                last_saved = save_checkpoint(loop, parts.model, checkpoints, metrics) or last_saved
            if stop.received:
                stop.stop(loop.step, last_saved)
    bar.close()


def evaluate_run(
    cfg: Mapping[str, Any],
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
    result = evaluation.run_suite(
        parts.model, parts.tokenizer, cfg["eval"], device=device, out_dir=folder
    )
    if not result:
        return
    result["eval_base"] = base.get("eval", {})
    result["eval_delta"] = evaluation.score_delta(result["eval"], result["eval_base"])
    timings = {**record.data["timings"], "eval_s": round(time.perf_counter() - started, 2)}
    record.update(**result, timings=timings)
    tracker.log_eval(result)


def save_model(model: torch.nn.Module, tokenizer: Any, target: Path) -> None:
    """The final weights as a loadable folder (`model.path=<run>/model`), published atomically."""
    with files.staging_dir(target) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def log_step(
    loop: Trainer, row: dict[str, Any], val_set, pad: int, tracker: Tracker | None
) -> dict:
    row["kept_overlap"] = loop.probe_overlap()
    every = loop.cfg["trainer"]["eval_every"]
    if every and loop.step % every == 0 and loop.step < loop.cfg["trainer"]["max_steps"]:
        row["val/loss"] = validation_loss(
            loop.model, val_set, loop.cfg["trainer"], pad, loop.device
        )
    row = {k: v for k, v in row.items() if v is not None}
    if tracker:
        tracker.log(loop.step, row)
    return row


def save_checkpoint(
    loop: Trainer, model: torch.nn.Module, folder: Path, metrics: dict
) -> Path | None:
    """Rank 0 writes; every rank waits for it so that none runs ahead of a checkpoint.
    Under FSDP every rank first takes part in gathering the weights and optimizer state."""
    full = fsdp.full_state_dicts(model, loop.optimizer) if fsdp.is_sharded(model) else (None, None)
    saved = None
    if loop.world.is_main:
        state = checkpoint.TrainingState(loop.step, dict(metrics), loop.probe_kept)
        saved = checkpoint.save(
            folder,
            model,
            loop.optimizer,
            loop.scheduler,
            state,
            loop.cfg["trainer"]["keep_checkpoints"],
            *full,
        )
    distributed.barrier(loop.world)
    return saved


def resume(
    loop: Trainer,
    model: torch.nn.Module,
    folder: Path,
    metrics_path: Path,
    world: distributed.World,
) -> dict[str, float]:
    """Restore the newest checkpoint that loads, if any; keep the metric rows logged up to it."""
    restored = checkpoint.restore(folder, model, loop.optimizer, loop.scheduler, world)
    if restored is None:
        if world.is_main:
            metrics_path.unlink(missing_ok=True)  # an attempt that died before its first checkpoint
        return {}
    path, state = restored
    loop.step, loop.probe_kept = state.step, state.probe_kept
    if world.is_main and metrics_path.exists():
        rows = metric_rows_up_to(metrics_path, state.step)
        files.write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
    log.info("resuming from %s (step %d)", path, state.step)
    return dict(state.metrics)


def metric_rows_up_to(path: Path, step: int) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl up to `step`; a line a kill cut short is dropped (named)."""
    rows = []
    for lineno, line in enumerate(path.read_bytes().decode("utf-8", "replace").splitlines(), 1):
        try:
            row = json.loads(line)
            if row["step"] <= step:
                rows.append(row)
        except (ValueError, KeyError, TypeError):
            log.warning("%s:%d: dropping a damaged metrics row (%r)", path, lineno, line[:80])
    return rows


def execute(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Run one config to completion (or skip it); returns a short outcome for sweep summaries."""
    validate(cfg)
    tune.check_tuned(cfg)
    cfg = inputs.with_fingerprints(dict(cfg))  # local data and models: their content is the id
    folder = records.run_dir(cfg)
    outcome = {"id": records.run_id(cfg), "slug": records.run_slug(cfg), "dir": str(folder)}
    if cfg["trainer"]["nproc"] > 1 and not distributed.under_torchrun():
        return relaunch(cfg, folder, outcome)
    world = distributed.init(pick_device(cfg["trainer"]["device"], distributed.World()))
    with run_folder.claim(folder, cfg["force"], world) as claim:
        if claim.skipped:
            log.info("%s: not training %s (%s)", claim.skipped, outcome["slug"], folder)
            return {**outcome, "status": "skipped", "reason": claim.skipped}
        return train_claimed(cfg, folder, outcome, world, claim.lock)


def relaunch(cfg: Mapping[str, Any], folder: Path, outcome: dict[str, Any]) -> dict[str, Any]:
    """`trainer.nproc > 1`: this process claims the run and runs it under torchrun."""
    world = distributed.World()
    with run_folder.claim(folder, cfg["force"], world) as claim:
        if claim.skipped:
            log.info("%s: not training %s (%s)", claim.skipped, outcome["slug"], folder)
            return {**outcome, "status": "skipped", "reason": claim.skipped}
        nproc = cfg["trainer"]["nproc"]
        log.info("launching %d processes with torchrun", nproc)
        env = {run_lock.INHERITED_ENV: str(claim.lock.path)} if claim.lock else {}
        # the ranks must not move previous results again: this process did
        argv = [*hydra_overrides(), "hydra.mode=RUN", *(["force=false"] if cfg["force"] else [])]
        code = distributed.relaunch_with_torchrun(nproc, argv, env)
        status = (run_folder.heal_record(folder) or {}).get("status", "failed")
        if code or status != "completed":
            run_folder.settle(folder, succeeded=False)
            raise RuntimeError(f"torchrun exited with {code}; see {folder / 'train.log'}")
        run_folder.settle(folder, succeeded=True)
        return {**outcome, "status": status}


def train_claimed(
    cfg: Mapping[str, Any],
    folder: Path,
    outcome: dict[str, Any],
    world: distributed.World,
    lock: run_lock.RunLock | None,
) -> dict[str, Any]:
    """Train a run this process group holds; rank 0 keeps the record, the log and W&B."""
    record = tracker = handler = None
    if world.is_main:
        record = records.RunRecord.start(folder, cfg, world.world_size)
        handler = attach_file_log(folder / "train.log")
        tracker = Tracker(folder, cfg, outcome["id"], outcome["slug"])
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


def setup_logging() -> None:
    from rich.logging import RichHandler

    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(show_path=False, rich_tracebacks=False))
    root.setLevel(logging.INFO)
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="train")
def main(cfg: DictConfig) -> dict[str, Any]:
    setup_logging()
    multirun = in_multirun()
    try:
        outcome = execute(OmegaConf.to_container(cfg, resolve=True))
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


if __name__ == "__main__":
    main()
