"""``localsgd-run`` (:mod:`localsgd.run`): config errors in one line before any worker, worker failures without
torchrun's ``ChildFailedError`` block, and a real two-worker run that writes its summary."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from localsgd import run as launcher

from .distributed import free_port
from .launch_helpers import TINY, env_for, output

CONSOLE_SCRIPT = Path(sys.executable).with_name("localsgd-run")
ELASTIC_NOISE = ("ChildFailedError", "torch.distributed.elastic", "torch/distributed/elastic", "SignalException",
                 "OMP_NUM_THREADS")


def localsgd_run(tmp: Path, args: list[str], console_script: bool = True, timeout: float = 180,
                 **env: str) -> subprocess.CompletedProcess[str]:
    """Start the launcher as a user does: the installed ``localsgd-run`` script, else ``python -m localsgd.run``."""
    entry = [str(CONSOLE_SCRIPT)] if console_script and CONSOLE_SCRIPT.exists() else [sys.executable, "-m",
                                                                                     "localsgd.run"]
    launch_env = env_for(tmp, **env)
    launch_env.pop("OMP_NUM_THREADS")  # so torch's OMP_NUM_THREADS banner would show, were it not quieted
    return subprocess.run([*entry, *args], cwd=tmp, env=launch_env, capture_output=True, text=True, timeout=timeout)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_config_error_is_one_line_before_any_worker(tmp_path: Path) -> None:
    """A value out of range, through ``python -m localsgd.run`` in a subprocess: exit 2, one line, no worker."""
    run_dir = tmp_path / "run"
    started = time.monotonic()
    proc = localsgd_run(tmp_path, ["--nproc-per-node", "2", f"hydra.run.dir={run_dir}", "trainer.max_steps=-1"],
                        console_script=False, timeout=60)
    elapsed = time.monotonic() - started
    lines = error_lines(proc.stderr)
    assert proc.returncode == 2, output(proc)
    assert len(lines) == 1 and lines[0].startswith("localsgd: ") and "trainer.max_steps=-1" in lines[0], output(proc)
    assert "Traceback" not in proc.stdout + proc.stderr and proc.stdout.strip() == "", output(proc)
    assert not run_dir.exists(), "a worker started: it created the run directory"
    assert elapsed < 45, f"took {elapsed:.1f} s: workers were started?"


def test_combination_error_is_one_line_before_any_worker(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Checked with the launch's world size in the launcher's own process (so in-process here: fast)."""
    run_dir = tmp_path / "run"
    assert launcher.main(["--nproc-per-node", "2", f"hydra.run.dir={run_dir}", "schedule=ddp",
                          "ramp=noise_scale"]) == 2
    captured = capsys.readouterr()
    lines = error_lines(captured.err)
    assert len(lines) == 1 and lines[0].startswith("localsgd: ") and "schedule=ddp" in lines[0], captured
    assert "Traceback" not in captured.out + captured.err and not run_dir.exists()


def test_a_typo_hydra_refuses_gets_the_did_you_mean_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert launcher.main(["trainer.max_step=10"]) == 2
    assert error_lines(capsys.readouterr().err) == [
        "localsgd: unknown config key(s): trainer.max_step=10 (did you mean trainer.max_steps?); check the "
        "spelling or the selected group option"]


def test_multirun_is_refused_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert launcher.main(["-m", "optimizer.lr=0.05,0.1"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and lines[0].startswith("localsgd: multirun"), lines
    assert "hydra/launcher=submitit_local" in lines[0]


def test_command_line_split() -> None:
    own, passed, overrides = launcher.split_argv(
        ["--nproc-per-node", "3", "--rdzv-endpoint", "127.0.0.1:1234", "--max-restarts=1", "data=digits",
         "--verbose", "+trainer.extra=1", "--", "~ramp"])
    assert own == ["--nproc-per-node", "3", "--verbose"]
    assert passed == ["--rdzv-endpoint", "127.0.0.1:1234", "--max-restarts=1"]
    assert overrides == ["data=digits", "+trainer.extra=1", "~ramp"]
    for refused in (["--cfg", "job"], ["--no-python"], ["--signals-to-handle=SIGINT"]):
        with pytest.raises(launcher.LaunchError, match="unknown option"):
            launcher.split_argv(refused)
    argv = launcher.torchrun_argv(passed=[], nnodes="1", nproc=2, overrides=["data=digits"])
    assert "--standalone" in argv and argv[-3:] == ["-m", "localsgd.train", "data=digits"]
    assert "--standalone" not in launcher.torchrun_argv(["--rdzv-endpoint=h:1"], "1", 2, [])


def test_worker_exit_codes() -> None:
    assert launcher.exit_code(17) == 17 and launcher.exit_code(-9) == 137
    assert launcher.failure_line(1, 17) == "localsgd-run: rank 1 exited with code 17"
    assert launcher.failure_line(0, 2) is None and launcher.failure_line(0, 75) is None  # the worker said it
    assert launcher.failure_line(1, -9) == "localsgd-run: rank 1 was killed by SIGKILL (exit 137)"


@pytest.mark.long
@pytest.mark.slow
def test_tiny_run_writes_summary(tmp_path: Path) -> None:
    """Standalone rendezvous: torch's agent binds port 0, so parallel launches cannot collide."""
    run_dir = tmp_path / "run"
    proc = localsgd_run(tmp_path, ["--nproc-per-node", "2", f"hydra.run.dir={run_dir}", *TINY,
                                   "trainer.max_steps=16", "trainer.eval_every=0"])
    assert proc.returncode == 0, output(proc)
    assert (run_dir / "summary.json").is_file(), output(proc)
    assert "final eval accuracy" in proc.stdout, output(proc)  # the workers' own output passes through
    assert not any(noise in proc.stdout + proc.stderr for noise in ELASTIC_NOISE), output(proc)


@pytest.mark.long
@pytest.mark.slow
def test_worker_failure_is_one_launcher_line(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = localsgd_run(tmp_path, ["--rdzv-backend", "c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
                                   "--nproc-per-node", "2", f"hydra.run.dir={run_dir}", *TINY,
                                   "trainer.max_steps=16", "trainer.eval_every=0"],
                        LOCALSGD_FAULT="kill:rank=1,step=3")
    # Whichever rank torch's agent sees fail first gives the exit code: the killed rank 1 (17), or rank 0,
    # whose next collective then fails (1) after its one line naming the timeout.
    lines = error_lines(proc.stderr)
    assert (proc.returncode, lines[-1]) in ((17, "localsgd-run: rank 1 exited with code 17"),
                                            (1, "localsgd-run: rank 0 exited with code 1")), output(proc)
    assert all(line.startswith(("localsgd: CollectiveTimeout: rank 0:", "localsgd-run:")) for line in lines), lines
    assert "Traceback" not in proc.stdout + proc.stderr, output(proc)
    assert not any(noise in proc.stdout + proc.stderr for noise in ELASTIC_NOISE), output(proc)
