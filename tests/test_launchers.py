"""Sweep launchers: conf/hydra/launcher/{slurm,local_parallel}.yaml and uapt.launch.

Here SLURM is checked without a cluster: the launcher's launch() runs up to the point where it
would call sbatch, and the sbatch script it wrote is read instead (tests/test_slurm.py runs real
sweeps on a real cluster). local_parallel runs a real 2-point sweep as separate processes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, TINY, env

from uapt import launch
from uapt.launch import Slot, plan_slots, run_pool

pytestmark = pytest.mark.slow

CONF = REPO / "conf"
GPUS4 = ["0", "1", "2", "3"]


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=list(overrides), return_hydra_config=True)


# ----------------------------------------------------------------------------- slot plans
@pytest.mark.parametrize(
    ("cpus", "gpus", "parallelism", "gpus_per_job", "threads", "expected"),
    [
        # CPU only: one job per 4 CPUs, CPUs shared out evenly
        (16, [], None, None, None, [(4, ()), (4, ()), (4, ()), (4, ())]),
        (2, [], None, None, None, [(2, ())]),  # fewer than 4 CPUs: still one job
        (8, [], 3, None, None, [(2, ()), (2, ()), (2, ())]),  # 8 // 3 = 2 threads
        (8, [], 2, None, 1, [(1, ()), (1, ())]),  # threads given
        # GPUs: one job per GPU by default, each its own device
        (32, GPUS4, None, None, None, [(8, ("0",)), (8, ("1",)), (8, ("2",)), (8, ("3",))]),
        (32, GPUS4, None, 2, None, [(16, ("0", "1")), (16, ("2", "3"))]),
        (8, ["3", "GPU-ab"], 1, None, None, [(8, ("3",))]),  # tokens kept as the user listed them
        (8, ["0", "1"], 4, 0, None, [(2, ())] * 4),  # gpus_per_job=0: CPU jobs on a GPU box
    ],
)
def test_plan_slots(cpus, gpus, parallelism, gpus_per_job, threads, expected):
    slots = plan_slots(cpus, gpus, parallelism, gpus_per_job, threads)
    assert [(s.threads, s.gpus) for s in slots] == expected
    assert [s.index for s in slots] == list(range(len(expected)))


@pytest.mark.parametrize(
    ("gpus", "parallelism", "gpus_per_job", "threads", "needle"),
    [
        (["0"], None, 2, None, "hydra.launcher.gpus_per_job=2 but 1 GPU(s) visible"),
        (["0", "1"], 3, 1, None, "hydra.launcher.array_parallelism=3 jobs x gpus_per_job=1"),
        ([], 0, None, None, "hydra.launcher.array_parallelism=0"),
        ([], 2, None, 0, "hydra.launcher.cpus_per_task=0"),
        ([], 2, -1, None, "hydra.launcher.gpus_per_job=-1"),
    ],
)
def test_plan_slots_rejects_impossible_plans(gpus, parallelism, gpus_per_job, threads, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        plan_slots(8, gpus, parallelism, gpus_per_job, threads)


def test_slot_setup_lines_set_threads_and_devices():
    assert Slot(0, 3, ("1", "2")).setup() == [
        "export OMP_NUM_THREADS=3 MKL_NUM_THREADS=3 OPENBLAS_NUM_THREADS=3",
        "export CUDA_VISIBLE_DEVICES=1,2",
    ]
    assert Slot(1, 2, ()).setup()[1] == "export CUDA_VISIBLE_DEVICES=''"  # no GPU, not "all"


def test_visible_gpus_follows_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, GPU-5f3e")
    assert launch.visible_gpus() == ["2", "GPU-5f3e"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert launch.visible_gpus() == []


def test_preempt_signal_is_submitits(monkeypatch):
    from uapt.loop import preempt_signal

    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert preempt_signal() == signal.SIGUSR2  # submitit 1.5's default, not USR1
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "USR1")
    assert preempt_signal() == signal.SIGUSR1
    monkeypatch.setenv("SUBMITIT_PREEMPT_SIGNAL", "BOGUS")
    with pytest.raises(ValueError, match="SUBMITIT_PREEMPT_SIGNAL"):
        preempt_signal()


# ----------------------------------------------------------------------------- the pool
class Clock:
    def __init__(self) -> None:
        self.now = 0

    def sleep(self, _seconds: float) -> None:
        self.now += 1


class FakeJob:
    def __init__(self, clock: Clock, duration: int) -> None:
        self.clock, self.end, self.cancelled = clock, clock.now + duration, False

    def done(self) -> bool:
        return self.clock.now >= self.end

    def cancel(self, check: bool = True) -> None:
        self.cancelled = True


def test_pool_starts_a_job_as_soon_as_a_slot_frees(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(launch.time, "sleep", clock.sleep)
    durations = [3, 1, 2, 1, 1]
    started: list[tuple[int, int, int]] = []  # (job, slot, time)

    def submit(number: int, slot: Slot) -> FakeJob:
        started.append((number, slot.index, clock.now))
        return FakeJob(clock, durations[number])

    slots = plan_slots(8, [], 2, None, None)
    jobs = run_pool(len(durations), slots, submit, poll_s=1)
    # By hand: 0->s0 [0,3), 1->s1 [0,1), 2->s1 [1,3), 3->s0 [3,4), 4->s1 [3,4).
    assert started == [(0, 0, 0), (1, 1, 0), (2, 1, 1), (3, 0, 3), (4, 1, 3)]
    assert [j.end for j in jobs] == [3, 1, 3, 4, 4]  # returned in submission order
    assert all(j.done() for j in jobs)


def test_pool_cancels_running_jobs_when_interrupted(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(launch.time, "sleep", clock.sleep)
    jobs: list[FakeJob] = []

    def submit(number: int, slot: Slot) -> FakeJob:
        if number == 2:
            raise KeyboardInterrupt
        jobs.append(FakeJob(clock, 100))
        return jobs[-1]

    with pytest.raises(KeyboardInterrupt):
        run_pool(3, plan_slots(8, [], 3, None, None), submit, poll_s=1)
    assert [j.cancelled for j in jobs] == [True, True]


# ----------------------------------------------------------------------------- configs
def test_local_parallel_launcher_is_registered_with_hydra():
    from hydra.core.plugins import Plugins

    name = "hydra_plugins.uapt_launcher.LocalParallelLauncher"
    registered = Plugins.instance().class_name_to_class.get(name)
    assert registered is not None, (
        f"{name} not found: Hydra only instantiates launchers under hydra_plugins; "
        "src/hydra_plugins/uapt_launcher/__init__.py must subclass it from uapt.launch"
    )
    assert issubclass(registered, launch.LocalParallelLauncher)


def test_local_parallel_config_composes_and_rejects_unknown_keys(tmp_path):
    from hydra.utils import instantiate

    cfg = compose("hydra/launcher=local_parallel", "hydra.launcher.array_parallelism=3")
    launcher = instantiate(cfg.hydra.launcher)
    assert isinstance(launcher, launch.LocalParallelLauncher)
    assert launcher.params["array_parallelism"] == 3 and launcher.params["max_num_timeout"] == 3
    with pytest.raises(ValueError, match=r"hydra\.launcher\.partition"):
        launch.LocalParallelLauncher(**launcher.params, partition="gpu")


SLURM_OVERRIDES = (
    "hydra/launcher=slurm",
    "hydra.launcher.partition=gpu",
    "hydra.launcher.account=my_project",
    "hydra.launcher.gpus_per_node=2",
    "hydra.launcher.array_parallelism=2",
)


def test_slurm_sbatch_script_carries_our_settings(tmp_path, monkeypatch):
    """The plugin's launch() with our config, stopped where submitit would call sbatch."""
    import submitit
    from hydra.utils import instantiate
    from submitit.slurm import slurm

    sbatch: list[str] = []

    def fake_submit(self, command: str):  # instead of writing the file and calling sbatch
        sbatch.append(self._make_submission_file_text(command, "test"))
        return slurm.SlurmJob(folder=self.folder, job_id="4242", tasks=[0])

    monkeypatch.setattr(slurm.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # "srun found"
    monkeypatch.setattr(slurm.SlurmExecutor, "_submit_command", fake_submit)
    monkeypatch.setattr(slurm.SlurmJob, "done", lambda self, force_check=False: True)
    monkeypatch.setattr(slurm.SlurmJob, "results", lambda self: [self.job_id])
    monkeypatch.setattr(launch, "RESULT_GRACE_S", 0)  # no result file will come
    monkeypatch.setattr(launch, "slurm_queue", lambda arrays: None)  # no squeue here

    cfg = compose(*SLURM_OVERRIDES, f"hydra.sweep.dir={tmp_path}")
    assert cfg.hydra.launcher._target_ == "hydra_plugins.uapt_launcher.SlurmLauncher"
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=None, config=cfg)
    grid = [["objective=mle"], ["objective=masked_mle"], ["objective=self_distill"]]
    assert launcher.launch(grid, initial_job_idx=0) == ["4242_0", "4242_1", "4242_2"]

    (text,) = sbatch  # one array for the whole grid
    from uapt.loop import preempt_signal

    signal_name = preempt_signal().name.removeprefix("SIG")  # what the loop checkpoints on
    for line in [
        "#SBATCH --partition=gpu",
        "#SBATCH --account=my_project",
        "#SBATCH --gpus-per-node=2",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=64GB",
        "#SBATCH --time=1440",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --array=0-2%2",  # 3 grid points, 2 at once
        f"#SBATCH --signal={signal_name}@300",
        "#SBATCH --requeue",
    ]:
        assert line in text.splitlines(), f"{line!r} missing from:\n{text}"
    setup = text.index("export OMP_NUM_THREADS=8 MKL_NUM_THREADS=8")
    assert text.index("# setup") < setup < text.index("srun ")
    assert "-m submitit.core._submit" in text

    # Each grid point's pickled submission: its overrides, and 3 requeues after a time limit.
    pickles = sorted(tmp_path.glob(".submitit/4242_*/4242_*_submitted.pkl"))
    assert len(pickles) == 3
    delayed = submitit.helpers.DelayedSubmission.load(pickles[1])
    assert delayed.args[0] == ["objective=masked_mle"] and delayed.args[2] == 1
    assert (delayed._timeout_min, delayed._timeout_countdown) == (1440, 3)
    # On the pre-timeout signal the plugin's checkpoint() resubmits the same call: same grid point.
    again = delayed.function.checkpoint(*delayed.args)
    assert again.function is delayed.function and again.args == delayed.args


def test_slurm_setup_lines_can_be_replaced_from_the_command_line(tmp_path):
    cfg = compose("hydra/launcher=slurm", "hydra.launcher.setup=[module load cuda/12.4]")
    assert list(cfg.hydra.launcher.setup) == ["module load cuda/12.4"]
    assert compose("hydra/launcher=slurm").hydra.launcher.partition is None  # the user's to set


# ----------------------------------------------------------------------------- a real sweep
def test_local_parallel_sweep_runs_grid_points_as_separate_processes(tmp_path):
    echo = "echo uapt-slot threads=$OMP_NUM_THREADS gpus=[$CUDA_VISIBLE_DEVICES]"
    args = [
        *TINY,
        "hydra/launcher=local_parallel",
        "hydra.launcher.array_parallelism=2",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.gpus_per_job=0",
        f"hydra.launcher.setup=['{echo}']",
        "objective=mle,masked_mle",
        "trainer.max_steps=2",
        f"runs_dir={tmp_path}",
        "-m",
    ]
    entry_point = Path(sys.executable).parent / "uapt-train"
    proc = subprocess.run(
        [str(entry_point), *args], cwd=REPO, env=env(), capture_output=True, text=True, timeout=600
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "sweep: 2 completed, 0 skipped, 0 failed" in out
    records = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("*/run.json"))]
    assert sorted(r["summary"]["objective"] for r in records) == ["masked_mle", "mle"]
    assert all(r["status"] == "completed" for r in records)
    # Each job's shell saw its slot's exports; each job was its own submitit process.
    assert out.count("uapt-slot threads=1 gpus=[]") == 2, out[-3000:]
    job_dirs = [d for d in (tmp_path / ".sweeps").glob("*/.submitit/*") if d.name.isdigit()]
    assert len(job_dirs) == 2
    assert all(list(d.glob("*_result.pkl")) for d in job_dirs)
