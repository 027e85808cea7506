"""The training loop: one optimizer step over the global batch, and the loop around it.

`Trainer.train_step` is the whole step: the step's plan (uapt.batches: this rank's micro-batches,
the global token counts, selections spanning micro-batches), then per micro-batch the forward pass
and the objective's share of the step's token means, backward, and the optimizer step. `run_loop`
steps until max_steps: logging, the curriculum probe, checkpoints, and a clean stop on a signal.
The loop knows nothing of which objective it runs: it hands hidden states or logits and labels to
uapt.objectives.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from uapt import (
    checkpoint,
    distributed,
    files,
    fsdp,
    run_lock,
    teacher_cache,
)
from uapt.batches import BatchStream, select_global, to_device
from uapt.data import collate
from uapt.models import hidden_states, unwrap_ddp
from uapt.models import logits as model_logits
from uapt.objectives import (
    Counts,
    Hidden,
    Objective,
    TeacherTopK,
    TokenLoss,
    kept_overlap,
    output_head,
)
from uapt.sections.trainer import TrainerConfig
from uapt.tracking import Tracker

log = logging.getLogger("uapt")


def eval_batches(dataset: Any, size: int, pad_id: int, limit: int | None) -> Iterator[dict]:
    count = math.ceil(len(dataset) / size)
    for i in range(min(count, limit or count)):
        yield collate(
            [dataset[j] for j in range(i * size, min((i + 1) * size, len(dataset)))], pad_id
        )


def lr_lambda(trainer: TrainerConfig):
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    warmup, total, floor = trainer.warmup_steps, trainer.max_steps, trainer.min_lr_ratio

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def make_optimizer(model: torch.nn.Module, trainer: TrainerConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (norm gains and biases are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": trainer.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=trainer.lr, betas=tuple(trainer.betas))


Teacher = torch.nn.Module | teacher_cache.TeacherCache | None


def model_outputs(
    runner: torch.nn.Module,
    model: torch.nn.Module,
    teacher: Teacher,
    batch: Mapping[str, torch.Tensor],
    objective: Objective,
    *,
    reads_teacher: bool,
    packed: bool = False,
) -> tuple[torch.Tensor | Hidden, torch.Tensor | Hidden | TeacherTopK | None]:
    """The forward pass of one micro-batch: what the objective takes of the student and, when
    it reads it (`reads_teacher`), of the teacher. Logits, or with objective.chunk_size hidden
    states with their output layer (never [batch, time, vocab] logits). `runner` runs forward
    (it may be a DDP wrapper); `model` is the unwrapped model whose output layer the chunked
    path applies itself. The teacher is the frozen model (live, run without gradients) or a
    TeacherCache (read, never run). `packed`: the rows run as one sequence without padding
    (models.packed_forward); the objective sees them as rows all the same."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    if objective.chunked:
        student = Hidden(hidden_states(runner, ids, mask, packed=packed), output_head(model))
    else:
        student = model_logits(runner, ids, mask, packed=packed)
    if not reads_teacher or teacher is None:
        return student, None
    if isinstance(teacher, teacher_cache.TeacherCache):
        return student, teacher.lookup(batch)
    with torch.no_grad():
        if objective.chunked:
            states = hidden_states(teacher, ids, mask, packed=packed)
            return student, Hidden(states, output_head(teacher))
        return student, model_logits(teacher, ids, mask, packed=packed)


def forward_loss(
    runner: torch.nn.Module,
    model: torch.nn.Module,
    teacher: Teacher,
    batch: Mapping[str, torch.Tensor],
    objective: Objective,
    *,
    kept: torch.Tensor | None = None,
    counts: Counts | None = None,
    packed: bool = False,
) -> TokenLoss:
    """The objective on one micro-batch: its share of the global batch's token means
    (`counts`), with the kept set selected here or handed in (`kept`); the forward pass as in
    `model_outputs`."""
    reads = objective.reads_teacher(selects=kept is None)
    student, teacher_out = model_outputs(
        runner, model, teacher, batch, objective, reads_teacher=reads, packed=packed
    )
    return objective.loss(student, batch["labels"], teacher_out, kept=kept, counts=counts)


@torch.no_grad()
def validation_loss(model, dataset, trainer: TrainerConfig, pad_id: int, device) -> float:
    """Token-mean NLL of the assistant tokens of the validation split (objective-independent)."""
    model.eval()
    total, count = 0.0, 0
    for batch in eval_batches(dataset, trainer.micro_batch_size, pad_id, trainer.val_batches):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, reduction="sum")
        total, count = total + nll.item(), count + int((labels != -100).sum())
    model.train()
    return total / max(count, 1)


@dataclass
class Trainer:
    """The loop's state: what it trains with (config, objective, model, teacher, data) and where
    it is (optimizer, schedule, step, the curriculum probe's last kept set)."""

    config: TrainerConfig
    objective: Objective
    seed: int  # the run's seed: selection noise of the curriculum probe
    runner: torch.nn.Module  # what runs forward and backward: the model's DDP wrapper, or the
    # model itself (one process; FSDP shards the model in place)
    teacher: Teacher
    stream: BatchStream
    device: torch.device
    world: distributed.World = field(default_factory=distributed.World)
    optimizer: torch.optim.Optimizer = field(init=False)
    scheduler: torch.optim.lr_scheduler.LambdaLR = field(init=False)
    step: int = 0
    probe: list[dict[str, Any]] = field(default_factory=list)  # fixed rows: the curriculum probe
    val_set: Any = None  # held-out rows: validation loss every trainer.val_every steps
    probe_kept: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.optimizer = make_optimizer(self.runner, self.config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(self.config))

    @property
    def model(self) -> torch.nn.Module:
        """The model itself, without a DDP wrapper: its output layer feeds the chunked loss, its
        weights are what checkpoints save."""
        return unwrap_ddp(self.runner)

    def autocast(self):
        if self.config.precision != "bf16":
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    @torch.no_grad()
    def scores(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Selection scores of a micro-batch, for selections over more rows than it holds (no
        gradients: the model runs without its DDP wrapper)."""
        with self.autocast():
            student, teacher = model_outputs(
                self.model,
                self.model,
                self.teacher,
                batch,
                self.objective,
                reads_teacher=self.objective.reads_teacher(scoring=True),
                packed=self.config.packing,
            )
            return self.objective.scores(student, batch["labels"], teacher)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches of the global batch."""
        started, parts, tokens, computed = time.perf_counter(), [], 0, 0
        spec = self.objective.spec
        plan = self.stream.plan(self.step, spec, self.scores, self.world, self.device)
        for micro, batch in enumerate(plan.batches):
            last = micro == len(plan.batches) - 1
            sync = (
                nullcontext() if last or not self.world.distributed else fsdp.no_sync(self.runner)
            )
            with sync, self.autocast():
                out = forward_loss(
                    self.runner,
                    self.model,
                    self.teacher,
                    batch,
                    self.objective,
                    kept=plan.kept[micro],
                    counts=plan.counts,
                    packed=self.config.packing,
                )
                # out.total is this micro-batch's share of the global batch's token means: the
                # shares of all micro-batches and ranks sum to the step's loss. DDP and FSDP
                # average gradients over ranks, hence the factor.
                (out.total * self.world.world_size).backward()
            parts.append(out)
            tokens += int(batch["attention_mask"].sum())
            computed += tokens_computed(batch, self.config.packing)
        clip = self.config.grad_clip or float("inf")
        grad_norm = fsdp.clip_grad_norm_(self.runner.parameters(), clip)  # DTensor grads too
        if not torch.isfinite(grad_norm) and self.world.is_main:  # silent, it hid a defect once
            log.warning(
                "step %d: gradient norm %s; clipping scaled the step's gradients to 0 (nan where "
                "one is inf), so the weights move by momentum and weight decay only",
                self.step + 1,
                float(grad_norm),
            )
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
        if not self.probe or not self.objective.spec.mask_ratio:
            return None
        self.runner.eval()
        size = self.stream.micro_batch_size
        own = [
            list(range(i, min(i + size, len(self.probe)))) for i in range(0, len(self.probe), size)
        ]
        batches = [
            to_device(collate([self.probe[j] for j in idx], self.stream.pad_id), self.device)
            for idx in own
        ]
        noise_key = lambda j: (self.seed, "probe", j)  # noqa: E731
        kept = select_global(
            self.probe,
            own,
            batches,
            self.objective.spec,
            self.scores,
            noise_key,
            distributed.World(),
            self.device,
        )
        self.runner.train()
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


class Interrupted(Exception):
    """The run stopped on a signal after writing a checkpoint; re-running resumes it."""


PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's own switch (default USR2)


def preempt_signal() -> signal.Signals:
    """The signal submitit has SLURM (`--signal=<sig>@<signal_delay_s>`) and its local controller
    send before the time limit, and on which it requeues the job: USR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another. The loop checkpoints on it (StopSignals)."""
    name = os.environ.get(PREEMPT_SIGNAL_ENV, "USR2").upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise ValueError(f"{PREEMPT_SIGNAL_ENV}={name!r}: not a signal name (e.g. USR2)") from None


class StopSignals:
    """The first SIGINT / SIGTERM / SIGUSR1 / SIGUSR2 asks the loop to checkpoint at the next step boundary
    and stop; a second one stops at once. A handler that was installed before (submitit's requeue
    on SLURM's pre-timeout signal) is called after the checkpoint is written."""

    # submitit announces a SLURM time limit with USR2 (preempt_signal); USR1 by hand.
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


def run_loop(
    loop: Trainer,
    checkpoints: Path,
    metrics: dict[str, float],
    tracker: Tracker | None,
    lock: run_lock.RunLock | None = None,
) -> None:
    """Step until max_steps: log, checkpoint, and stop cleanly on a signal."""
    config = loop.config
    every, last_saved = config.checkpoint_every, checkpoint.latest(checkpoints)
    bar = tqdm(
        total=config.max_steps,
        initial=loop.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not loop.world.is_main,
    )
    with StopSignals() as stop:
        while loop.step < config.max_steps:
            if lock:
                lock.check()
            row = loop.train_step()
            bar.update(1)
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(
                    f"non-finite loss ({row['loss']}) at step {loop.step}; "
                    f"last good checkpoint: {last_saved or 'none'}"
                )
            if loop.step % config.log_every == 0 or loop.step == config.max_steps:
                row = log_step(loop, row, tracker)
                metrics.update({f"train/{k}": v for k, v in row.items()})
                bar.set_postfix(loss=f"{row['loss']:.4f}", kept=f"{row['kept_frac']:.2f}")
            due = every and loop.step % every == 0 and loop.step < config.max_steps
            if due or stop.received:
                last_saved = save_checkpoint(loop, loop.model, checkpoints, metrics) or last_saved
            if stop.received:
                stop.stop(loop.step, last_saved)
    bar.close()


def log_step(loop: Trainer, row: dict[str, Any], tracker: Tracker | None) -> dict:
    row["kept_overlap"] = loop.probe_overlap()
    every = loop.config.val_every
    if every and loop.step % every == 0 and loop.step < loop.config.max_steps:
        row["val/loss"] = validation_loss(
            loop.runner, loop.val_set, loop.config, loop.stream.pad_id, loop.device
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
            loop.config.keep_checkpoints,
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
