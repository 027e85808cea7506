"""Sweep launchers: grid points as parallel processes on one machine, or a SLURM job array.

    uapt-train sweep=objectives hydra/launcher=local_parallel        # conf/hydra/launcher/
    uapt-train sweep=paper_grid hydra/launcher=slurm hydra.launcher.partition=gpu

conf/hydra/launcher/slurm.yaml configures hydra-submitit-launcher's SLURM launcher (one array task
per grid point); SlurmLauncher here only changes how it collects the array: a grid point whose
job ends without a result (cancelled, killed, out of memory, node failure) is a failed point of
the sweep summary, not an exception that ends the sweep before the other points are collected.
The local launcher is ours because submitit's local executor starts every grid point at once,
gives every job the same first GPUs and takes no setup lines in the plugin's config:
LocalParallelLauncher runs at most `array_parallelism` jobs at once (a new one starts as soon as
one ends), gives each running job its own GPUs and its share of the CPU threads. Hydra only
instantiates plugins that live under the `hydra_plugins` namespace, so hydra_plugins.uapt_launcher
subclasses both under that name; the code lives here.
"""

from __future__ import annotations

import logging
import os
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import BaseSubmititLauncher
from omegaconf import OmegaConf, open_dict

log = logging.getLogger("uapt")

CPUS_PER_CPU_JOB = 4  # default threads of a CPU-only job: more jobs of fewer threads scale better
# After SLURM says a job ended, how long its result file may take to appear (a shared filesystem's
# attribute cache); submitit's own wait. Past it the grid point is failed.
RESULT_GRACE_S = 15.0
QUEUE_CHECK_S = 10.0  # between squeue calls, only while some job's state is unknown to sacct
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


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


def count_missing(jobs: Sequence[Any], waiting: Sequence[int], missing: dict[int, int]) -> None:
    """Count, per job, the queue checks in a row that found it neither in SLURM's accounting nor in
    its queue (accounting may lag a job by a check, never by two)."""
    unknown = [
        n
        for n in waiting
        if jobs[n].state == "UNKNOWN" and not jobs[n].paths.result_pickle.exists()
    ]
    queued = slurm_queue({jobs[n].job_id.split("_")[0] for n in unknown}) if unknown else None
    if queued is None:
        return
    for n in unknown:
        missing[n] = 0 if jobs[n].job_id in queued else missing.get(n, 0) + 1


def slurm_queue(arrays: set[str]) -> set[str] | None:
    """The ids (`<array>_<task>`) of these arrays' tasks that SLURM still holds pending or running;
    None when squeue cannot tell."""
    import subprocess

    command = ["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(sorted(arrays))]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if proc.returncode != 0:  # squeue fails on a list of nothing but finished ids
        return set() if "Invalid job id" in proc.stderr else None
    return set(proc.stdout.split())


class SlurmLauncher(submitit_launcher.SlurmLauncher):
    """hydra-submitit's SLURM launcher (the same sbatch array, job and requeue), collected so that
    one grid point's job dying outside Python never costs the sweep its other points or summary."""

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        assert self.config is not None
        params = dict(self.params)
        executor = submitit.AutoExecutor(
            cluster="slurm",
            folder=params.pop("submitit_folder"),
            slurm_max_num_timeout=params.pop("max_num_timeout", 0),
        )
        shared = set(OmegaConf.structured(BaseQueueConf).keys())  # the rest take a slurm_ prefix
        executor.update_parameters(
            **{k if k in shared else f"slurm_{k}": v for k, v in params.items()}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        calls = []
        for number, overrides in enumerate(job_overrides):
            idx = initial_job_idx + number
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            calls.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}"))
        state = Singleton.get_state()
        jobs = executor.map_array(self, *zip(*[(*c, state) for c in calls], strict=True))
        return self.collect(jobs, [c[0] for c in calls], initial_job_idx)

    def collect(
        self, jobs: Sequence[Any], job_overrides: Sequence[list[str]], initial_job_idx: int
    ) -> list[JobReturn]:
        """Each job's return once it has ended, in submission order. A job has ended when its
        result file is there, when SLURM's accounting (sacct) says so, or, for a job SLURM keeps
        no record of (an array task cancelled before it started leaves none), when two queue
        checks in a row miss it."""
        returns: dict[int, JobReturn] = {}
        ended: dict[int, float] = {}
        missing: dict[int, int] = {}
        checked = -QUEUE_CHECK_S
        while len(returns) < len(jobs):
            now = time.monotonic()
            waiting = [n for n in range(len(jobs)) if n not in returns]
            if now - checked >= QUEUE_CHECK_S:
                checked = now
                count_missing(jobs, waiting, missing)
            for n in waiting:
                job, overrides, idx = jobs[n], job_overrides[n], initial_job_idx + n
                if missing.get(n, 0) >= 2:
                    error = f"SLURM job {job.job_id} vanished without a record"
                    returns[n] = self.failed(overrides, idx, f"{error} (cancelled before it ran?)")
                elif job.done():
                    waited = now - ended.setdefault(n, now)
                    if job.paths.result_pickle.exists() or waited >= RESULT_GRACE_S:
                        returns[n] = self.job_return(job, overrides, idx)
            if len(returns) < len(jobs):
                time.sleep(1)
        return [returns[n] for n in range(len(jobs))]

    def job_return(self, job: Any, overrides: list[str], idx: int) -> JobReturn:
        from submitit.core.utils import FailedJobError, UncompletedJobError

        job._results_timeout_s = 0  # collect() already gave the result file its grace
        try:
            ret = job.results()[0]
        except UncompletedJobError as e:
            reason = str(e).strip().splitlines()[-1] if isinstance(e, FailedJobError) else ""
            reason = reason or f"ended {job.state} without a result"
            log_file = job.paths.stderr
            where = f"log: {log_file}" if log_file.exists() else "it left no log"
            return self.failed(overrides, idx, f"SLURM job {job.job_id} {reason}; {where}")
        if isinstance(ret, JobReturn) and ret.status == JobStatus.FAILED:
            error = ret._return_value
            return self.failed(overrides, idx, f"{type(error).__name__}: {error}")
        return ret

    def failed(self, overrides: list[str], idx: int, error: str) -> JobReturn:
        """A failed outcome for a grid point whose job left none; the sweep summary counts it."""
        from uapt.files import write_json
        from uapt.sweeps import outcome_path

        assert self.config is not None
        outcome = {**self.identity(overrides), "status": "failed", "error": error}
        log.error("grid point #%d failed: %s", idx, error)
        target = outcome_path(self.config.hydra.sweep.dir, idx)
        if not target.exists():  # the job's own outcome, if it wrote one, says more
            write_json(target, outcome)
        return JobReturn(overrides=overrides, status=JobStatus.COMPLETED, _return_value=outcome)

    def identity(self, overrides: list[str]) -> dict[str, Any]:
        """The run id and slug of a grid point, composed here as its job would have."""
        from uapt import records

        assert self.hydra_context is not None and self.config is not None
        try:
            cfg = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
            with open_dict(cfg):
                del cfg["hydra"]
            plain = OmegaConf.to_container(cfg, resolve=True)
            return {"id": records.run_id(plain), "slug": records.run_slug(plain)}
        except Exception:  # a config that does not compose: its error is the job's to report
            return {"id": None, "slug": None}
