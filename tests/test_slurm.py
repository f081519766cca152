"""The Slurm launchers on a real one-node Slurm cluster stood up for this module.

The fixture installs Debian's ``slurm-wlm`` when ``slurmctld`` is missing (root and apt needed, or the
module is skipped), writes a minimal ``slurm.conf`` for this host with its real CPUs and memory
(``slurmd -C``), starts ``munged``, ``slurmctld`` and ``slurmd`` in a temporary directory on free ports,
and stops them and removes the directory afterwards. The tests then ``sbatch`` the unmodified
``launch/slurm.sbatch`` and ``launch/slurm_srun.sbatch`` and run ``launch/sweep_example.sh`` through
hydra-submitit-launcher, each with a tiny two-worker CPU run, and check the runs' ``summary.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .distributed import free_port
from .launch_helpers import ROOT, TINY, env_for

# Installing slurm-wlm on a fresh machine can take minutes, and the fixture's set-up counts towards the
# first test's timeout.
pytestmark = [pytest.mark.slow, pytest.mark.slurm, pytest.mark.timeout(900)]

LAUNCH = ROOT / "launch"
BASH = shutil.which("bash") or "/bin/bash"
JOB_TIMEOUT = 120  # seconds for one job to finish; each takes ~10-20 s on 2 CPUs
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
# The scripts' knobs: a value from the calling environment would change what they run.
KNOBS = ("RUN_DIR", "NPROC_PER_NODE", "MAX_RESTARTS", "RDZV_PORT", "TORCHRUN", "MAX_REQUEUES",
         "SHUTDOWN_TIMEOUT", "FORWARD_SIGNAL", "PYTHON", "GPUS", "PARTITION", "TIME_MIN", "SWEEP_DIR")


@dataclass
class Cluster:
    root: Path
    conf: Path
    node: str
    cpus: int

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a submitting user of this checkout: the venv first on PATH, this cluster's
        slurm.conf, no Slurm variables of a job the suite may itself run in, none of the scripts' knobs."""
        env = env_for(self.root, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        for key in [k for k in env if k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) or k in KNOBS]:
            del env[key]
        env.update({"SLURM_CONF": str(self.conf), **extra})
        return env

    def run(self, *cmd: str, timeout: float = 30, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(cmd), env=self.env(), capture_output=True, text=True, timeout=timeout, **kw)

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name} (tail)\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)


# ---------------------------------------------------------------------------------------- set-up
def _install_slurm() -> None:
    """apt-get install slurm-wlm, or skip the module saying why it cannot be."""
    if shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged"):
        return
    if os.geteuid() != 0:
        pytest.skip("Slurm is not installed, and installing it (apt-get install slurm-wlm) needs root")
    if not shutil.which("apt-get"):
        pytest.skip("Slurm is not installed, and there is no apt-get to install slurm-wlm with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm"]):
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"`{' '.join(cmd)}` did not finish in 600 s (no network?)")
        if proc.returncode != 0:
            pytest.skip(f"cannot install Slurm: `{' '.join(cmd)}` exited {proc.returncode}: {proc.stderr[-600:]}")
    if not (shutil.which("slurmctld") and shutil.which("slurmd") and shutil.which("munged")):
        pytest.skip("apt-get installed slurm-wlm, but slurmctld, slurmd or munged is still not on PATH")


def _node_line() -> tuple[str, int]:
    """This host's NodeName line as slurmd detects it (its real CPUs, sockets, cores and memory)."""
    proc = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("NodeName=")), "")
    cpus = re.search(r"\bCPUs=(\d+)", line)
    if proc.returncode != 0 or not cpus:
        pytest.skip(f"`slurmd -C` did not describe this node: {proc.stdout}{proc.stderr}")
    return line, int(cpus.group(1))


def _slurm_conf(root: Path, node_line: str, munge_socket: Path) -> str:
    node = node_line.split()[0].split("=", 1)[1]
    return f"""\
# A one-node cluster for tests/test_slurm.py; everything it writes stays under {root.name}/.
ClusterName=localsgd-test
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
{node_line} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def _start(cmd: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        # A session of its own: the daemons' process groups can be signalled without touching pytest's.
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


def _cancel_all(cluster: Cluster) -> None:
    """Cancel this cluster's jobs and wait for them to end, so that no job step outlives slurmd."""
    try:
        cluster.run("scancel", "--full", "--partition=debug", "--user", "root", timeout=15)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if not cluster.run("squeue", "-h", "-o", "%i", timeout=15).stdout.strip():
                return
            time.sleep(0.5)
    except (OSError, subprocess.SubprocessError):
        pass


@pytest.fixture(scope="module")
def slurm() -> Iterator[Cluster]:
    started = time.monotonic()
    _install_slurm()
    if os.geteuid() != 0:
        pytest.skip("slurmd has to run as root to start jobs")
    node_line, cpus = _node_line()
    if cpus < 2:
        pytest.skip(f"the tests run 2 workers on one node, and this node has {cpus} CPU")
    # A short path: the munge socket path must fit in a sockaddr_un (108 bytes).
    root = Path(tempfile.mkdtemp(prefix="localsgd-slurm-"))
    procs: list[subprocess.Popen[bytes]] = []
    cluster = Cluster(root, root / "slurm.conf", node_line.split()[0].split("=", 1)[1], cpus)
    try:
        for sub in ("state", "spool", "munge", "jobs"):
            (root / sub).mkdir()
        (root / "munge").chmod(0o700)
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = root / "munge" / "munge.socket"
        cluster.conf.write_text(_slurm_conf(root, node_line, sock))
        env = cluster.env()
        # --force: munged refuses to start as root or in a directory it does not trust without it.
        procs.append(_start(["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={sock}",
                             f"--pid-file={root}/munge/munged.pid", f"--seed-file={root}/munge/munged.seed",
                             f"--log-file={root}/munge/munged.log"], root / "munged.out", env))
        deadline = time.monotonic() + 20
        while not sock.exists() and procs[0].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if not sock.exists():
            pytest.fail(f"munged did not start: {(root / 'munged.out').read_text(errors='replace')}")
        # -D: foreground (the fixture owns the process); -i: ignore any saved state.
        procs.append(_start(["slurmctld", "-D", "-i", "-f", str(cluster.conf)], root / "slurmctld.out", env))
        procs.append(_start(["slurmd", "-D", "-f", str(cluster.conf)], root / "slurmd.out", env))
        deadline = time.monotonic() + 60
        state = ""
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            proc = cluster.run("sinfo", "-h", "-N", "-o", "%T", timeout=15)
            state = proc.stdout.strip()
            if state == "idle":
                break
            time.sleep(0.5)
        if state != "idle":
            outs = "".join((root / f"{n}.out").read_text(errors="replace") for n in ("slurmctld", "slurmd"))
            pytest.fail(f"the node did not become idle (sinfo: {state!r})\n{outs[-3000:]}\n{cluster.logs()}")
        print(f"local Slurm up after {time.monotonic() - started:.1f} s: node {cluster.node}, {cpus} CPUs")
        yield cluster
    finally:
        if len(procs) == 3 and procs[1].poll() is None:
            _cancel_all(cluster)
        for proc in reversed(procs):
            _stop(proc)
        shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------------------- helpers
def sbatch(cluster: Cluster, script: str, sbatch_args: list[str], overrides: list[str], **env: str) -> str:
    proc = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(LAUNCH / script), *overrides],
                          cwd=cluster.root / "jobs", env=cluster.env(**env), capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, f"sbatch failed: {proc.stdout}{proc.stderr}"
    return proc.stdout.strip().split(";")[0]


def wait_for(cluster: Cluster, job_id: str, timeout: float = JOB_TIMEOUT) -> dict[str, str]:
    """Poll the job's record in slurmctld (no accounting here, so no sacct) until it has ended."""
    deadline = time.monotonic() + timeout
    fields: dict[str, str] = {}
    while time.monotonic() < deadline:
        proc = cluster.run("scontrol", "-o", "show", "job", job_id, timeout=15)
        fields = dict(f.split("=", 1) for f in proc.stdout.split() if "=" in f)
        if fields.get("JobState") in FINISHED:
            return fields
        time.sleep(0.5)
    cluster.run("scancel", job_id)
    pytest.fail(f"job {job_id} did not finish in {timeout} s: {fields.get('JobState')} "
                f"({fields.get('Reason')})\n{job_log(cluster, job_id)}\n{cluster.logs()}")


def job_log(cluster: Cluster, job_id: str) -> str:
    path = cluster.root / "jobs" / f"slurm-{job_id}.out"
    return f"--- {path.name}\n" + (path.read_text(errors="replace")[-6000:] if path.exists() else "(none)")


def check_run(run_dir: Path, world_size: int = 2) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == world_size and summary["steps"] == 40, summary


# ---------------------------------------------------------------------------------------- tests
def test_slurm_sbatch_runs_unmodified_with_two_cpu_workers(slurm: Cluster) -> None:
    # The header's defaults: one node, one torchrun with --cpus-per-task=2, so 2 Gloo workers.
    run_dir = slurm.root / "torchrun-run"
    job = sbatch(slurm, "slurm.sbatch", [], TINY, RUN_DIR=str(run_dir))
    fields = wait_for(slurm, job)
    log = job_log(slurm, job)
    assert fields["JobState"] == "COMPLETED", f"{fields.get('ExitCode')}\n{log}"
    check_run(run_dir)
    assert "1 node(s) x 2 worker(s)" in log and f"{slurm.node}:{29500 + int(job) % 20000}" in log, log


def test_slurm_sbatch_rendezvous_port_follows_the_job_id(slurm: Cluster) -> None:
    # Two jobs on the same node at the same time, one worker each. With one fixed port both torchruns
    # would use the store of whichever started first, and the other fails when that one exits.
    runs = [slurm.root / f"port-run-{i}" for i in range(2)]
    jobs = [sbatch(slurm, "slurm.sbatch", ["--cpus-per-task=1"], TINY, RUN_DIR=str(run)) for run in runs]
    ports = []
    for job, run in zip(jobs, runs):
        fields = wait_for(slurm, job)
        log = job_log(slurm, job)
        assert fields["JobState"] == "COMPLETED", log
        check_run(run, world_size=1)
        found = re.search(rf"rendezvous {re.escape(slurm.node)}:(\d+),", log)
        assert found and int(found.group(1)) == 29500 + int(job) % 20000, log
        ports.append(found.group(1))
    assert ports[0] != ports[1]


def test_slurm_srun_sbatch_runs_unmodified_with_two_tasks(slurm: Cluster) -> None:
    run_dir = slurm.root / "srun-run"
    job = sbatch(slurm, "slurm_srun.sbatch", [], TINY, RUN_DIR=str(run_dir))
    fields = wait_for(slurm, job)
    assert fields["JobState"] == "COMPLETED", f"{fields.get('ExitCode')}\n{job_log(slurm, job)}"
    check_run(run_dir)


def test_sweep_example_runs_through_submitit_on_slurm(slurm: Cluster) -> None:
    # Two points (optimizer.lr=0.05,0.1; schedule.H pinned), each a job with 2 srun tasks on the CPUs:
    # later overrides win, so the extra arguments drop the example's GPU request and its 8 CPUs per task.
    sweep_dir = slurm.root / "sweep"
    env = slurm.env(GPUS="2", TIME_MIN="10", SWEEP_DIR=str(sweep_dir), PYTHON=sys.executable)
    cmd = [BASH, str(LAUNCH / "sweep_example.sh"), "hydra.launcher.gpus_per_node=null",
           "hydra.launcher.cpus_per_task=1", "schedule.H=4", *(o for o in TINY if not o.startswith("optimizer.lr="))]
    try:
        proc = subprocess.run(cmd, cwd=slurm.root / "jobs", env=env, capture_output=True, text=True,
                              timeout=2 * JOB_TIMEOUT)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"the sweep did not finish in {2 * JOB_TIMEOUT} s: {err.stderr}\n{slurm.logs()}")
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    points = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in points] == ["0", "1"], list(sweep_dir.iterdir())
    for point in points:
        check_run(point)

