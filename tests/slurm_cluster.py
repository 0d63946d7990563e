"""A real one-node Slurm cluster for the tests: its own munged, slurmctld and slurmd.

Everything lives in a fresh temporary directory (config, state, spool, logs, munge socket); the
daemons run in the foreground as children of the test process, on ports of their own, so several
test runs on one machine don't meet, and :meth:`SlurmCluster.stop` ends exactly the processes it
started (by pid) plus any job step left behind with this cluster's ``SLURM_CONF``.

Needs the Debian packages ``slurmctld slurmd slurm-client munge`` (Slurm 22.05): `.ci/run`
installs them; :func:`ensure_slurm` installs them when missing and we are root, and otherwise
returns the reason to skip.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BINARIES = ["slurmctld", "slurmd", "sbatch", "scontrol", "munged", "munge", "unmunge"]


def _which(name: str) -> str | None:
    found = [f"{d}/{name}" for d in ("/usr/sbin", "/usr/bin") if os.access(f"{d}/{name}", os.X_OK)]
    return shutil.which(name) or (found[0] if found else None)


def ensure_slurm() -> str | None:
    """None when Slurm and munge are usable here, else why not (the tests skip with it)."""
    if all(_which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return ("Slurm is not installed (apt-get install slurmctld slurmd slurm-client munge, "
                "as root)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *PACKAGES]
    if subprocess.run(cmd, env=env, capture_output=True).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True)
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            return f"installing Slurm failed: {r.stderr[-500:]}"
    missing = [b for b in BINARIES if not _which(b)]
    return f"Slurm binaries missing after install: {missing}" if missing else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float, what: str, log: Path | None = None, interval: float = 0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = cond()
        if v:
            return v
        time.sleep(interval)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    raise TimeoutError(f"{what} did not happen within {timeout:.0f} s\n{tail}")


class SlurmCluster:
    """One node, one partition; ``SLURM_CONF`` in :attr:`env` points Slurm's commands at it."""

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="pare-slurm-"))
        self.root.chmod(0o755)  # slurmd/slurmstepd must read the spool dir and the config
        self.procs: dict[str, subprocess.Popen] = {}
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "slurm.conf"
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        for k in [k for k in self.env if k.startswith(("SLURM_", "SBATCH_", "SRUN_"))]:
            if k != "SLURM_CONF":
                del self.env[k]

    # -- bring-up -------------------------------------------------------------------------------
    def start(self) -> "SlurmCluster":
        try:
            self._start_munge()
            self._write_conf()
            for d in ("state", "spool", "log"):
                (self.root / d).mkdir()
            log = self.root / "log"
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", str(self.conf)],
                        log / "slurmctld.out")
            _wait(lambda: self.run("scontrol", "ping", check=False).stdout.count("UP"), 30,
                  "slurmctld answering", log / "slurmctld.log")
            self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", self.host],
                        log / "slurmd.out")
            _wait(lambda: "idle" in self.run("sinfo", "-h", "-o", "%T", check=False).stdout, 60,
                  "the node becoming idle", log / "slurmd.log")
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self):
        m = self.root / "munge"
        m.mkdir(mode=0o700)
        key = m / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        self.munge_socket = m / "munge.socket"
        self._spawn("munged", [_which("munged"), "--foreground", "--force",
                               f"--socket={self.munge_socket}", f"--key-file={key}",
                               f"--pid-file={m / 'munged.pid'}", f"--log-file={m / 'munged.log'}",
                               f"--seed-file={m / 'munged.seed'}"], m / "munged.out")

        def works():
            enc = subprocess.run([_which("munge"), "-n", f"--socket={self.munge_socket}"],
                                 capture_output=True)
            return enc.returncode == 0 and subprocess.run(
                [_which("unmunge"), f"--socket={self.munge_socket}"], input=enc.stdout,
                capture_output=True).returncode == 0
        _wait(works, 20, "munge -n | unmunge succeeding", m / "munged.log")

    def _write_conf(self):
        node = subprocess.run([_which("slurmd"), "-C"], capture_output=True, text=True,
                              check=True).stdout.splitlines()[0]
        cpus = int(re.search(r"CPUs=(\d+)", node).group(1))
        mem = int(re.search(r"RealMemory=(\d+)", node).group(1))
        r = self.root
        self.conf.write_text(f"""\
ClusterName=pare-test
SlurmctldHost={self.host}
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
FirstJobId={random.randint(1000, 90000)}
SchedulerParameters=sched_interval=1
InactiveLimit=0
KillWait=10
MinJobAge=600
NodeName={self.host} CPUs={cpus} RealMemory={mem} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def _spawn(self, name: str, cmd: list[str], out: Path):
        with open(out, "wb") as f:
            self.procs[name] = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT,
                                                env=self.env, start_new_session=True)

    # -- use --------------------------------------------------------------------------------------
    def run(self, *cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, **kw)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr}{r.stdout}")
        return r

    def sbatch(self, script: str, *flags: str, args: tuple = (), env: dict | None = None,
               cwd: str | None = None) -> int:
        r = subprocess.run(["sbatch", "--parsable", *flags, script, *args], cwd=cwd,
                           env=dict(self.env, **(env or {})), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {script} failed: {r.stderr}")
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, StdOut, …)."""
        for attempt in range(10):  # a busy slurmctld may drop a query (scontrol dies of SIGPIPE)
            r = self.run("scontrol", "-o", "show", "job", str(job_id), check=attempt == 9)
            if r.returncode == 0:
                break
            time.sleep(1)
        out = r.stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait(self, job_id: int, until=lambda j: j["JobState"] in FINAL, timeout: float = 600,
             interval: float = 0.5) -> dict:
        """Poll the job (sbatch --wait polls at 2, 10, 42, 74 s…) until ``until(job)``."""
        last = {}

        def check():
            nonlocal last
            last = self.job(job_id)
            return last if until(last) else None
        try:
            return _wait(check, timeout, f"job {job_id} condition", interval=interval)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nlast state: {last}\n{self.output(last)}") from None

    @staticmethod
    def output(job: dict) -> str:
        p = Path(job.get("StdOut", ""))
        return p.read_text(errors="replace")[-6000:] if p.is_file() else ""

    # -- tear-down -------------------------------------------------------------------------------
    def stop(self):
        for p in _job_processes(self.conf):  # job steps (slurmstepd and tasks) left behind
            _kill(p)
        for name in ("slurmd", "slurmctld", "munged"):
            p = self.procs.pop(name, None)
            if p is None or p.poll() is not None:
                continue
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for p in _job_processes(self.conf):
            _kill(p)
        shutil.rmtree(self.root, ignore_errors=True)


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
         "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _job_processes(conf: Path) -> list[int]:
    """pids of processes whose environment names this cluster's SLURM_CONF."""
    me, mark = os.getpid(), f"SLURM_CONF={conf}".encode()
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        try:
            if mark in (d / "environ").read_bytes().split(b"\0"):
                pids.append(int(d.name))
        except OSError:
            pass
    return pids


def _kill(pid: int):
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass
