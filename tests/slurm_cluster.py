"""A one-node SLURM cluster from Debian's packages, living in one folder: for tests and by hand.

    python tests/slurm_cluster.py start [FOLDER]   # prints: export SLURM_CONF=FOLDER/etc/slurm.conf
    python tests/slurm_cluster.py stop [FOLDER]
    make cluster-start / make cluster-stop           # the same with FOLDER=.slurm

munged, MariaDB, slurmdbd, slurmctld and slurmd run as the calling user with every config, key,
socket, pid, log, state, spool and database file under FOLDER, on free loopback ports, so the
cluster touches nothing else on the machine and several can run at once. Clients reach it through
SLURM_CONF. Each daemon's environment carries UAPT_SLURM_CLUSTER=FOLDER: `stop` signals only
processes that carry it (the daemons by their recorded pid, then any job step left behind), so a
reused pid or a neighbour's daemon is never touched. docs/cluster.md says what it covers.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

MARKER = "UAPT_SLURM_CLUSTER"
PACKAGES = "slurmctld slurmd slurmdbd munge slurm-client mariadb-server"
PARTITION = "debug"
CLUSTER_NAME = "uapt"
# Declared, not measured (SlurmdParameters=config_overrides): 8 one-core slots let array
# throttles and concurrent sweeps, not the test machine's 2 cores, decide what runs at once.
NODE_CPUS = 8
NODE_MEMORY_MB = 8192
KILL_WAIT_S = 5  # SIGTERM -> SIGKILL at a time limit, a requeue or scancel (default 30)
START_TIMEOUT_S = 90
SBIN = ("/usr/sbin", "/usr/bin", "/sbin", "/bin")
FOLDERS = ("etc", "run", "log", "state", "spool", "db", "tmp")  # all the cluster writes, in root
DAEMONS = ("munged", "mariadb-install-db", "mariadbd", "slurmdbd", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo", "sacct", "sacctmgr")
SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux
TIME_LIMIT_PASS = "Testing job time limits"  # slurmctld's debug2 line, every 30 s


class ClusterError(RuntimeError):
    """The cluster cannot start or stop; the message says why in one line."""


# ----------------------------------------------------------------------------- helpers
def find_program(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))
    if path is None:
        raise ClusterError(
            f"{name} not found: install {PACKAGES} (as root, `make test` does it with apt-get)"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def short_hostname() -> str:
    return socket.gethostname().split(".")[0]


def user_name() -> str:
    import pwd

    return pwd.getpwuid(os.getuid()).pw_name


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return {}
    pairs = (item.split(b"=", 1) for item in raw.split(b"\0") if b"=" in item)
    return {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip() for line in text[-lines:]) or "(empty log)"


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def wait_for(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()


# ----------------------------------------------------------------------------- the cluster
@dataclass
class Cluster:
    """One cluster in `root`. start() / stop(); env() for clients (sbatch, squeue, uapt-train)."""

    root: Path
    host: str = field(default_factory=short_hostname)
    user: str = field(default_factory=user_name)
    # True for a test session: the daemons get SIGTERM if the process that started them dies
    # (pytest killed), so none outlives it; False by hand, where they must outlive `start`.
    tied: bool = False
    pids: dict[str, int] = field(default_factory=dict)
    children: dict[str, subprocess.Popen] = field(default_factory=dict)
    db_password: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        self.root = Path(self.root).resolve()
        self.etc, self.run, self.log = self.root / "etc", self.root / "run", self.root / "log"
        self.conf = self.etc / "slurm.conf"
        self.munge_socket = self.run / "munge.sock"

    # -------------------------------------------------------------------- for clients
    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def command(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        """A SLURM client command against this cluster; its stdout."""
        proc = subprocess.run(
            list(args), env=self.env(), capture_output=True, text=True, timeout=timeout
        )
        if check and proc.returncode != 0:
            raise ClusterError(f"{' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc.stdout

    def next_time_limit_check(self, timeout_s: float = 40) -> None:
        """Return just after slurmctld's next periodic time-limit pass: every 30 s it sends the
        --signal warnings and kills jobs past their limit (logged at debug2)."""
        log, marker, seen = self.log / "slurmctld.log", TIME_LIMIT_PASS.encode(), [b""]
        with log.open("rb") as f:
            f.seek(0, os.SEEK_END)  # only a pass logged from now on counts

            def passed() -> bool:
                seen[0] = seen[0][-len(marker) :] + f.read()  # a line may arrive in pieces
                return marker in seen[0]

            if not wait_for(passed, timeout_s, 0.1):
                raise ClusterError(f"no time-limit pass logged in {timeout_s}s in {log}")

    # -------------------------------------------------------------------- start
    def start(self) -> None:
        if self.state_file.exists() and self.running():
            raise ClusterError(f"a cluster already runs in {self.root}: stop it first")
        programs = {name: find_program(name) for name in DAEMONS}
        for name in CLIENTS:
            find_program(name)
        if len(str(self.munge_socket)) > SOCKET_PATH_MAX:
            raise ClusterError(f"{self.root}: path too long for a unix socket; use a shorter one")
        ports = {name: free_port() for name in ("mariadb", "slurmdbd", "slurmctld", "slurmd")}
        self.write_files(ports)
        try:
            self.start_munge(programs["munged"])
            self.start_mariadb(programs["mariadb-install-db"], programs["mariadbd"], ports)
            self.start_slurmdbd(programs["slurmdbd"], ports["slurmdbd"])
            self.start_slurmctld(programs["slurmctld"])
            self.start_slurmd(programs["slurmd"])
        except BaseException:
            self.stop()
            raise

    @property
    def state_file(self) -> Path:
        return self.root / "daemons.json"

    def write_files(self, ports: dict[str, int]) -> None:
        for folder in FOLDERS:  # a fresh cluster each time: no state, jobs or accounting kept
            shutil.rmtree(self.root / folder, ignore_errors=True)
            (self.root / folder).mkdir(parents=True, mode=0o700)
        self.run.chmod(0o755)  # munged wants its socket's folder searchable by all
        key = self.etc / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        key.chmod(0o600)
        (self.etc / "plugstack.conf").write_text("")  # not the host's /etc/slurm one
        (self.etc / "slurm.conf").write_text(self.slurm_conf(ports))
        dbd = self.etc / "slurmdbd.conf"
        dbd.write_text(self.slurmdbd_conf(ports))
        dbd.chmod(0o600)  # slurmdbd refuses a config others can read (it holds a password)
        (self.etc / "init.sql").write_text(
            f"CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '{self.db_password}';\n"
            "GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';\n"
        )

    def slurm_conf(self, ports: dict[str, int]) -> str:
        r = self.root
        return f"""\
# Written by tests/slurm_cluster.py: a one-node cluster in {r}
ClusterName={CLUSTER_NAME}
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={ports["slurmctld"]}
SlurmdPort={ports["slurmd"]}
SlurmUser={self.user}
SlurmdUser={self.user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/run/slurmctld.pid
SlurmdPidFile={r}/run/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
# debug2 logs the 30-s time-limit pass, which tests/test_slurm.py times its time-limit job against
SlurmctldDebug=debug2
SlurmdLogFile={r}/log/slurmd.log
PlugStackConfig={r}/etc/plugstack.conf
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=512
JobRequeue=1
ReturnToService=2
MpiDefault=none
KillWait={KILL_WAIT_S}
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort={ports["slurmdbd"]}
AccountingStoragePass={self.munge_socket}
JobCompType=jobcomp/none
SlurmdParameters=config_overrides
NodeName={self.host} NodeAddr=127.0.0.1 NodeHostname={self.host} CPUs={NODE_CPUS} \
RealMemory={NODE_MEMORY_MB} State=UNKNOWN
PartitionName={PARTITION} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
"""

    def slurmdbd_conf(self, ports: dict[str, int]) -> str:
        r = self.root
        return f"""\
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
DbdAddr=127.0.0.1
DbdHost=localhost
DbdPort={ports["slurmdbd"]}
SlurmUser={self.user}
LogFile={r}/log/slurmdbd.log
PidFile={r}/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={ports["mariadb"]}
StorageUser=slurm
StoragePass={self.db_password}
StorageLoc=slurm_acct_db
"""

    def spawn(self, name: str, argv: Sequence[str]) -> None:
        """Start one daemon in the foreground of its own session; remember its pid."""
        env = {**self.env(), MARKER: str(self.root), "TMPDIR": str(self.root / "tmp")}
        with (self.log / f"{name}.out").open("ab") as out:
            proc = subprocess.Popen(
                list(argv),
                env=env,
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # by hand, the daemons outlive `start`
                preexec_fn=die_with_parent if self.tied else None,
            )
        self.children[name], self.pids[name] = proc, proc.pid
        self.state_file.write_text(json.dumps(self.pids))

    def ready(self, name: str, check: Callable[[], bool], log: Path) -> None:
        def up() -> bool:
            if not alive(self.pids[name]):
                raise ClusterError(f"{name} exited at start: {tail(log)}")
            return check()

        if not wait_for(up, START_TIMEOUT_S):
            raise ClusterError(f"{name} not ready after {START_TIMEOUT_S}s: {tail(log)}")

    def start_munge(self, munged: str) -> None:
        self.spawn(
            "munged",
            [
                munged,
                "--foreground",
                "--force",
                f"--key-file={self.etc / 'munge.key'}",
                f"--socket={self.munge_socket}",
                f"--pid-file={self.run / 'munged.pid'}",
                f"--log-file={self.log / 'munged.log'}",
                f"--seed-file={self.run / 'munged.seed'}",
            ],
        )
        self.ready("munged", self.munge_socket.exists, self.log / "munged.log")

    def start_mariadb(self, install_db: str, mariadbd: str, ports: dict[str, int]) -> None:
        db = self.root / "db"
        common = ["--no-defaults", f"--datadir={db}", "--innodb-log-file-size=8M"]
        as_root = ["--user=root"] if os.getuid() == 0 else []  # it refuses root unless told
        proc = subprocess.run(
            [install_db, *common, *as_root, "--skip-test-db", "--skip-name-resolve"],
            env={**os.environ, "TMPDIR": str(self.root / "tmp")},
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise ClusterError(f"mariadb-install-db failed: {proc.stderr.strip()[-300:]}")
        self.spawn(
            "mariadbd",
            [
                mariadbd,
                *common,
                *as_root,
                f"--socket={self.run / 'mariadb.sock'}",
                f"--port={ports['mariadb']}",
                "--bind-address=127.0.0.1",
                "--skip-name-resolve",
                f"--pid-file={self.run / 'mariadbd.pid'}",
                f"--log-error={self.log / 'mariadbd.log'}",
                f"--tmpdir={self.root / 'tmp'}",
                f"--init-file={self.etc / 'init.sql'}",
                "--innodb-buffer-pool-size=32M",
            ],
        )
        sock = self.run / "mariadb.sock"  # made once it takes connections (TCP too)
        self.ready("mariadbd", sock.exists, self.log / "mariadbd.log")

    def start_slurmdbd(self, slurmdbd: str, port: int) -> None:
        self.spawn("slurmdbd", [slurmdbd, "-D"])
        log = self.log / "slurmdbd.log"
        self.ready("slurmdbd", lambda: port_open(port), log)
        # The cluster must exist in the database before slurmctld registers with it.
        out = self.command("sacctmgr", "-i", "-n", "add", "cluster", CLUSTER_NAME, check=False)
        if CLUSTER_NAME not in self.command(
            "sacctmgr", "-n", "-P", "list", "cluster", "format=cluster"
        ):
            raise ClusterError(f"sacctmgr could not add cluster {CLUSTER_NAME}: {out.strip()}")

    def start_slurmctld(self, slurmctld: str) -> None:
        self.spawn("slurmctld", [slurmctld, "-D", "-f", str(self.conf)])

        def up() -> bool:
            return "UP" in self.command("scontrol", "ping", check=False)

        self.ready("slurmctld", up, self.log / "slurmctld.log")

    def start_slurmd(self, slurmd: str) -> None:
        self.spawn("slurmd", [slurmd, "-D", "-f", str(self.conf), "-N", self.host])

        def idle() -> bool:
            state = self.command("sinfo", "-h", "-N", "-o", "%T", check=False).strip()
            return state == "idle"

        self.ready("slurmd", idle, self.log / "slurmd.log")

    # -------------------------------------------------------------------- stop
    def running(self) -> bool:
        return any(self.ours(pid) for pid in self.recorded_pids().values())

    def recorded_pids(self) -> dict[str, int]:
        if self.pids:
            return dict(self.pids)
        try:
            return {k: int(v) for k, v in json.loads(self.state_file.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def ours(self, pid: int) -> bool:
        """Only a live process whose environment names this folder is ours to signal."""
        return alive(pid) and environ_of(pid).get(MARKER) == str(self.root)

    def stop(self) -> list[str]:
        """Cancel every job, then stop the daemons, newest first; returns what had to be killed
        (a daemon deaf to SIGTERM, a job step that outlived them)."""
        pids = self.recorded_pids()
        if "slurmctld" in pids and self.ours(pids["slurmctld"]):
            self.cancel_all_jobs()
        killed: list[str] = []
        for name, pid in reversed(list(pids.items())):
            if self.ours(pid) and not self.terminate(name, pid):
                killed.append(f"{name} (pid {pid})")
        killed += self.kill_leftovers()
        self.state_file.unlink(missing_ok=True)
        self.pids.clear()
        return killed

    def cancel_all_jobs(self) -> None:
        jobs = self.command("squeue", "-h", "-o", "%A", check=False).split()
        if jobs:
            self.command("scancel", *jobs, check=False)
            wait_for(lambda: not self.command("squeue", "-h", check=False).strip(), 30, 0.5)

    def terminate(self, name: str, pid: int, grace_s: float = 20) -> bool:
        """SIGTERM, then SIGKILL after grace_s; True when it ended on SIGTERM."""
        os.kill(pid, signal.SIGTERM)
        clean = wait_for(lambda: not alive(pid), grace_s)
        if not clean:
            os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not alive(pid), 10)
        if name in self.children:
            self.children.pop(name).wait(timeout=10)  # reap it: no zombie left behind
        return clean

    def kill_leftovers(self) -> list[str]:
        """Processes the daemons started (job steps) that outlived them."""
        left = []
        for entry in Path("/proc").iterdir():
            if (
                entry.name.isdigit()
                and int(entry.name) != os.getpid()
                and self.ours(int(entry.name))
            ):
                pid = int(entry.name)
                name = Path(f"/proc/{pid}/comm").read_text().strip() if alive(pid) else "?"
                os.kill(pid, signal.SIGKILL)
                left.append(f"{name} (pid {pid})")
        return left


# ----------------------------------------------------------------------------- by hand
def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["start", "stop"])
    parser.add_argument("folder", nargs="?", default=".slurm", help="the cluster's folder")
    args = parser.parse_args(argv)
    cluster = Cluster(Path(args.folder))
    try:
        if args.action == "start":
            started = time.monotonic()
            cluster.start()
            print(
                f"SLURM cluster up in {time.monotonic() - started:.1f}s: node {cluster.host}, "
                f"partition {PARTITION}, logs in {cluster.log}; use it with:",
                file=sys.stderr,
            )
            print(f"export SLURM_CONF={cluster.conf}")
        elif not cluster.running():
            print(f"no SLURM cluster runs in {cluster.root}", file=sys.stderr)
        else:
            killed = cluster.stop()
            print(f"SLURM cluster in {cluster.root} stopped", file=sys.stderr)
            if killed:
                print(f"had to SIGKILL: {', '.join(killed)}", file=sys.stderr)
    except ClusterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
