"""Sweep launchers: grid points as parallel processes on one machine; SLURM's pre-timeout signal.

    uapt-train sweep=objectives hydra/launcher=local_parallel        # conf/hydra/launcher/
    uapt-train sweep=paper_grid hydra/launcher=slurm hydra.launcher.partition=gpu

SLURM needs no code here: conf/hydra/launcher/slurm.yaml configures hydra-submitit-launcher's
SlurmLauncher (one array task per grid point). The local launcher is ours because submitit's local
executor starts every grid point at once, gives every job the same first GPUs and takes no setup
lines in the plugin's config: LocalParallelLauncher runs at most `array_parallelism` jobs at once
(a new one starts as soon as one ends), gives each running job its own GPUs and its share of the
CPU threads. Hydra only instantiates plugins that live under the `hydra_plugins` namespace, so
hydra_plugins.uapt_launcher subclasses it under that name; the code lives here.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher

log = logging.getLogger("uapt")

PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's own switch (default USR2)
CPUS_PER_CPU_JOB = 4  # default threads of a CPU-only job: more jobs of fewer threads scale better
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def preempt_signal() -> signal.Signals:
    """The signal submitit has SLURM (`--signal=<sig>@<signal_delay_s>`) and its local controller
    send before the time limit, and on which it requeues the job: USR2 unless
    SUBMITIT_PREEMPT_SIGNAL names another. The training loop must checkpoint on it too."""
    name = os.environ.get(PREEMPT_SIGNAL_ENV, "USR2").upper().removeprefix("SIG")
    try:
        return signal.Signals[f"SIG{name}"]
    except KeyError:
        raise ValueError(f"{PREEMPT_SIGNAL_ENV}={name!r}: not a signal name (e.g. USR2)") from None


# ----------------------------------------------------------------------------- the machine
def usable_cpus() -> int:
    """CPUs this process may run on (respects taskset / cgroup affinity, unlike os.cpu_count)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """CUDA devices this process sees, as CUDA_VISIBLE_DEVICES tokens (indices or UUIDs)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [token.strip() for token in listed.split(",") if token.strip()]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


# ----------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Slot:
    """One of the `array_parallelism` places a job runs in: its CPU threads and its GPUs."""

    index: int
    threads: int
    gpus: tuple[str, ...]

    def setup(self) -> list[str]:
        """Shell lines run before the job's Python starts: its threads and devices."""
        threads = " ".join(f"{name}={self.threads}" for name in THREAD_VARIABLES)
        devices = shlex.quote(",".join(self.gpus)) if self.gpus else "''"
        return [f"export {threads}", f"export CUDA_VISIBLE_DEVICES={devices}"]


def plan_slots(
    cpus: int,
    gpus: Sequence[str],
    parallelism: int | None,
    gpus_per_job: int | None,
    threads: int | None,
) -> list[Slot]:
    """Split the machine into slots. None means: one job per GPU (per `gpus_per_job` GPUs) when
    there are GPUs, else one job per 4 CPUs; threads = CPUs / jobs, at least 1."""
    key = "hydra.launcher"
    if gpus_per_job is None:
        gpus_per_job = 1 if gpus else 0
    if gpus_per_job < 0:
        raise ValueError(f"{key}.gpus_per_job={gpus_per_job}: must be >= 0")
    if gpus_per_job > len(gpus):
        raise ValueError(
            f"{key}.gpus_per_job={gpus_per_job} but {len(gpus)} GPU(s) visible "
            f"(CUDA_VISIBLE_DEVICES={','.join(gpus) or 'none'})"
        )
    if parallelism is None:
        parallelism = len(gpus) // gpus_per_job if gpus_per_job else cpus // CPUS_PER_CPU_JOB
        parallelism = max(1, parallelism)
    if parallelism < 1:
        raise ValueError(f"{key}.array_parallelism={parallelism}: must be >= 1")
    if gpus_per_job * parallelism > len(gpus):
        raise ValueError(
            f"{key}.array_parallelism={parallelism} jobs x gpus_per_job={gpus_per_job} "
            f"needs {gpus_per_job * parallelism} GPUs; {len(gpus)} visible"
        )
    if threads is None:
        threads = max(1, cpus // parallelism)
    if threads < 1:
        raise ValueError(f"{key}.cpus_per_task={threads}: must be >= 1")
    return [
        Slot(i, threads, tuple(gpus[i * gpus_per_job : (i + 1) * gpus_per_job]))
        for i in range(parallelism)
    ]


class _Job(Protocol):
    def done(self) -> bool: ...


J = TypeVar("J", bound=_Job)


def run_pool(
    count: int,
    slots: Sequence[Slot],
    submit: Callable[[int, Slot], J],
    poll_s: float = 0.5,
) -> list[J]:
    """Submit jobs 0..count-1 in order, each into a free slot, never more than len(slots) at once;
    returns them in submission order once all are done."""
    free = list(slots)
    running: dict[int, tuple[Slot, J]] = {}
    jobs: list[J] = []

    def reap() -> None:
        for number, (slot, job) in list(running.items()):
            if job.done():
                del running[number]
                free.append(slot)
        free.sort(key=lambda s: s.index)

    try:
        for number in range(count):
            while not free:
                time.sleep(poll_s)
                reap()
            slot = free.pop(0)
            jobs.append(submit(number, slot))
            running[number] = (slot, jobs[-1])
        while running:
            time.sleep(poll_s)
            reap()
    except BaseException:
        for _, job in running.values():  # e.g. Ctrl-C: stop what we started, leave no orphans
            cancel = getattr(job, "cancel", None)
            if cancel:
                cancel(check=False)
        raise
    return jobs


# ----------------------------------------------------------------------------- the launcher
class LocalParallelLauncher(BaseSubmititLauncher):
    """submitit local jobs in a pool of `array_parallelism` slots (conf/hydra/launcher/
    local_parallel.yaml). Each job is a separate process tree (`python -m submitit.local._local`)
    whose environment sets its threads and CUDA_VISIBLE_DEVICES; the job itself is hydra-submitit's
    (same __call__ and checkpoint: a job stopped at its time limit is restarted and resumes)."""

    _EXECUTOR = "local"
    KEYS = frozenset(
        {
            "submitit_folder",
            "array_parallelism",
            "gpus_per_job",
            "cpus_per_task",
            "timeout_min",
            "signal_delay_s",
            "max_num_timeout",
            "stderr_to_stdout",
            "setup",
        }
    )

    def __init__(self, **params: Any) -> None:
        unknown = sorted(set(params) - self.KEYS)
        if unknown:
            raise ValueError(
                f"unknown key(s) {', '.join('hydra.launcher.' + k for k in unknown)} for "
                f"hydra/launcher=local_parallel; known: {', '.join(sorted(self.KEYS))}"
            )
        super().__init__(**params)

    def slots(self) -> list[Slot]:
        p = self.params
        return plan_slots(
            usable_cpus(),
            visible_gpus(),
            p.get("array_parallelism"),
            p.get("gpus_per_job"),
            p.get("cpus_per_task"),
        )

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        p = self.params
        slots = self.slots()
        executor = submitit.LocalExecutor(
            folder=p["submitit_folder"], max_num_timeout=p.get("max_num_timeout", 0)
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info(
            "local_parallel: %d job(s), %d at once, %d thread(s) each, GPUs %s; logs in %s",
            len(job_overrides),
            len(slots),
            slots[0].threads,
            [",".join(s.gpus) or "none" for s in slots],
            executor.folder,
        )

        def submit(number: int, slot: Slot) -> Any:
            idx = initial_job_idx + number
            overrides = list(job_overrides[number])
            log.info("\t#%d (slot %d) : %s", idx, slot.index, " ".join(filter_overrides(overrides)))
            executor.update_parameters(
                timeout_min=p.get("timeout_min", 60),
                signal_delay_s=p.get("signal_delay_s", 120),
                stderr_to_stdout=p.get("stderr_to_stdout", False),
                tasks_per_node=1,
                gpus_per_node=0,  # CUDA_VISIBLE_DEVICES comes from the slot's setup line instead
                setup=[*slot.setup(), *(p.get("setup") or [])],
            )
            return executor.submit(
                self, overrides, "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()
            )

        jobs = run_pool(len(job_overrides), slots, submit)
        return [job.results()[0] for job in jobs]
