"""A real single-node SLURM for the tests: munged, slurmctld and slurmd on this machine,
started from a config written into a temporary folder and stopped when the tests are done.

Everything lives in that folder (config, munge key and socket, state, spool, logs), so nothing
of it touches /etc, /run or /var and nothing stays behind: the daemons listen on free ports,
munged on its own socket (slurm.conf's AuthInfo), and at the end every process that carries
this cluster's SLURM_CONF in its environment (daemons, job steps, the jobs' own processes)
is gone. Without root or without Debian's `slurm-wlm` and `munge` the tests skip, naming why.
"""
from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
from helpers_net import free_port

from powergrad.system.distributed import SLURM_PORT_BASE, SLURM_PORT_SPAN

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
JOB_IDS = 50  # job ids the tests may use; srun's rendezvous port comes from the job id
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def why_slurm_cannot_start() -> str | None:
    """The reason these tests skip on this machine, or None."""
    if os.geteuid() != 0:
        return "a real SLURM needs root (slurmd runs jobs as their user, munged as munge)"
    missing = [name for name in DAEMONS + COMMANDS
               if not shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        return (f"{', '.join(missing)} not installed: Debian's slurm-wlm and munge "
                "(`make setup` installs them)")
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no user munge (Debian's munge package creates it)"
    return None


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _ports_free(ports) -> bool:
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                return False
    return True


def first_job_id() -> int:
    """A first job id whose next JOB_IDS rendezvous ports (powergrad's 15000 + id mod 17000
    under srun) are free now, drawn at random so two clusters rarely pick the same."""
    for _ in range(200):
        first = random.randrange(1000, 1000 + SLURM_PORT_SPAN * 20)
        if _ports_free(SLURM_PORT_BASE + (first + i) % SLURM_PORT_SPAN for i in range(JOB_IDS)):
            return first
    raise RuntimeError("no free range of rendezvous ports for SLURM's job ids")


@dataclass
class Slurm:
    """A running cluster of one node: `env` (SLURM_CONF among it) for every command."""
    root: Path
    host: str
    env: dict
    daemons: dict = field(default_factory=dict)  # name -> Popen

    def run(self, *args: str, check: bool = True) -> str:
        done = subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=60)
        if check and done.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {done.returncode}: "
                                 f"{done.stdout}{done.stderr}\n{self.logs()}")
        return done.stdout

    def sbatch(self, script: Path, *options: str, env: dict | None = None) -> int:
        """Submit a batch script (options as sbatch's command line); its job id."""
        done = subprocess.run(["sbatch", "--parsable", "--export=ALL", *options, str(script)],
                              env=env or self.env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
        return int(done.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job`'s fields (JobState, Reason, Restarts, ExitCode, ...)."""
        text = self.run("scontrol", "show", "job", "-o", str(job_id))
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def wait_for_job(self, job_id: int, done, seconds: float, what: str) -> dict:
        """Poll the job until done(fields) holds; fail after `seconds` with its state."""
        deadline = time.monotonic() + seconds
        while True:
            fields = self.job(job_id)
            if done(fields):
                return fields
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id}: no {what} after {seconds:.0f} s: "
                                     f"{fields.get('JobState')} {fields.get('Reason')}\n"
                                     f"{self.logs()}")
            time.sleep(0.5)

    def release(self, job_id: int) -> float:
        """Let a requeued job start now instead of at its begin time, about two minutes
        after the requeue; returns the seconds it would have waited."""
        # Not within the second of the requeue: slurmd revokes the old allocation's job
        # credential by time and then refuses the new one too ("Job credential revoked"; the
        # job fails with exit code 1 without running: seen here with an immediate release).
        time.sleep(2)
        fields = self.job(job_id)
        assert fields["JobState"] == "PENDING", fields
        begin = datetime.strptime(fields["StartTime"], "%Y-%m-%dT%H:%M:%S")
        self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        return (begin - datetime.now()).total_seconds()

    def logs(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.root / "log").glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            out.append(f"--- {log.name}\n" + "\n".join(tail))
        return "\n".join(out)


def _config(root: Path, host: str, munge_socket: Path) -> str:
    cpus = os.cpu_count() or 1
    return f"""\
ClusterName=powergradtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobRequeue=1
MpiDefault=none
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MailProg=/bin/true
FirstJobId={first_job_id()}
# short timeouts: a test waits on them
SlurmctldTimeout=10
SlurmdTimeout=10
MessageTimeout=10
KillWait=10
InactiveLimit=0
ReturnToService=2
# finished jobs stay visible to `scontrol show job` for the whole session
MinJobAge=3600
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _ours(conf: Path) -> list[int]:
    """Processes with this cluster's SLURM_CONF in their environment: its daemons (given it
    at start), job steps (slurmd's children) and the jobs' processes (sbatch --export=ALL)."""
    marker = f"SLURM_CONF={conf}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # ended meanwhile, or not readable
            continue
    return pids


def _wait_until(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def start_slurm() -> Slurm:
    root = Path(tempfile.mkdtemp(prefix="powergrad-slurm-"))
    root.chmod(0o755)  # munged, as user munge, must reach its folder inside
    for sub in ("state", "spool", "log"):
        (root / sub).mkdir()
    munge_dir = root / "munge"
    munge_dir.mkdir(mode=0o755)  # munged refuses a socket folder others cannot enter
    shutil.chown(munge_dir, "munge", "munge")
    host = socket.gethostname()
    conf = root / "slurm.conf"
    munge_socket = munge_dir / "munged.socket"
    conf.write_text(_config(root, host, munge_socket))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(SLURM_CONF=str(conf), PATH=env.get("PATH", "") + ":/usr/sbin:/sbin")
    slurm = Slurm(root, host, env)
    try:
        # a key of this cluster's own: /etc/munge stays as the package left it
        subprocess.run([_which("mungekey"), "--create", f"--keyfile={munge_dir}/munge.key"],
                       user="munge", group="munge", check=True, capture_output=True)
        munge_opts = [f"--{name}={munge_dir}/munged.{ext}" for name, ext in
                      (("socket", "socket"), ("pid-file", "pid"), ("log-file", "log"),
                       ("seed-file", "seed"))]
        slurm.daemons["munged"] = _start(
            [_which("munged"), "--foreground", f"--key-file={munge_dir}/munge.key",
             *munge_opts], root / "log" / "munged.out", env, user="munge")
        assert _wait_until(munge_socket.exists, 30), \
            "munged did not start: " + (root / "log" / "munged.out").read_text()[-2000:]
        slurm.daemons["slurmctld"] = _start([_which("slurmctld"), "-D", "-f", str(conf)],
                                            root / "log" / "slurmctld.out", env)
        slurm.daemons["slurmd"] = _start([_which("slurmd"), "-D", "-f", str(conf)],
                                         root / "log" / "slurmd.out", env)

        def idle() -> bool:
            for name, proc in slurm.daemons.items():
                assert proc.poll() is None, f"{name} exited {proc.returncode}\n{slurm.logs()}"
            state = slurm.run("sinfo", "-h", "-n", host, "-o", "%t", check=False).strip()
            return state == "idle"

        assert _wait_until(idle, 60), f"the node is not idle after 60 s\n{slurm.logs()}"
    except BaseException:
        stop_slurm(slurm)
        raise
    return slurm


def _start(cmd: list[str], log: Path, env: dict, user: str | None = None) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                user=user, group=user)


def stop_slurm(slurm: Slurm) -> None:
    """Cancel every job, stop the daemons (slurmd first), end any process of the cluster that
    outlived them, and delete the folder. Raises when a process of it survives SIGKILL."""
    conf = slurm.root / "slurm.conf"
    ctld = slurm.daemons.get("slurmctld")
    try:
        if ctld is not None and ctld.poll() is None:
            jobs = slurm.run("squeue", "-h", "-o", "%i", check=False).split()
            if jobs:
                slurm.run("scancel", *jobs, check=False)
                _wait_until(lambda: not slurm.run("squeue", "-h", "-o", "%i",
                                                  check=False).strip(), 60)
    except subprocess.TimeoutExpired:  # a hung slurmctld: its jobs' processes are ended below
        pass
    for name in ("slurmd", "slurmctld", "munged"):
        proc = slurm.daemons.get(name)
        if proc is None or proc.poll() is not None:
            continue
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    for pid in _ours(conf):  # a job step's processes that the cancel did not reach
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    left = [] if _wait_until(lambda: not _ours(conf), 30) else _ours(conf)
    shutil.rmtree(slurm.root, ignore_errors=True)
    assert not left, f"processes of the test SLURM outlived it: {left}"


@pytest.fixture(scope="session")
def slurm():
    """A running single-node SLURM for the session; skips where it cannot start."""
    reason = why_slurm_cannot_start()
    if reason:
        pytest.skip(reason)
    cluster = start_slurm()
    yield cluster
    stop_slurm(cluster)
