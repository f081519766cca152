"""The launchers in ``launch/``: a real torchrun job through ``local.sh``, the Slurm batch scripts under
stub ``scontrol``/``srun``/``torchrun`` commands (argument lists, signal forwarding, requeue), the
Hydra sweep example's overrides, and a real Hydra multirun through hydra-submitit-launcher's local
executor (one job dir per point, no collisions).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from .launch_helpers import ROOT, env_for, output

pytestmark = pytest.mark.slow

LAUNCH = ROOT / "launch"
BASH = shutil.which("bash") or "/bin/bash"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))
HOSTS = ["node-a1", "node-b2"]
SYSTEM_PATH = "/usr/bin:/bin"

# Stub commands. Each logs what it was asked to do under $STUB_DIR, so a test can read it back.
STUBS = {
    "scontrol": f"""#!/usr/bin/env bash
echo "$*" >> "$STUB_DIR/scontrol.log"
if [[ $1 == show && $2 == hostnames ]]; then printf '%s\\n' {" ".join(HOSTS)}; fi
""",
    # Records argv (NUL-separated) and the environment; then exits STUB_SRUN_RC at once, or, with
    # STUB_SRUN_WAIT=1, waits for a signal, records its name and exits STUB_SRUN_RC.
    "srun": """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$STUB_DIR/srun.argv"
env > "$STUB_DIR/srun.env"
if [[ ${STUB_SRUN_WAIT:-0} == 1 ]]; then
    trap 'echo USR1 >> "$STUB_DIR/srun.signals"; exit "${STUB_SRUN_RC:-0}"' USR1
    trap 'echo TERM >> "$STUB_DIR/srun.signals"; exit "${STUB_SRUN_RC:-0}"' TERM
    touch "$STUB_DIR/srun.ready"
    for _ in $(seq 400); do sleep 0.05; done
    echo "stub srun: no signal came" >&2
    exit 99
fi
exit "${STUB_SRUN_RC:-0}"
""",
    # Only `torchrun --help` runs on the batch host; STUB_TORCHRUN_HELP stands for its output.
    "torchrun": """#!/usr/bin/env bash
echo "${STUB_TORCHRUN_HELP:-}"
""",
}
NEW_TORCHRUN_HELP = "--signals-to-handle SIGNALS_TO_HANDLE --shutdown-timeout SHUTDOWN_TIMEOUT"


def write_stubs(tmp: Path, **extra: str) -> Path:
    stub_dir = tmp / "stubs"
    stub_dir.mkdir(exist_ok=True)
    for name, text in {**STUBS, **extra}.items():
        path = stub_dir / name
        path.write_text(text)
        path.chmod(0o755)
    return stub_dir


def slurm_env(tmp: Path, stub_dir: Path, **extra: str) -> dict[str, str]:
    env = env_for(tmp, PATH=f"{stub_dir}:{SYSTEM_PATH}", STUB_DIR=str(stub_dir), SLURM_JOB_ID="123",
                  SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="4", SLURM_JOB_NODELIST="node-a1,node-b2")
    # Drop Slurm variables of a job the suite itself may run in, and the scripts' knobs.
    knobs = ("RUN_DIR", "MAX_RESTARTS", "RDZV_PORT", "TORCHRUN", "MAX_REQUEUES", "SHUTDOWN_TIMEOUT",
             "FORWARD_SIGNAL", "PYTHON", "MASTER_PORT")
    for key in [k for k in env if (k.startswith("SLURM_") or k in knobs) and k not in extra and k not in
                ("SLURM_JOB_ID", "SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE", "SLURM_JOB_NODELIST")]:
        del env[key]
    env.update(extra)
    return env


def recorded_argv(stub_dir: Path) -> list[str]:
    return (stub_dir / "srun.argv").read_bytes().decode().split("\0")[:-1]


def recorded_env(stub_dir: Path) -> dict[str, str]:
    lines = (stub_dir / "srun.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if "=" in line)


def scontrol_calls(stub_dir: Path) -> list[str]:
    log = stub_dir / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def run_batch(script: str, tmp: Path, env: dict[str, str], args: list[str],
              signal_to_send: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run a batch script as sbatch would (bash, in the submit directory); optionally signal it once
    its srun is running, as Slurm's ``--signal=B:USR1@120`` does."""
    proc = subprocess.Popen([BASH, str(LAUNCH / script), *args], cwd=tmp, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if signal_to_send is not None:
        ready = Path(env["STUB_DIR"]) / "srun.ready"
        deadline = time.monotonic() + 20
        while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ready.exists(), "the stub srun never started"
        os.kill(proc.pid, signal_to_send)
    try:
        stdout, stderr = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


# ---------------------------------------------------------------------------------------- syntax
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_launch_scripts_parse(script: Path) -> None:
    proc = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr


def test_every_launcher_is_covered() -> None:
    names = {p.name for p in SCRIPTS}
    assert {"local.sh", "slurm.sbatch", "slurm_srun.sbatch", "sweep_example.sh"} <= names


# ---------------------------------------------------------------------------------------- local.sh
@pytest.mark.long
def test_local_sh_runs_a_two_worker_job(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = env_for(tmp_path, NPROC="2", RUN_DIR=str(run_dir), PYTHON=sys.executable)
    overrides = ["data=digits", "model=mlp", "model.hidden=[32]", "trainer=smoke", "checkpoint=off"]
    proc = subprocess.run([BASH, str(LAUNCH / "local.sh"), *overrides], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, output(proc)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 40
    assert (run_dir / ".hydra").is_dir()
    assert not (run_dir / "checkpoints").exists()  # checkpoint=off was forwarded
    assert not (tmp_path / "outputs").exists()  # RUN_DIR was used, nothing else written


RECORD_ARGV = """#!/usr/bin/env bash
printf '%s\\0' "$@" > "$STUB_DIR/python.argv"
"""


@pytest.mark.parametrize(("gpu_lines", "nproc"), [(None, 2), (3, 3)], ids=["no-gpu", "three-gpus"])
def test_local_sh_knob_defaults(tmp_path: Path, gpu_lines: int | None, nproc: int) -> None:
    # nvidia-smi: missing (a stub that fails) or listing `gpu_lines` GPUs.
    listing = "".join(f"echo 'GPU {i}: Fake GPU (UUID: GPU-{i})'\n" for i in range(gpu_lines or 0))
    smi = "#!/usr/bin/env bash\n" + ("exit 9\n" if gpu_lines is None else listing)
    stub_dir = write_stubs(tmp_path, python=RECORD_ARGV, **{"nvidia-smi": smi})
    env = env_for(tmp_path, PATH=f"{stub_dir}:{SYSTEM_PATH}", STUB_DIR=str(stub_dir),
                  PYTHON=str(stub_dir / "python"))
    for knob in ("NPROC", "RUN_DIR", "MAX_RESTARTS"):
        env.pop(knob, None)
    proc = subprocess.run([BASH, str(LAUNCH / "local.sh"), "trainer=smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, output(proc)
    argv = (stub_dir / "python.argv").read_bytes().decode().split("\0")[:-1]
    assert argv == ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                    "--max-restarts=0", "-m", "localsgd.train", "trainer=smoke"]


# ---------------------------------------------------------------------------------------- slurm.sbatch
def test_slurm_sbatch_runs_one_torchrun_per_node(tmp_path: Path) -> None:
    stub_dir = write_stubs(tmp_path)
    env = slurm_env(tmp_path, stub_dir, STUB_TORCHRUN_HELP=NEW_TORCHRUN_HELP)
    proc = run_batch("slurm.sbatch", tmp_path, env, ["optimizer.lr=0.2", "trainer=smoke"])
    assert proc.returncode == 0, output(proc)
    argv = recorded_argv(stub_dir)
    assert argv[0] == "torchrun"
    for expected in ("--nnodes=2", "--nproc-per-node=4", "--rdzv-id=123", "--rdzv-backend=c10d",
                     f"--rdzv-endpoint={HOSTS[0]}:29623", "--max-restarts=3",
                     "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1", "--shutdown-timeout=90"):
        assert expected in argv, (expected, argv)
    # torchrun's own flags first, then the module, the run dir and the forwarded overrides.
    assert argv[-5:] == ["-m", "localsgd.train", "hydra.run.dir=outputs/slurm-123", "optimizer.lr=0.2",
                         "trainer=smoke"]
    assert recorded_env(stub_dir)["MASTER_ADDR"] == HOSTS[0]
    assert not any(c.startswith("requeue") for c in scontrol_calls(stub_dir))


def test_slurm_sbatch_knobs(tmp_path: Path) -> None:
    stub_dir = write_stubs(tmp_path)
    env = slurm_env(tmp_path, stub_dir, MAX_RESTARTS="1", RDZV_PORT="29611", RUN_DIR="elsewhere/run")
    env.pop("SLURM_GPUS_ON_NODE")
    proc = run_batch("slurm.sbatch", tmp_path, env, [])
    assert proc.returncode == 0, output(proc)
    argv = recorded_argv(stub_dir)
    assert {"--max-restarts=1", "--nproc-per-node=1", f"--rdzv-endpoint={HOSTS[0]}:29611"} <= set(argv)
    assert argv[-1] == "hydra.run.dir=elsewhere/run"
    # An older torchrun without --signals-to-handle gets neither flag.
    assert not [a for a in argv if a.startswith(("--signals-to-handle", "--shutdown-timeout"))]


@pytest.mark.parametrize(("help_text", "forwarded"), [(NEW_TORCHRUN_HELP, "USR1"), ("", "TERM")],
                         ids=["torchrun-passes-usr1", "older-torchrun"])
def test_slurm_sbatch_forwards_the_time_limit_signal_and_requeues(tmp_path: Path, help_text: str,
                                                                   forwarded: str) -> None:
    # torchrun exits 1 after its workers committed a checkpoint (it re-raises the signal), so the
    # script must requeue on the signal it got, not only on exit code 75.
    stub_dir = write_stubs(tmp_path)
    env = slurm_env(tmp_path, stub_dir, STUB_TORCHRUN_HELP=help_text, STUB_SRUN_WAIT="1", STUB_SRUN_RC="1")
    proc = run_batch("slurm.sbatch", tmp_path, env, ["trainer=smoke"], signal_to_send=signal.SIGUSR1)
    assert proc.returncode == 0, output(proc)
    assert (stub_dir / "srun.signals").read_text().split() == [forwarded]
    assert scontrol_calls(stub_dir)[-1] == "requeue 123"


@pytest.mark.parametrize(("srun_rc", "finished", "requeued", "script_rc"),
                         [(75, False, True, 0), (1, False, False, 1), (0, True, False, 0)],
                         ids=["exit-75-requeues", "failure-does-not", "success-does-not"])
def test_slurm_sbatch_requeue_decision(tmp_path: Path, srun_rc: int, finished: bool, requeued: bool,
                                       script_rc: int) -> None:
    stub_dir = write_stubs(tmp_path)
    if finished:
        (tmp_path / "outputs/slurm-123").mkdir(parents=True)
        (tmp_path / "outputs/slurm-123/summary.json").write_text("{}")
    env = slurm_env(tmp_path, stub_dir, STUB_SRUN_RC=str(srun_rc))
    proc = run_batch("slurm.sbatch", tmp_path, env, [])
    assert proc.returncode == script_rc, output(proc)
    assert ("requeue 123" in scontrol_calls(stub_dir)) == requeued


def test_slurm_sbatch_requeues_after_a_logged_preemption(tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs/slurm-123"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text(json.dumps({"event": "start", "step": 0}) + "\n"
                                           + json.dumps({"event": "preempted", "step": 96}) + "\n")
    stub_dir = write_stubs(tmp_path)
    proc = run_batch("slurm.sbatch", tmp_path, slurm_env(tmp_path, stub_dir, STUB_SRUN_RC="1"), [])
    assert proc.returncode == 0, output(proc)
    assert scontrol_calls(stub_dir)[-1] == "requeue 123"


def test_slurm_sbatch_stops_requeueing_after_max_requeues(tmp_path: Path) -> None:
    stub_dir = write_stubs(tmp_path)
    env = slurm_env(tmp_path, stub_dir, STUB_SRUN_RC="75", SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
    proc = run_batch("slurm.sbatch", tmp_path, env, [])
    assert proc.returncode == 75, output(proc)
    assert "requeue 123" not in scontrol_calls(stub_dir)


# ---------------------------------------------------------------------------------------- slurm_srun.sbatch
def test_slurm_srun_sbatch_starts_the_trainer_directly(tmp_path: Path) -> None:
    stub_dir = write_stubs(tmp_path)
    env = slurm_env(tmp_path, stub_dir, PYTHON="python3")
    proc = run_batch("slurm_srun.sbatch", tmp_path, env, ["optimizer.lr=0.2"])
    assert proc.returncode == 0, output(proc)
    assert recorded_argv(stub_dir) == ["python3", "-u", "-m", "localsgd.train",
                                       "hydra.run.dir=outputs/slurm-123", "optimizer.lr=0.2"]
    srun_env = recorded_env(stub_dir)
    assert srun_env["MASTER_ADDR"] == HOSTS[0] and srun_env["MASTER_PORT"] == "29623"
    assert "requeue 123" not in scontrol_calls(stub_dir)


def test_slurm_srun_sbatch_forwards_usr1_and_requeues_on_75(tmp_path: Path) -> None:
    stub_dir = write_stubs(tmp_path)
    env = slurm_env(tmp_path, stub_dir, STUB_SRUN_WAIT="1", STUB_SRUN_RC="75")
    proc = run_batch("slurm_srun.sbatch", tmp_path, env, [], signal_to_send=signal.SIGUSR1)
    assert proc.returncode == 0, output(proc)
    assert (stub_dir / "srun.signals").read_text().split() == ["USR1"]
    assert scontrol_calls(stub_dir)[-1] == "requeue 123"


# ---------------------------------------------------------------------------------------- sweep_example.sh
def test_sweep_example_overrides_compose_and_export_the_rendezvous(tmp_path: Path) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from submitit.slurm.slurm import _make_sbatch_string

    record_env = 'echo "SUBMITIT_PREEMPT_SIGNAL=$SUBMITIT_PREEMPT_SIGNAL" > "$STUB_DIR/python.env"\n'
    stub_dir = write_stubs(tmp_path, python=RECORD_ARGV + record_env)
    env = env_for(tmp_path, PATH=f"{stub_dir}:{SYSTEM_PATH}", STUB_DIR=str(stub_dir),
                  PYTHON=str(stub_dir / "python"), GPUS="8", PARTITION="gpu")
    proc = subprocess.run([BASH, str(LAUNCH / "sweep_example.sh"), "trainer=smoke"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, output(proc)
    argv = (stub_dir / "python.argv").read_bytes().decode().split("\0")[:-1]
    assert argv[:3] == ["-m", "localsgd.train", "-m"]
    assert (stub_dir / "python.env").read_text().strip() == "SUBMITIT_PREEMPT_SIGNAL=USR1"
    overrides = argv[3:]
    parsed = {o.key_or_group: o for o in OverridesParser.create().parse_overrides(overrides)}
    assert {k for k, o in parsed.items() if o.is_sweep_override()} == {"optimizer.lr", "schedule.H"}
    assert parsed["hydra.launcher.tasks_per_node"].value() == 8
    assert parsed["hydra.launcher.gpus_per_node"].value() == 8
    setup = parsed["hydra.launcher.setup"].value()
    assert len(setup) == 2 and all(line.startswith("export MASTER_") for line in setup)

    # The launcher config composes with these overrides (one point of the sweep).
    single = [o.split(",")[0] if o.startswith(("optimizer.lr=", "schedule.H=")) else o for o in overrides]
    cmd = [sys.executable, "-m", "localsgd.train", *single, "--cfg", "hydra", "-p", "hydra.launcher"]
    cfg = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True, timeout=60)
    assert cfg.returncode == 0, output(cfg)
    launcher = OmegaConf.create(cfg.stdout.split("\n", 1)[1])  # drop the "# @package" line
    assert launcher.setup == setup and launcher.partition == "gpu" and launcher.tasks_per_node == 8

    # The batch script submitit writes from it exports the first host and a job-id port before srun.
    batch = _make_sbatch_string(command="true", folder=str(tmp_path / "submitit"), setup=list(setup),
                                nodes=1, ntasks_per_node=8)
    (tmp_path / "job.sh").write_text(batch)
    job = subprocess.run([BASH, str(tmp_path / "job.sh")], cwd=tmp_path, capture_output=True, text=True,
                         timeout=30, env=slurm_env(tmp_path, stub_dir))
    assert job.returncode == 0, output(job)
    srun_env = recorded_env(stub_dir)
    assert srun_env["MASTER_ADDR"] == HOSTS[0] and srun_env["MASTER_PORT"] == str(20000 + 123 % 40000)


# ---------------------------------------------------------------------------------------- Hydra multirun
@pytest.mark.long
def test_hydra_multirun_with_submitit_local_gives_each_point_its_own_dir(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "localsgd.train", "-m", "hydra/launcher=submitit_local",
           "hydra.launcher.timeout_min=5", f"hydra.sweep.dir={sweep}", "optimizer.lr=0.05,0.1",
           "data=digits", "model=mlp", "model.hidden=[32]", "trainer=smoke", "trainer.threads=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env_for(tmp_path), capture_output=True, text=True,
                          timeout=150)
    assert proc.returncode == 0, output(proc)
    assert (sweep / "multirun.yaml").is_file()
    lrs = []
    for num in ("0", "1"):
        job = sweep / num
        assert (job / ".hydra/config.yaml").is_file() and (job / ".hydra/overrides.yaml").is_file()
        summary = json.loads((job / "summary.json").read_text())
        assert summary["world_size"] == 1 and summary["steps"] == 40
        assert Path(summary["run_dir"]) == job
        assert (job / "checkpoints/step-40/manifest.json").is_file()
        # One run per directory: started once, not resumed by the other point.
        starts = [json.loads(line) for line in (job / "metrics.jsonl").read_text().splitlines()
                  if '"start"' in line]
        assert len(starts) == 1 and starts[0]["resumed"] is False
        lrs.append(OmegaConf.load(job / ".hydra/config.yaml").optimizer.lr)
    assert sorted(lrs) == [0.05, 0.1]
    # Nothing else was written: no outputs/ or multirun/ beside the sweep, no third job dir.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("cache",)) == ["sweep"]
    visible = sorted(p.name for p in sweep.iterdir() if not p.name.startswith("."))
    assert visible == ["0", "1", "multirun.yaml"]
    logs = sorted((sweep / ".submitit").glob("*/*_0_log.out"))
    assert len(logs) == 2 and all("Job completed successfully" in p.read_text() for p in logs)
