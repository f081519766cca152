"""Checkpoints and run directories under faults: kills mid-save, unreadable and full disks, two jobs.

Most tests are file-system unit tests at world size 1 (``localsgd.dist`` without a process group is
one rank: its collectives return their input). A kill is simulated either by a ``fault_hook`` that
raises at a crash stage (nothing after it runs, as with ``os._exit``) or by writing the directory
states a kill leaves.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from localsgd import checkpoint as ckpt_mod
from localsgd.checkpoint import Checkpointer
from localsgd.errors import CheckpointError, RunDirBusyError
from localsgd.rundir import RunDirLock, completed_run, rotate_previous_run

from .distributed import run_ok

ROOT = Path(__file__).resolve().parent.parent


class Killed(BaseException):
    """Stands for a kill: not an Exception, so no handler in the code under test can swallow it."""


def kill_at(stage: str) -> Any:
    def hook(seen: str) -> None:
        if seen == stage:
            raise Killed(stage)
    return hook


def save(ck: Checkpointer, step: int, value: float, **kw: Any) -> Path:
    model = {"w": torch.full((4,), value)}
    rank = {"step": step, "value": torch.tensor(value)}
    return ck.save(step, model, rank, {"note": "test"}, **kw)


def model_value(ck: Checkpointer) -> tuple[int, float]:
    found = ck.find_latest()
    assert found is not None
    model, _ = ck.load(found)
    return found.step, float(model["w"][0])


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in ("latest",))


# ---------------------------------------------------------------------- 1. a re-save of a committed step
@pytest.mark.parametrize(("stage", "expected"), [("shards", 1.0), ("aside", 1.0), ("committed", 2.0)])
def test_resave_killed_at_any_stage_leaves_a_complete_copy_of_that_step(tmp_path: Path, stage: str,
                                                                        expected: float) -> None:
    """The trainer saves max_steps at its checkpoint round and again at the end: a kill inside the
    second save must leave the first (or the second) loadable, with checkpoint.fallback=false."""
    ck = Checkpointer(tmp_path, keep_latest_k=2, fallback=False)
    save(ck, 4, 0.0)
    save(ck, 8, 1.0)
    with pytest.raises(Killed):
        save(ck, 8, 2.0, fault_hook=kill_at(stage))
    resumed = Checkpointer(tmp_path, keep_latest_k=2, fallback=False)
    assert model_value(resumed) == (8, expected)
    assert names(tmp_path) == ["step-4", "step-8"]
    save(resumed, 12, 3.0)  # and the run goes on
    assert model_value(resumed) == (12, 3.0)


def test_interrupted_replacement_of_an_older_localsgd_keeps_the_complete_tmp(tmp_path: Path) -> None:
    """The crash of the report: a kill inside ``rmtree(step-N)`` left ``step-N`` without a rank file
    next to the complete ``step-N.tmp``; the resume deleted the tmp and could never restart."""
    ck = Checkpointer(tmp_path, fallback=False)
    save(ck, 8, 1.0)
    shutil.copytree(tmp_path / "step-8", tmp_path / "step-8.tmp")
    (tmp_path / "step-8" / "rank0.pt").unlink()
    assert model_value(Checkpointer(tmp_path, fallback=False)) == (8, 1.0)
    assert names(tmp_path) == ["step-8"]


def test_moved_aside_copy_without_its_replacement_is_restored(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, fallback=False)
    save(ck, 8, 1.0)
    os.replace(tmp_path / "step-8", tmp_path / "step-8.old")
    (tmp_path / "step-8.tmp").mkdir()  # the replacement, half written
    (tmp_path / "step-8.tmp" / "rank0.pt").write_bytes(b"half")
    assert model_value(Checkpointer(tmp_path, fallback=False)) == (8, 1.0)
    assert names(tmp_path) == ["step-8"]


def test_moved_aside_copy_replaces_a_committed_copy_that_does_not_verify(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, fallback=False)
    save(ck, 8, 1.0)
    shutil.copytree(tmp_path / "step-8", tmp_path / "step-8.old")
    (tmp_path / "step-8" / "model.pt").write_bytes(b"flipped bits")
    assert model_value(Checkpointer(tmp_path, fallback=False)) == (8, 1.0)
    assert names(tmp_path) == ["step-8"]


def test_leftovers_of_ordinary_crashes_are_removed(tmp_path: Path) -> None:
    ck = Checkpointer(tmp_path, keep_latest_k=3)
    save(ck, 4, 0.0)
    save(ck, 8, 1.0)
    (tmp_path / "step-12.tmp").mkdir()  # killed while writing the shards
    (tmp_path / "step-12.tmp" / "rank0.pt").write_bytes(b"partial")
    shutil.copytree(tmp_path / "step-4", tmp_path / "step-2.deleting")  # killed while purging
    assert model_value(Checkpointer(tmp_path)) == (8, 1.0)
    assert names(tmp_path) == ["step-4", "step-8"]


def test_identical_resave_writes_nothing_and_a_different_one_replaces(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    ck = Checkpointer(tmp_path)
    first = save(ck, 8, 1.0)
    manifest = (first / "manifest.json").read_bytes()
    writes: list[str] = []
    real_write = ckpt_mod._write_bytes
    monkeypatch.setattr(ckpt_mod, "_write_bytes", lambda path, data: (writes.append(path.name), real_write(path, data)))
    assert save(ck, 8, 1.0) == first
    assert writes == [] and (first / "manifest.json").read_bytes() == manifest
    save(ck, 8, 2.0)  # same step, other bytes (e.g. Stich's iterate average at the end): a real save
    assert sorted(writes) == ["manifest.json.tmp", "model.pt", "rank0.pt"]
    assert model_value(ck) == (8, 2.0) and names(tmp_path) == ["step-8"]
    assert save(Checkpointer(tmp_path), 8, 2.0) == first  # another process: rewritten, not assumed
    assert len(writes) == 6


# ---------------------------------------------------------------------- 2. unreadable checkpoints
def deny_reads_under(monkeypatch: pytest.MonkeyPatch, blocked: Path) -> None:
    """What ``chmod 000 blocked`` does to a non-root reader: nothing inside can be stat'ed or opened."""
    def denied(path: Any) -> bool:
        try:
            return Path(os.fsdecode(path)).is_relative_to(blocked) and Path(os.fsdecode(path)) != blocked
        except TypeError:  # a file descriptor
            return False

    def guard(real: Any) -> Any:
        def wrapper(path: Any, *args: Any, **kwargs: Any) -> Any:
            if denied(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))
            return real(path, *args, **kwargs)
        return wrapper

    for module, name in ((os, "stat"), (os, "open"), (os, "scandir"), (os, "listdir"), (io, "open")):
        monkeypatch.setattr(module, name, guard(getattr(module, name)))
    monkeypatch.setattr("builtins.open", guard(open))


def test_unreadable_newest_checkpoint_falls_back_with_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    ck = Checkpointer(tmp_path, keep_latest_k=3)
    save(ck, 4, 0.0)
    save(ck, 8, 1.0)
    deny_reads_under(monkeypatch, tmp_path / "step-8")
    with caplog.at_level(logging.WARNING, logger="localsgd.checkpoint"):
        found = Checkpointer(tmp_path, keep_latest_k=3, fallback=True).find_latest()
    assert found is not None and found.step == 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(tmp_path / "step-8") in warnings[0] and "Permission denied" in warnings[0]
    with pytest.raises(CheckpointError) as info:
        Checkpointer(tmp_path, keep_latest_k=3, fallback=False).find_latest()
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "step-8") in message
    assert "Permission denied" in message and "checkpoint.fallback=true" in message


def _find_latest_as_nobody(directory: str, write_end: int) -> None:
    os.setgid(65534)
    os.setuid(65534)
    try:
        found = Checkpointer(directory, fallback=True).find_latest()
        report = str(found.step if found is not None else None)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        report = f"{type(exc).__name__}: {exc}"
    os.write(write_end, report.encode())


@pytest.mark.skipif(not hasattr(os, "fork") or os.geteuid() != 0, reason="needs root to become an unprivileged user")
def test_really_unreadable_checkpoint_falls_back() -> None:
    """The same with a real ``chmod 000``, read by an unprivileged child (root ignores permissions)."""
    base = Path(tempfile.mkdtemp())  # pytest's tmp_path is private to root
    try:
        ck = Checkpointer(base / "ck")
        save(ck, 4, 0.0)
        save(ck, 8, 1.0)
        for path in [base, *base.rglob("*")]:
            os.chown(path, 65534, 65534)
        os.chmod(base / "ck" / "step-8", 0)
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                _find_latest_as_nobody(str(base / "ck"), write_end)
            finally:
                os._exit(0)
        os.close(write_end)
        os.waitpid(pid, 0)
        with os.fdopen(read_end) as fh:
            assert fh.read() == "4"
    finally:
        os.chmod(base / "ck" / "step-8", 0o755)
        shutil.rmtree(base)


# ---------------------------------------------------------------------- 3. a full disk
@pytest.mark.parametrize("failing", ["rank0.pt", "model.pt", "manifest.json.tmp"])
@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_full_disk_names_the_file_the_need_and_the_room_and_keeps_the_previous(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str, code: int) -> None:
    ck = Checkpointer(tmp_path, keep_latest_k=2)
    save(ck, 4, 0.0)
    save(ck, 8, 1.0)
    real_write = ckpt_mod._write_bytes

    def full(path: Path, data: bytes) -> Any:
        if path.name == failing:
            path.write_bytes(data[: len(data) // 2])  # a partial file, as a full disk leaves it
            raise OSError(code, os.strerror(code))
        return real_write(path, data)

    monkeypatch.setattr(ckpt_mod, "_write_bytes", full)
    for step in (12, 8):  # a new step, and a re-save of the committed one
        with pytest.raises(CheckpointError) as info:
            save(ck, step, 2.0)
        message = str(info.value)
        assert "\n" not in message
        assert message.startswith(str(tmp_path / f"step-{step}.tmp" / failing))
        assert ("quota exceeded" if code == errno.EDQUOT else "no space left") in message
        sizes = [len(ckpt_mod._serialise(x)) for x in ({"w": torch.full((4,), 2.0)},
                                                        {"step": step, "value": torch.tensor(2.0)})]
        assert f"({sum(sizes)} bytes;" in message and " free in " in message
        assert "checkpoint.dir=" in message and "checkpoint.keep_latest_k" in message
        assert names(tmp_path) == ["step-4", "step-8"]  # the partial .tmp is gone, the committed ones intact
    monkeypatch.setattr(ckpt_mod, "_write_bytes", real_write)
    assert model_value(Checkpointer(tmp_path, fallback=False)) == (8, 1.0)


def _full_disk_on_rank1(rank: int, world: int, directory: str) -> str:
    ck = Checkpointer(directory)
    save(ck, 4, 0.0)
    if rank == 1:
        def full(path: Path, data: bytes) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        ckpt_mod._write_bytes = full
    try:
        save(ck, 8, 1.0)
    except CheckpointError as exc:
        return str(exc)
    return "saved"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_full_disk_on_one_rank_fails_every_rank_at_once(tmp_path: Path) -> None:
    errors = run_ok(_full_disk_on_rank1, 2, str(tmp_path), timeout_s=90)
    assert errors[0] == errors[1] and errors[0].startswith(str(tmp_path / "step-8.tmp" / "rank1.pt"))
    assert names(tmp_path) == ["step-4"]


# ---------------------------------------------------------------------- 4. one job per run directory
def test_second_lock_is_refused_naming_the_owner_and_released_lock_is_free(tmp_path: Path) -> None:
    run = tmp_path / "run"
    with RunDirLock(run) as lock:
        assert lock.held
        record = json.loads((run / ".lock").read_text())
        with pytest.raises(RunDirBusyError) as info:
            RunDirLock.acquire(run)  # another open file description: refused like another process
        assert str(info.value) == (f"run directory {run} is in use by pid {os.getpid()} on host "
                                   f"{socket.gethostname()} since {record['started']}; use another "
                                   "hydra.run.dir or stop that run")
        assert isinstance(info.value, CheckpointError)
    RunDirLock.acquire(run).release()


HOLD = """
import sys
from localsgd.rundir import RunDirLock
lock = RunDirLock.acquire(sys.argv[1])
print("held", flush=True)
sys.stdin.read()
"""

TRY = """
import sys
from localsgd.errors import RunDirBusyError
from localsgd.rundir import RunDirLock
try:
    RunDirLock.acquire(sys.argv[1])
except RunDirBusyError as exc:
    print(f"localsgd: {exc}", file=sys.stderr)
    sys.exit(1)
print("acquired")
"""


@pytest.mark.timeout(120)
def test_two_jobs_on_one_run_dir_second_exits_at_once_and_a_killed_owner_is_no_obstacle(tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(HOLD), str(run)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert owner.stdout is not None and owner.stdout.readline() == "held\n"
        t0 = time.monotonic()
        second = subprocess.run([sys.executable, "-c", textwrap.dedent(TRY), str(run)], capture_output=True,
                                text=True, env=env, timeout=60)
        assert second.returncode == 1, second.stderr
        lines = second.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"localsgd: run directory {run} is in use by pid {owner.pid} "
                                                       f"on host {socket.gethostname()} since ")
        assert time.monotonic() - t0 < 30  # refused at once (the rest is the interpreter's start)
    finally:
        owner.send_signal(signal.SIGKILL)
        owner.wait()
    assert (run / ".lock").read_text()  # the dead owner's record is still there ...
    with RunDirLock(run):  # ... and no obstacle: the kernel released its lock
        assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------------- 5. finished and earlier runs
def write_jsonl(path: Path, *records: dict[str, Any]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_completed_run_is_recognised_by_summary_or_final_record(tmp_path: Path) -> None:
    assert completed_run(tmp_path, 40) is None
    write_jsonl(tmp_path / "metrics.jsonl", {"event": "start", "step": 0}, {"event": "train", "step": 40},
                {"event": "final", "step": 40, "final_eval_accuracy": 0.9})
    done = completed_run(tmp_path, 40)
    assert done is not None and done.source.name == "metrics.jsonl" and done.summary["final_eval_accuracy"] == 0.9
    assert completed_run(tmp_path, 80) is None  # finished, but a different length
    assert completed_run(tmp_path, 40, checkpoint_step=40) is not None
    assert completed_run(tmp_path, 40, checkpoint_step=20) is None  # a stale record
    (tmp_path / "summary.json").write_text(json.dumps({"steps": 40, "final_eval_accuracy": 0.9}))
    done = completed_run(tmp_path, 40)
    assert done is not None and done.source.name == "summary.json" and done.step == 40
    line = done.describe(tmp_path)
    assert "\n" not in line and "already holds a completed run (step 40, final_eval_accuracy 0.9000" in line
    (tmp_path / "summary.json").unlink()
    with (tmp_path / "metrics.jsonl").open("a") as fh:  # a later attempt started and died
        fh.write(json.dumps({"event": "start", "step": 0}) + "\n" + '{"event": "tra')
    assert completed_run(tmp_path, 40) is None


def test_rotate_previous_run_shifts_generations_aligned(tmp_path: Path) -> None:
    assert rotate_previous_run(tmp_path) == []
    write_jsonl(tmp_path / "metrics.jsonl", {"run": "a"})
    (tmp_path / "summary.json").write_text('{"run": "a"}')
    assert rotate_previous_run(tmp_path) == [(tmp_path / "metrics.jsonl", tmp_path / "metrics.jsonl.1"),
                                             (tmp_path / "summary.json", tmp_path / "summary.json.1")]
    write_jsonl(tmp_path / "metrics.jsonl", {"run": "b"})  # run b died before its summary
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "step-8").mkdir()
    rotate_previous_run(tmp_path, ["metrics.jsonl", "summary.json", "checkpoints"])
    assert json.loads((tmp_path / "metrics.jsonl.1").read_text()) == {"run": "b"}
    assert json.loads((tmp_path / "metrics.jsonl.2").read_text()) == {"run": "a"}
    assert json.loads((tmp_path / "summary.json.2").read_text()) == {"run": "a"}  # with its own run's metrics
    assert not (tmp_path / "summary.json.1").exists() and (tmp_path / "checkpoints.1" / "step-8").is_dir()
    (tmp_path / "metrics.jsonl").write_text("")  # an empty log is left in place
    assert rotate_previous_run(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints.1", "metrics.jsonl", "metrics.jsonl.1",
                                                          "metrics.jsonl.2", "summary.json.2"]
