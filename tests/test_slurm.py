"""hydra/launcher=slurm against a real one-node SLURM cluster (slurmctld, slurmd, slurmdbd with
MariaDB, munged; tests/slurm_cluster.py, one per session): sweeps as job arrays, preemption, time
limits and requeues, checked by what the cluster and the run records say, not by sbatch text.

The node declares 8 CPUs and no GPU, so every sweep runs with gpus_per_node=0 and one CPU per
task. A requeued job waits 2 minutes (SLURM's BeginTime) unless told otherwise; the tests move
that to now, as an impatient admin would, to keep the suite short.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import threading
from datetime import datetime
from pathlib import Path
from typing import ClassVar

import pytest
from helpers import REPO, TINY, env, metric_rows, wait_until
from slurm_cluster import PARTITION, Cluster

pytestmark = pytest.mark.slow

SLURM = [
    "hydra/launcher=slurm",
    f"hydra.launcher.partition={PARTITION}",
    "hydra.launcher.gpus_per_node=0",  # the test node has no GPU (docs/cluster.md)
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
]
HOLD = "+hydra.launcher.additional_parameters.hold=true"  # sbatch --hold: the test releases it
STEPS = 200  # a few seconds of training: long enough to be interrupted, short enough to repeat
RUN = [*TINY, "objective=masked_mle", f"trainer.max_steps={STEPS}"]
# Timing and memory differ between any two runs; every other metric must match exactly.
UNCOMPARABLE = ("tokens_per_s", "peak_mem_mb")


# ----------------------------------------------------------------------------- helpers
POLL_S = 0.2  # between two looks at the cluster: its commands cost more than a look at a file


class Sweep:
    """`uapt-train -m ...` submitting to the cluster, in the background; output to a file."""

    # Stopped at the end of the module if still running (a failed test leaves them waiting).
    started: ClassVar[list[subprocess.Popen]] = []

    def __init__(self, cluster: Cluster, runs_dir: Path, experiment: str, *args: str) -> None:
        self.cluster, self.runs_dir = cluster, runs_dir
        self.submitit = runs_dir / ".sweeps" / experiment / ".submitit"
        self.log = runs_dir.parent / f"{runs_dir.name}-{experiment}-{len(Sweep.started)}.out"
        command = [sys.executable, "-m", "uapt.train", "-m", *SLURM, *args]
        command += [f"runs_dir={runs_dir}", f"experiment={experiment}"]
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(
                command, cwd=REPO, env=cluster.env(env()), stdout=out, stderr=subprocess.STDOUT
            )
        Sweep.started.append(self.proc)

    def jobs(self) -> list[str]:
        """The SLURM ids of the grid points' jobs once sbatch accepted them: `<array>_<task>`,
        or the plain job id of a one-point sweep (submitit makes no array of one)."""

        def submitted() -> list[str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"sweep exited {self.proc.returncode}: {self.output()[-3000:]}"
                )
            names = [d.name for d in self.submitit.glob("[0-9]*") if d.is_dir()]  # not pickles
            tasks = sorted((n for n in names if "_" in n), key=lambda n: int(n.split("_")[1]))
            return tasks or names or None

        # start-up, the check of every grid point, then sbatch: minutes on 2 busy cores
        return wait_until(
            submitted, 300, f"the jobs of {self.submitit.parent.name}", every_s=POLL_S
        )

    def array_id(self) -> str:
        return self.jobs()[0].split("_")[0]

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    # the grid check, then short tiny runs as SLURM jobs: minutes on 2 busy cores
    def finish(self, timeout_s: float = 480) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            message = f"sweep still running after {timeout_s}s: {self.output()[-3000:]}"
            raise AssertionError(message) from None
        return code, self.output()


@pytest.fixture(scope="module", autouse=True)
def _no_sweep_left_running():
    """Stop the `uapt-train` processes this module started that are still running."""
    yield
    for proc in Sweep.started:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def summary(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("sweep:")]
    assert lines, f"no sweep summary in:\n{output[-3000:]}"
    return lines[-1]


def settle(cluster: Cluster, array: str) -> None:
    """Wait until SLURM has finished with every task (epilogues run, accounting written)."""

    def settled() -> bool:
        queued = cluster.command("squeue", "-h", "-j", array, check=False).strip()
        return not queued and all(r["End"] != "Unknown" for r in sacct(cluster, array))

    wait_until(settled, 60, f"array {array} to leave the queue", every_s=POLL_S)


def show_job(cluster: Cluster, job: str) -> dict[str, str]:
    text = cluster.command("scontrol", "-o", "show", "job", job, check=False)
    return dict(item.split("=", 1) for item in text.split() if "=" in item)


def sacct(cluster: Cluster, array: str, *, duplicates: bool = False) -> list[dict[str, str]]:
    """Accounting rows of an array's tasks (allocations, not steps), times in epoch seconds."""
    fields = ["JobID", "State", "Start", "End"]
    args = ["sacct", "-n", "-P", "-X", "-j", array, "-o", ",".join(fields)]
    proc = subprocess.run(
        [*args, *(["-D"] if duplicates else [])],
        env={**cluster.env(), "SLURM_TIME_FORMAT": "%s"},
        capture_output=True,
        text=True,
        check=True,
    )
    return [dict(zip(fields, line.split("|"), strict=True)) for line in proc.stdout.splitlines()]


def final_metrics(record: dict) -> dict:
    return {k: v for k, v in record["metrics"].items() if not k.endswith(UNCOMPARABLE)}


def same_numbers(a: dict, b: dict) -> bool:
    """Equal, NaN included (nll/unkept is NaN when every token is kept)."""
    return a.keys() == b.keys() and all(
        a[k] == b[k] or (isinstance(a[k], float) and math.isnan(a[k]) and math.isnan(b[k]))
        for k in a
    )


def run_folder(runs_dir: Path, mask_ratio: float) -> Path:
    (folder,) = [
        p.parent
        for p in runs_dir.glob("tiny-*/run.json")
        if json.loads(p.read_text())["summary"]["mask_ratio"] == mask_ratio
    ]
    return folder


def record(folder: Path) -> dict:
    return json.loads((folder / "run.json").read_text())


def requeued(cluster: Cluster, job: str) -> bool:
    """The job was requeued and waits for its BeginTime (2 minutes after the requeue)."""
    info = show_job(cluster, job)
    return info.get("JobState") == "PENDING" and info.get("Restarts") == "1"


# ----------------------------------------------------------------------------- a grid
GRID = (0.7, 0.5)  # objective.mask_ratio, first with the tiny model, then with a broken one


@pytest.fixture(scope="module")
def grid(slurm_cluster, tmp_path_factory):
    """One sweep of 4 points, 2 at a time (model.path x mask_ratio: tasks 0-1 the tiny model at
    0.7 and 0.5, tasks 2-3 a model folder that does not load): 0.5 trains; task 2 fails in its
    run (no check can see that before); task 0 is cancelled while it runs (SLURM records it
    CANCELLED); task 3 is cancelled while it waits for a place (SLURM keeps no record of it)."""
    runs = tmp_path_factory.mktemp("grid")
    broken = tmp_path_factory.mktemp("not-a-model")
    points = ",".join(map(str, GRID))
    sweep = Sweep(
        slurm_cluster,
        runs,
        "grid",
        *RUN,
        f"model.path=null,{broken}",
        f"objective.mask_ratio={points}",
        "hydra.launcher.array_parallelism=2",
    )
    array = sweep.array_id()
    slurm_cluster.command("scancel", f"{array}_3")  # behind the throttle: never starts
    first = f"{array}_0"
    wait_until(
        lambda: show_job(slurm_cluster, first).get("JobState") == "RUNNING",
        60,
        first,
        every_s=POLL_S,
    )
    slurm_cluster.command("scancel", first)
    code, output = sweep.finish()
    settle(slurm_cluster, array)
    return {"array": array, "code": code, "output": output, "runs": runs, "sweep": sweep}


def test_grid_is_one_throttled_job_array(slurm_cluster, grid):
    array = grid["array"]
    script = (grid["sweep"].submitit / array / f"{array}_submission.sh").read_text()
    assert "#SBATCH --array=0-3%2" in script.splitlines()
    rows = {r["JobID"]: r for r in sacct(slurm_cluster, array)}
    # One array, one task per point; the task cancelled while pending left no record.
    assert sorted(rows) == [f"{array}_{i}" for i in range(3)], rows
    states = [rows[f"{array}_{i}"]["State"] for i in range(3)]
    # A run that fails is the run's failure, not the job's: the job ends normally.
    assert states[0].startswith("CANCELLED") and states[1:] == ["COMPLETED"] * 2, rows
    # array_parallelism=2 on a node with room for 8: never more than 2 at once, and 2 did run.
    spans = [(int(r["Start"]), int(r["End"])) for r in rows.values()]
    running = [sum(s <= start < e for s, e in spans) for start, _ in spans]
    assert max(running) == 2, rows
    assert "Bypassing sacct error" not in grid["output"]  # accounting answers: the state is true


def test_failing_points_are_isolated_and_summarised(grid):
    assert grid["code"] == 1, grid["output"][-3000:]
    line = summary(grid["output"])
    assert line.startswith("sweep: 1 completed, 0 skipped, 3 failed"), line
    array = grid["array"]
    assert "Unrecognized model in" in line and "not-a-model" in line  # its run says why
    assert f"SLURM job {array}_0 ended CANCELLED" in line  # killed: the launcher says how
    assert f"SLURM job {array}_3 vanished without a record" in line
    records = [record(p.parent) for p in grid["runs"].glob("tiny-*/run.json")]
    done = [r["summary"]["mask_ratio"] for r in records if r["status"] == "completed"]
    assert done == [0.5] and all(r["attempts"] == 1 for r in records)


def test_an_invalid_point_submits_nothing(slurm_cluster, grid, tmp_path):
    """A bad value in one point stops the launch before sbatch: one line, exit status 2, no job
    of this sweep in SLURM's accounting (pending jobs included: each job's submit line names its
    sweep's folder), no folder written."""
    sweep = Sweep(slurm_cluster, tmp_path / "runs", "invalid", *RUN, "objective.mask_ratio=0.5,1.5")
    code, output = sweep.finish()
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, output[-3000:]
    assert "objective.mask_ratio=1.5 is not a finite number in [0, 1)" in lines[0]
    assert not (tmp_path / "runs").exists()
    submitted = slurm_cluster.command("sacct", "-n", "-X", "-a", "-P", "-o", "JobID,SubmitLine")
    assert "/.sweeps/grid/" in submitted  # the grid's jobs are listed with their folder
    assert "/.sweeps/invalid/" not in submitted


# ----------------------------------------------------------------------------- preemption
def test_preempted_run_resumes_to_the_uninterrupted_result(slurm_cluster, grid, tmp_path):
    """`scontrol requeue` mid-run: SIGTERM -> checkpoint -> the same job again -> resume -> the
    metrics of the grid's uninterrupted mask_ratio=0.5 run, bit for bit (same CPU, one thread,
    deterministic kernels: no tolerance is needed)."""
    sweep = Sweep(slurm_cluster, tmp_path, "preempt", *RUN, "objective.mask_ratio=0.5")
    (job,) = sweep.jobs()  # one point: a plain job, not an array

    def training() -> bool:
        rows = list(tmp_path.glob("tiny-*/metrics.jsonl"))
        return bool(rows) and len(rows[0].read_text().splitlines()) >= 20

    wait_until(training, 120, "20 logged steps", every_s=POLL_S)
    slurm_cluster.command("scontrol", "requeue", job)
    wait_until(lambda: requeued(slurm_cluster, job), 60, f"{job} requeued", every_s=POLL_S)
    slurm_cluster.command("scontrol", "update", f"JobId={job}", "StartTime=now")
    code, output = sweep.finish()
    settle(slurm_cluster, job)
    assert code == 0, output[-3000:]
    assert summary(output) == "sweep: 1 completed, 0 skipped, 0 failed"

    folder = run_folder(tmp_path, 0.5)
    run = record(folder)
    assert run["status"] == "completed" and run["attempts"] == 2
    assert 20 <= run["resumed_from_step"] < STEPS
    assert "SIGTERM received: checkpointing" in (folder / "train.log").read_text()
    assert [r["step"] for r in metric_rows(folder)] == list(range(1, STEPS + 1))
    reference = record(run_folder(grid["runs"], 0.5))
    assert same_numbers(final_metrics(run), final_metrics(reference))
    states = [r["State"] for r in sacct(slurm_cluster, job, duplicates=True)]
    assert states == ["REQUEUED", "COMPLETED"], states


# ----------------------------------------------------------------------------- time limits
TIME_LIMIT_TEST = "test_time_limit_checkpoints_requeues_and_finishes"


class TimeLimitedRun:
    """One run under timeout_min=1, signal_delay_s=25, max_num_timeout=1, with about 40 s of
    training (at this machine's speed, measured on the grid's run of the same config).

    slurmctld checks time limits every 30 s and sends `--signal=USR2@25` at the first check
    with at most 25+30 s left. The job is released just after a check, so USR2 comes ~30 s in,
    while the run trains: uapt checkpoints, submitit counts a timeout and requeues the job. The
    requeued job is then given a longer limit and started at once (not 2 minutes later), so it
    finishes without waiting out more 1-minute windows; it must resume, not restart. A thread
    does this while the module's other tests run: most of it is waiting for SLURM's clock."""

    def __init__(self, cluster: Cluster, runs: Path, grid: dict) -> None:
        speed = STEPS / record(run_folder(grid["runs"], 0.5))["timings"]["train_s"]
        self.cluster, self.runs, self.steps = cluster, runs, max(300, round(40 * speed))
        self.sweep = Sweep(
            cluster,
            runs,
            "limit",
            *TINY,
            "objective=masked_mle",
            "objective.mask_ratio=0.5",
            f"trainer.max_steps={self.steps}",
            "hydra.launcher.timeout_min=1",
            "hydra.launcher.signal_delay_s=25",
            "hydra.launcher.max_num_timeout=1",  # one requeue after a timeout allowed, not two
            HOLD,
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self.operate, daemon=True)
        self.thread.start()

    def operate(self) -> None:
        try:
            (self.job,) = self.sweep.jobs()
            self.cluster.next_time_limit_check()
            self.cluster.command("scontrol", "release", self.job)
            wait_until(
                lambda: requeued(self.cluster, self.job),
                120,
                f"{self.job} requeued",
                every_s=POLL_S,
            )
            update = ["scontrol", "update", f"JobId={self.job}", "TimeLimit=10", "StartTime=now"]
            self.cluster.command(*update)
        except BaseException as e:  # raised in the test
            self.error = e

    def finish(self) -> tuple[int, str]:
        self.thread.join(timeout=240)
        if self.error:
            raise self.error
        return self.sweep.finish()


@pytest.fixture(scope="module", autouse=True)
def time_limited(request, slurm_cluster, tmp_path_factory):
    """Started once the grid is done, before the other tests, when the time-limit test is
    among those collected; that test, the module's last, checks it."""
    if not any(item.name == TIME_LIMIT_TEST for item in request.session.items):
        yield None
        return
    try:
        grid = request.getfixturevalue("grid")
        yield TimeLimitedRun(slurm_cluster, tmp_path_factory.mktemp("limit"), grid)
    except Exception as e:  # the time-limit test reports it; the other tests go on
        yield Unstarted(e)


class Unstarted:
    def __init__(self, error: Exception) -> None:
        self.error = error

    def finish(self) -> tuple[int, str]:
        raise AssertionError(f"the time-limited run could not start: {self.error}")


# ----------------------------------------------------------------------------- twice
def test_the_same_sweep_submitted_twice_trains_each_run_once(slurm_cluster, tmp_path):
    """Two submissions of one sweep whose jobs start together: each run is trained by one job;
    the other job finds it held (or done) and skips it. Needs the run lock of issue 13."""
    grid = [*RUN, "objective.mask_ratio=0.5,0.3", "hydra.launcher.array_parallelism=2", HOLD]
    first = Sweep(slurm_cluster, tmp_path, "twice", *grid)
    second = Sweep(slurm_cluster, tmp_path, "twice", *grid)

    def both_submitted() -> list[str] | None:  # one sweep folder, so one .submitit for both
        arrays = {d.name for d in first.submitit.glob("[0-9]*") if d.name.isdigit()}
        return sorted(arrays, key=int) if len(arrays) == 2 else None

    # each submission checks its grid first
    arrays = wait_until(both_submitted, 300, "both submissions", every_s=POLL_S)
    for array in arrays:  # the first runs, and the second is submitted while it does
        slurm_cluster.command("scontrol", "release", array)
    results = [first.finish(), second.finish()]
    for array in arrays:
        settle(slurm_cluster, array)

    for mask_ratio in (0.5, 0.3):
        folder = run_folder(tmp_path, mask_ratio)
        run = record(folder)
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(line)["step"] for line in lines if line.endswith("}")]  # none torn
        assert run["attempts"] == 1 and steps == list(range(1, STEPS + 1)), (
            f"run {run['id']} (mask_ratio={mask_ratio}) was trained by both submissions' jobs: "
            f"{len(lines)} metric rows for {STEPS} steps, attempts={run['attempts']}; a run lock "
            "(issue 13) must let only one of them train"
        )
        assert run["status"] == "completed"
        # Both submissions' jobs for this point started before the run ended: the race was real.
        task = (0.5, 0.3).index(mask_ratio)
        finished = datetime.fromisoformat(run["finished_at"]).timestamp()
        for array in arrays:
            rows = {r["JobID"]: r for r in sacct(slurm_cluster, array)}
            assert int(rows[f"{array}_{task}"]["Start"]) <= finished, rows
    for code, output in results:  # the job that did not train skipped the run: no failure
        assert code == 0 and ", 0 failed" in summary(output), output[-3000:]


def test_time_limit_checkpoints_requeues_and_finishes(slurm_cluster, time_limited):
    code, output = time_limited.finish()
    job, steps = time_limited.job, time_limited.steps
    settle(slurm_cluster, job)
    assert code == 0, output[-3000:]
    assert summary(output) == "sweep: 1 completed, 0 skipped, 0 failed"
    folder = run_folder(time_limited.runs, 0.5)
    run = record(folder)
    states = [r["State"] for r in sacct(slurm_cluster, job, duplicates=True)]
    assert states == ["REQUEUED", "COMPLETED"], states
    assert run["status"] == "completed" and run["attempts"] == 2
    assert 0 < run["resumed_from_step"] < steps  # checkpointed mid-run, on the signal
    assert "SIGUSR2 received: checkpointing" in (folder / "train.log").read_text()
    assert [r["step"] for r in metric_rows(folder)] == list(range(1, steps + 1))
    logs = (time_limited.sweep.submitit / job).glob("*_log.*")
    assert "this job is timed-out" in "".join(p.read_text(errors="replace") for p in logs)
